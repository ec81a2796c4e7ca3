/* test_trace.c - tracing (server/trace.h): W3C traceparent parsing by the
 * spec's rules (version 00 exactly, ff refused, all-zero ids refused,
 * lengths, lowercase hex only, later versions read for their first fields),
 * tracestate's grammar and limits, the answer header's format, tracing off
 * costing nothing, and the OTLP/HTTP JSON encoding of a record: resource,
 * scope, ids as hex, parent links (caller -> server span -> phases ->
 * hosted models), kinds, times as strings, attributes and statuses. */
#include <jansson.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "../../daemon/base/mem.h"
#include "../../daemon/server/trace.h"

#define TID "0af7651916cd43dd8448eb211c80319c"
#define PID "b7ad6b7169203331"

static void test_parse_valid(void **s) {
  (void)s;
  trace_ctx c;
  assert_int_equal(trace_parse_parent("00-" TID "-" PID "-01", &c), 0);
  char hex[33];
  trace_hex(c.trace_id, 16, hex);
  assert_string_equal(hex, TID);
  trace_hex(c.parent_id, 8, hex);
  assert_string_equal(hex, PID);
  assert_int_equal(c.flags, 1);
  assert_int_equal(trace_parse_parent("00-" TID "-" PID "-00", &c), 0);
  assert_int_equal(c.flags, 0);
  /* unknown flag bits are kept as received; only bit 0 means sampled */
  assert_int_equal(trace_parse_parent("00-" TID "-" PID "-ff", &c), 0);
  assert_int_equal(c.flags, 0xff);
}

static void test_parse_invalid(void **s) {
  (void)s;
  trace_ctx c;
  memset(&c, 0x5a, sizeof c);
  trace_ctx before = c;
  static const char *const bad[] = {
      NULL,
      "",
      "ff-" TID "-" PID "-01",                          /* version ff is invalid */
      "00-00000000000000000000000000000000-" PID "-01", /* all-zero trace id */
      "00-" TID "-0000000000000000-01",                 /* all-zero parent id */
      "00-" TID "-" PID "-0",                           /* 54 characters */
      "00-" TID "-" PID "-011",                         /* version 00 is exactly 55 */
      "00-" TID "-" PID "-01-",                         /* ... even with a dash */
      "00-" TID "a-" PID "-01",                         /* a longer trace id */
      "00-0AF7651916CD43DD8448EB211C80319C-" PID "-01", /* uppercase trace id */
      "00-" TID "-B7AD6B7169203331-01",                 /* uppercase parent id */
      "00-" TID "-" PID "-0A",                          /* uppercase flags */
      "0A-" TID "-" PID "-01",                          /* uppercase version */
      "00_" TID "-" PID "-01",                          /* wrong separator */
      "00-" TID "-" PID "_01",                          /* wrong separator */
      "00-0af7651916cd43dd8448eb211c80319g-" PID "-01", /* not hex */
      "0x-" TID "-" PID "-01",                          /* version not hex */
      " 00-" TID "-" PID "-01",                         /* shifted */
      "cc-" TID "-" PID "-01x",                         /* a later version: no dash at 55 */
      "cc-" TID "-" PID "-0",                           /* a later version, too short */
  };
  for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
    if (trace_parse_parent(bad[i], &c) != -1) fail_msg("accepted '%s'", bad[i] ? bad[i] : "NULL");
    assert_memory_equal(&c, &before, sizeof c); /* untouched */
  }
}

static void test_parse_future_version(void **s) {
  (void)s;
  trace_ctx c;
  /* a later version: the first fields are read, what follows a dash ignored */
  assert_int_equal(trace_parse_parent("cc-" TID "-" PID "-01-what-the-future-will-be-like", &c), 0);
  char hex[33];
  trace_hex(c.trace_id, 16, hex);
  assert_string_equal(hex, TID);
  assert_int_equal(c.flags & 1, 1);
  assert_int_equal(trace_parse_parent("01-" TID "-" PID "-00", &c), 0); /* exactly 55 */
  assert_int_equal(c.flags & 1, 0);
  assert_int_equal(trace_parse_parent("fe-" TID "-" PID "-09-x", &c), 0);
  assert_int_equal(c.flags & 1, 1);
  /* the same id rules hold */
  assert_int_equal(trace_parse_parent("cc-" TID "-0000000000000000-01-x", &c), -1);
}

static void test_format(void **s) {
  (void)s;
  trace_ctx c;
  assert_int_equal(trace_parse_parent("00-" TID "-" PID "-01", &c), 0);
  char out[TRACE_HEADER_LEN];
  trace_format_parent(c.trace_id, c.parent_id, 1, out);
  assert_string_equal(out, "00-" TID "-" PID "-01");
  trace_format_parent(c.trace_id, c.parent_id, 0, out);
  assert_string_equal(out, "00-" TID "-" PID "-00");
  trace_ctx back;
  assert_int_equal(trace_parse_parent(out, &back), 0);
  assert_memory_equal(back.trace_id, c.trace_id, 16);
}

static void test_tracestate(void **s) {
  (void)s;
  assert_true(trace_state_valid("congo=t61rcWkgMzE"));
  assert_true(trace_state_valid("rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"));
  assert_true(trace_state_valid("rojo=00f067aa0ba902b7 , congo=t61rcWkgMzE,"));
  assert_true(trace_state_valid("fw529a3039@dt=x,1tenant@sys_1=y"));
  assert_true(trace_state_valid("a*b/c_d-e=v a l u e"));
  assert_true(trace_state_valid(""));
  assert_false(trace_state_valid(NULL));
  assert_false(trace_state_valid("Congo=x"));             /* uppercase key */
  assert_false(trace_state_valid("1congo=x"));            /* a simple key starts with a letter */
  assert_false(trace_state_valid("congo=a=b"));           /* '=' in the value */
  assert_false(trace_state_valid("congo="));              /* empty value */
  assert_false(trace_state_valid("congo"));               /* no value */
  assert_false(trace_state_valid("t@Sys=x"));             /* uppercase system id */
  assert_false(trace_state_valid("t@abcdefghijklmno=x")); /* system id over 14 */
  assert_false(trace_state_valid("congo=x\x01"));
  assert_false(trace_state_valid("congo=x,rojo=y,congo=z")); /* a key twice */
  assert_true(trace_state_valid("congo=x,t@congo=y"));       /* another key */
  char many[512];
  size_t n = 0;
  for (int i = 0; i < 33; i++) n += (size_t)snprintf(many + n, sizeof many - n, "k%d=v,", i);
  assert_false(trace_state_valid(many)); /* 33 members */
  many[n - 6] = 0;                       /* 32 members */
  assert_true(trace_state_valid(many));
  char longs[TRACE_STATE_MAX + 8];
  memset(longs, 'v', sizeof longs);
  memcpy(longs, "k=", 2);
  longs[TRACE_STATE_MAX + 1] = 0; /* 513 characters */
  assert_false(trace_state_valid(longs));
}

static void test_off_costs_nothing(void **s) {
  (void)s;
  assert_false(trace_on());
  char answer[TRACE_HEADER_LEN] = "x";
  assert_null(trace_begin("00-" TID "-" PID "-01", NULL, 1.0, answer));
  assert_string_equal(answer, "");
  trace_end(NULL, NULL, "GET", NULL, 0, 200, "id", 2.0); /* no record: nothing */
  trace_release(NULL);
}

/* a record as the transport fills it: a caller's parent, every phase, three
 * hosted members, one of which failed */
static trace_req *make_rec(void) {
  trace_req *r = tl_calloc(1, sizeof *r);
  trace_req_init(r);
  assert_int_equal(trace_parse_parent("00-" TID "-" PID "-01", &r->ctx), 0);
  r->has_parent = 1;
  for (int i = 0; i < 8; i++) r->span_id[i] = (uint8_t)(0x10 + i);
  snprintf(r->state, sizeof r->state, "congo=t61rcWkgMzE");
  r->wall0_ns = INT64_C(1700000000000000000);
  r->t0 = 100.0;
  double t = 100.0;
  for (int p = 0; p < TRP_COUNT; p++, t += 0.001) trace_set_phase(r, (trace_phase)p, t, t + 0.001);
  r->t1 = t + 0.0005;
  snprintf(r->method, sizeof r->method, "POST");
  snprintf(r->route, sizeof r->route, "/v2/models/{model}/infer");
  snprintf(r->model, sizeof r->model, "ens\"q");
  r->version = 3;
  r->status = 200;
  snprintf(r->request_id, sizeof r->request_id, "rid-1");
  double c0 = r->ph[TRP_COMPUTE][0];
  for (int m = 0; m < 3; m++) {
    char name[8];
    snprintf(name, sizeof name, "m%d", m);
    r->sink.hosted(&r->sink, "member", name, 1, c0 + 0.0001 * m, c0 + 0.0001 * m + 0.00005,
                   m == 2 ? -TS_EUNAVAIL : 0);
  }
  return r;
}

static json_t *attr(json_t *attrs, const char *key) {
  size_t i;
  json_t *a;
  json_array_foreach(attrs, i, a) {
    if (strcmp(json_string_value(json_object_get(a, "key")), key) == 0)
      return json_object_get(a, "value");
  }
  return NULL;
}

static long long ns(json_t *span, const char *k) {
  json_t *v = json_object_get(span, k);
  assert_true(json_is_string(v)); /* 64-bit nanoseconds travel as strings */
  return atoll(json_string_value(v));
}

static json_t *by_name(json_t *spans, const char *name, int nth) {
  size_t i;
  json_t *sp;
  json_array_foreach(spans, i, sp) {
    if (strcmp(json_string_value(json_object_get(sp, "name")), name) == 0 && nth-- == 0) return sp;
  }
  return NULL;
}

static void test_encode(void **s) {
  (void)s;
  trace_req *r = make_rec();
  trace_req *r2 = make_rec();
  r2->has_parent = 0;
  r2->status = 503;
  r2->state[0] = 0;
  r2->span_id[0] = 0x99;
  for (int p = TRP_QUEUE; p < TRP_COUNT; p++) r2->ph[p][0] = r2->ph[p][1] = 0;
  atomic_store(&r2->n_hosted, 0);
  atomic_store(&r2->hosted_ready, 0);
  assert_int_equal(trace_span_count(r), 1 + TRP_COUNT + 3);
  assert_int_equal(trace_span_count(r2), 2);
  trace_req *recs[2] = {r, r2};
  sbuf b;
  sbuf_init(&b);
  size_t n = trace_encode(recs, 2, "inst-1", &b);
  assert_int_equal(n, 1 + TRP_COUNT + 3 + 2);
  assert_false(sbuf_failed(&b));
  json_error_t je;
  json_t *doc = json_loadb(b.data, b.len, 0, &je);
  if (!doc) fail_msg("not JSON: %s: %.200s", je.text, b.data);
  json_t *rs = json_array_get(json_object_get(doc, "resourceSpans"), 0);
  json_t *rattrs = json_object_get(json_object_get(rs, "resource"), "attributes");
  assert_string_equal(
      json_string_value(json_object_get(attr(rattrs, "service.name"), "stringValue")), "tallyd");
  assert_string_equal(
      json_string_value(json_object_get(attr(rattrs, "service.instance.id"), "stringValue")),
      "inst-1");
  json_t *ss = json_array_get(json_object_get(rs, "scopeSpans"), 0);
  assert_string_equal(json_string_value(json_object_get(json_object_get(ss, "scope"), "name")),
                      "tallyd");
  json_t *spans = json_object_get(ss, "spans");
  assert_int_equal(json_array_size(spans), n);

  json_t *root = by_name(spans, "POST /v2/models/{model}/infer", 0);
  assert_non_null(root);
  assert_string_equal(json_string_value(json_object_get(root, "traceId")), TID);
  assert_string_equal(json_string_value(json_object_get(root, "spanId")), "1011121314151617");
  assert_string_equal(json_string_value(json_object_get(root, "parentSpanId")), PID);
  assert_string_equal(json_string_value(json_object_get(root, "traceState")), "congo=t61rcWkgMzE");
  assert_int_equal(json_integer_value(json_object_get(root, "kind")), 2);
  assert_int_equal(ns(root, "startTimeUnixNano"), INT64_C(1700000000000000000));
  assert_int_equal(ns(root, "endTimeUnixNano") - ns(root, "startTimeUnixNano"), 6500000);
  json_t *ra = json_object_get(root, "attributes");
  assert_string_equal(json_string_value(json_object_get(attr(ra, "tallyd.model"), "stringValue")),
                      "ens\"q");
  assert_string_equal(
      json_string_value(json_object_get(attr(ra, "http.response.status_code"), "intValue")), "200");
  assert_string_equal(
      json_string_value(json_object_get(attr(ra, "tallyd.model.version"), "intValue")), "3");
  assert_string_equal(
      json_string_value(json_object_get(attr(ra, "tallyd.request_id"), "stringValue")), "rid-1");
  assert_string_equal(json_string_value(json_object_get(attr(ra, "http.route"), "stringValue")),
                      "/v2/models/{model}/infer");
  assert_null(json_object_get(json_object_get(root, "status"), "code")); /* 200: unset */

  const char *names[] = {"receive", "queue", "decode", "compute", "encode", "send"};
  const char *root_id = json_string_value(json_object_get(root, "spanId"));
  const char *compute_id = NULL;
  for (int p = 0; p < TRP_COUNT; p++) {
    json_t *c = by_name(spans, names[p], 0);
    if (!c) fail_msg("no span '%s'", names[p]);
    assert_int_equal(json_integer_value(json_object_get(c, "kind")), 1);
    assert_string_equal(json_string_value(json_object_get(c, "parentSpanId")), root_id);
    assert_string_equal(json_string_value(json_object_get(c, "traceId")), TID);
    assert_int_equal(strlen(json_string_value(json_object_get(c, "spanId"))), 16);
    assert_true(ns(c, "startTimeUnixNano") >= ns(root, "startTimeUnixNano"));
    assert_true(ns(c, "endTimeUnixNano") <= ns(root, "endTimeUnixNano"));
    assert_int_equal(ns(c, "endTimeUnixNano") - ns(c, "startTimeUnixNano"), 1000000);
    if (p == TRP_COMPUTE) compute_id = json_string_value(json_object_get(c, "spanId"));
  }
  json_t *comp = by_name(spans, "compute", 0);
  for (int m = 0; m < 3; m++) {
    json_t *h = by_name(spans, "compute member", m);
    assert_non_null(h);
    assert_string_equal(json_string_value(json_object_get(h, "parentSpanId")), compute_id);
    char want[8];
    snprintf(want, sizeof want, "m%d", m);
    assert_string_equal(
        json_string_value(json_object_get(
            attr(json_object_get(h, "attributes"), "tallyd.hosted.model"), "stringValue")),
        want);
    assert_true(ns(h, "startTimeUnixNano") >= ns(comp, "startTimeUnixNano"));
    assert_true(ns(h, "endTimeUnixNano") <= ns(comp, "endTimeUnixNano"));
    json_int_t code = json_integer_value(json_object_get(json_object_get(h, "status"), "code"));
    assert_int_equal(code, m == 2 ? 2 : 0);
  }
  /* span ids are distinct */
  size_t i, j;
  json_t *x, *y;
  json_array_foreach(spans, i, x) {
    json_array_foreach(spans, j, y) {
      if (i < j)
        assert_string_not_equal(json_string_value(json_object_get(x, "spanId")),
                                json_string_value(json_object_get(y, "spanId")));
    }
  }
  /* the second record: a root of its own, 503 an error */
  json_t *root2 = json_array_get(spans, n - 2);
  assert_int_equal(json_integer_value(json_object_get(root2, "kind")), 2);
  assert_null(json_object_get(root2, "parentSpanId"));
  assert_null(json_object_get(root2, "traceState"));
  assert_int_equal(json_integer_value(json_object_get(json_object_get(root2, "status"), "code")),
                   2);
  json_decref(doc);
  sbuf_free(&b);
  trace_release(r);
  trace_release(r2);
}

static void test_encode_numbers(void **s) {
  (void)s;
  /* integers are written two digits a step: every length, both parities */
  static const long long vals[] = {1,
                                   9,
                                   10,
                                   99,
                                   100,
                                   101,
                                   999,
                                   1000,
                                   12345,
                                   1000000,
                                   987654321,
                                   1234567890,
                                   INT64_C(9223372036854775807)};
  for (size_t i = 0; i < sizeof vals / sizeof *vals; i++) {
    trace_req *r = make_rec();
    r->version = vals[i];
    r->status = (int)(vals[i] % 1000);
    sbuf b;
    sbuf_init(&b);
    trace_encode(&r, 1, "i", &b);
    json_t *doc = json_loadb(b.data, b.len, 0, NULL);
    assert_non_null(doc);
    json_t *sp = json_array_get(
        json_object_get(
            json_array_get(json_object_get(json_array_get(json_object_get(doc, "resourceSpans"), 0),
                                           "scopeSpans"),
                           0),
            "spans"),
        0);
    json_t *a = json_object_get(sp, "attributes");
    char want[32];
    snprintf(want, sizeof want, "%lld", vals[i]);
    assert_string_equal(
        json_string_value(json_object_get(attr(a, "tallyd.model.version"), "intValue")), want);
    snprintf(want, sizeof want, "%d", r->status);
    if (r->status)
      assert_string_equal(
          json_string_value(json_object_get(attr(a, "http.response.status_code"), "intValue")),
          want);
    json_decref(doc);
    sbuf_free(&b);
    trace_release(r);
  }
}

static void test_hosted_sink_caps(void **s) {
  (void)s;
  /* the record's sink as a worker sees it: more hosted calls than slots are
   * counted, the spans kept are the first TRACE_MAX_HOSTED */
  trace_req *r = make_rec();
  memset(r->hosted, 0, sizeof r->hosted);
  atomic_store(&r->n_hosted, 0);
  atomic_store(&r->hosted_ready, 0);
  for (int i = 0; i < TRACE_MAX_HOSTED + 5; i++)
    r->sink.hosted(&r->sink, "base", "q", 1, 100.0 + i, 100.5 + i, 0);
  assert_int_equal(atomic_load(&r->n_hosted), TRACE_MAX_HOSTED + 5);
  assert_int_equal(trace_span_count(r), 1 + TRP_COUNT + TRACE_MAX_HOSTED);
  assert_string_equal(r->hosted[TRACE_MAX_HOSTED - 1].role, "base");
  trace_release(r);
}

int main(void) {
  const struct CMUnitTest tests[] = {cmocka_unit_test(test_parse_valid),
                                     cmocka_unit_test(test_parse_invalid),
                                     cmocka_unit_test(test_parse_future_version),
                                     cmocka_unit_test(test_format),
                                     cmocka_unit_test(test_tracestate),
                                     cmocka_unit_test(test_off_costs_nothing),
                                     cmocka_unit_test(test_encode),
                                     cmocka_unit_test(test_encode_numbers),
                                     cmocka_unit_test(test_hosted_sink_caps)};
  return cmocka_run_group_tests(tests, NULL, NULL);
}
