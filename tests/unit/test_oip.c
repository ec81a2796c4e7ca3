/* test_oip.c - the OIP v2 tensor codec: every datatype, flat and nested
 * data, binary parts, shape mismatches, and the response encoder. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cmocka.h>

#include "../../daemon/base/mem.h"
#include "../../daemon/server/oip.h"

static int decode(const char *body, oip_request *req, ts_err *err) {
  return oip_decode(body, strlen(body), 0, 0, req, err);
}

static void expect_fail(const char *body, int status, const char *needle) {
  oip_request req;
  ts_err err = {0};
  int rc = decode(body, &req, &err);
  if (rc != -status || !strstr(err.msg, needle))
    fail_msg("body %s: rc %d msg '%s' (wanted %d, '%s')", body, rc, err.msg, -status, needle);
  oip_request_free(&req);
}

static void test_every_datatype(void **s) {
  (void)s;
  static const char *dts[] = {"UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16",
                              "INT32", "INT64",  "FP16",   "BF16",   "FP32", "FP64"};
  for (size_t i = 0; i < sizeof dts / sizeof *dts; i++) {
    char body[256];
    snprintf(body, sizeof body,
             "{\"inputs\":[{\"name\":\"x\",\"shape\":[2,2],\"datatype\":\"%s\","
             "\"data\":[[1,2],[3,100]]}]}",
             dts[i]);
    oip_request req;
    ts_err err = {0};
    assert_int_equal(decode(body, &req, &err), 0);
    assert_int_equal(req.inputs.n, 1);
    ts_tensor *t = &req.inputs.items[0];
    assert_string_equal(ts_dtype_name(t->dtype), dts[i]);
    assert_int_equal(t->ndim, 2);
    double *d;
    assert_int_equal(ts_to_f64(t, 0, &d, &err), 0);
    assert_true(d[0] == 1 && d[1] == 2 && d[2] == 3 && d[3] == 100);
    tl_free(d);
    oip_request_free(&req);
  }
  oip_request req;
  ts_err err = {0};
  assert_int_equal(decode("{\"inputs\":[{\"name\":\"b\",\"shape\":[3],\"datatype\":\"BOOL\","
                          "\"data\":[true,false,1]}]}",
                          &req, &err),
                   0);
  assert_memory_equal(req.inputs.items[0].data, "\1\0\1", 3);
  oip_request_free(&req);
  assert_int_equal(decode("{\"inputs\":[{\"name\":\"s\",\"shape\":[2],\"datatype\":\"BYTES\","
                          "\"data\":[\"ab\",\"\"]}]}",
                          &req, &err),
                   0);
  assert_int_equal(req.inputs.items[0].nbytes, 4 + 2 + 4);
  float *f;
  assert_int_equal(ts_to_f32(&req.inputs.items[0], 0, &f, &err), -TS_EINVAL);
  assert_non_null(strstr(err.msg, "BYTES"));
  oip_request_free(&req);
}

static void test_flat_and_nested_agree(void **s) {
  (void)s;
  oip_request a, b;
  ts_err err = {0};
  assert_int_equal(decode("{\"inputs\":[{\"name\":\"x\",\"shape\":[2,3],\"datatype\":\"FP32\","
                          "\"data\":[1,2,3,4,5,6]}]}",
                          &a, &err),
                   0);
  assert_int_equal(decode("{\"inputs\":[{\"name\":\"x\",\"shape\":[2,3],\"datatype\":\"FP32\","
                          "\"data\":[[1,2,3],[4,5,6]]}]}",
                          &b, &err),
                   0);
  assert_memory_equal(a.inputs.items[0].data, b.inputs.items[0].data, 24);
  assert_int_equal(((float *)a.inputs.items[0].data)[5], 6);
  oip_request_free(&a);
  oip_request_free(&b);
}

static void test_limits_and_values(void **s) {
  (void)s;
  expect_fail(
      "{\"inputs\":[{\"name\":\"x\",\"shape\":[2],\"datatype\":\"INT8\",\"data\":[1,200]}]}",
      TS_EINVAL, "out of range");
  expect_fail("{\"inputs\":[{\"name\":\"x\",\"shape\":[1],\"datatype\":\"INT32\",\"data\":[1.5]}]}",
              TS_EINVAL, "not an integer");
  expect_fail("{\"inputs\":[{\"name\":\"x\",\"shape\":[1],\"datatype\":\"UINT32\",\"data\":[-1]}]}",
              TS_EINVAL, "out of range");
  expect_fail(
      "{\"inputs\":[{\"name\":\"x\",\"shape\":[1],\"datatype\":\"FP16\",\"data\":[70000]}]}",
      TS_EINVAL, "overflows FP16");
  expect_fail(
      "{\"inputs\":[{\"name\":\"x\",\"shape\":[1],\"datatype\":\"FP32\",\"data\":[\"a\"]}]}",
      TS_EINVAL, "not a number");
  expect_fail("{\"inputs\":[{\"name\":\"x\",\"shape\":[1],\"datatype\":\"BOOL\",\"data\":[2]}]}",
              TS_EINVAL, "BOOL");
}

static void test_shape_mismatches(void **s) {
  (void)s;
  expect_fail(
      "{\"inputs\":[{\"name\":\"x\",\"shape\":[2,2],\"datatype\":\"FP32\",\"data\":[1,2,3]}]}",
      TS_EINVAL, "has 3 elements");
  expect_fail("{\"inputs\":[{\"name\":\"x\",\"shape\":[1],\"datatype\":\"FP32\",\"data\":[1,2]}]}",
              TS_EINVAL, "more elements");
  expect_fail("{\"inputs\":[{\"name\":\"x\",\"shape\":[-2],\"datatype\":\"FP32\",\"data\":[]}]}",
              TS_EINVAL, "non-negative");
  expect_fail(
      "{\"inputs\":[{\"name\":\"x\",\"shape\":[4294967296,4294967296,4294967296],"
      "\"datatype\":\"FP32\",\"data\":[]}]}",
      TS_EINVAL, "overflow");
  expect_fail(
      "{\"inputs\":[{\"name\":\"x\",\"shape\":[1,1,1,1,1,1,1,1,1],\"datatype\":\"FP32\","
      "\"data\":[1]}]}",
      TS_EINVAL, "rank");
  expect_fail("{\"inputs\":[{\"name\":\"x\",\"shape\":2,\"datatype\":\"FP32\",\"data\":[1]}]}",
              TS_EINVAL, "shape");
  /* zero-sized tensors are legal */
  oip_request r;
  ts_err err = {0};
  assert_int_equal(decode("{\"inputs\":[{\"name\":\"x\",\"shape\":[0,3],\"datatype\":\"FP32\","
                          "\"data\":[]}]}",
                          &r, &err),
                   0);
  oip_request_free(&r);
}

static void test_structure_errors(void **s) {
  (void)s;
  expect_fail("", TS_EINVAL, "empty");
  expect_fail("{", TS_EINVAL, "malformed JSON");
  expect_fail("[]", TS_EINVAL, "JSON object");
  expect_fail("{\"inputs\":{}}", TS_EINVAL, "'inputs' must be an array");
  expect_fail("{\"inputs\":[],\"inputs\":[]}", TS_EINVAL, "duplicate");
  expect_fail("{\"id\":5,\"inputs\":[]}", TS_EINVAL, "'id'");
  expect_fail(
      "{\"inputs\":[{\"name\":\"x\",\"shape\":[1],\"datatype\":\"FP32\",\"data\":[1]},"
      "{\"name\":\"x\",\"shape\":[1],\"datatype\":\"FP32\",\"data\":[1]}]}",
      TS_EINVAL, "twice");
  expect_fail(
      "{\"inputs\":[{\"name\":\"x\",\"shape\":[1],\"datatype\":\"FP32\",\"data\":"
      "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}]}",
      TS_EINVAL, "nested");
  expect_fail("{\"inputs\":[{\"name\":\"x\",\"shape\":[1],\"datatype\":\"FP32\"}]}", TS_EINVAL,
              "no 'data'");
  expect_fail(
      "{\"inputs\":[{\"name\":\"x\",\"shape\":[1],\"datatype\":\"FP32\",\"data\":[1e999]}]}",
      TS_EINVAL, "malformed JSON");
}

static void test_binary_part(void **s) {
  (void)s;
  const char *js =
      "{\"inputs\":[{\"name\":\"x\",\"shape\":[2],\"datatype\":\"FP32\","
      "\"parameters\":{\"binary_data_size\":8}},"
      "{\"name\":\"y\",\"shape\":[1],\"datatype\":\"INT64\","
      "\"parameters\":{\"binary_data_size\":8}}]}";
  char body[512];
  size_t n = strlen(js);
  memcpy(body, js, n);
  float x[2] = {1.5f, -2.0f};
  int64_t y = 42;
  memcpy(body + n, x, 8);
  memcpy(body + n + 8, &y, 8);
  oip_request r;
  ts_err err = {0};
  assert_int_equal(oip_decode(body, n + 16, n, 0, &r, &err), 0);
  assert_true(((float *)r.inputs.items[0].data)[1] == -2.0f);
  assert_true(((int64_t *)r.inputs.items[1].data)[0] == 42);
  oip_request_free(&r);
  assert_int_equal(oip_decode(body, n + 12, n, 0, &r, &err), -TS_EINVAL);
  assert_non_null(strstr(err.msg, "binary bytes left"));
  oip_request_free(&r);
  assert_int_equal(oip_decode(body, n + 20, n, 0, &r, &err), -TS_EINVAL);
  assert_non_null(strstr(err.msg, "not claimed"));
  oip_request_free(&r);
  assert_int_equal(oip_decode(body, n + 16, n, 1, &r, &err), -TS_ETOOBIG);
  oip_request_free(&r);
}

static void test_encode(void **s) {
  (void)s;
  ts_list outs;
  ts_list_init(&outs);
  ts_err err = {0};
  int64_t sh[2] = {1, 3};
  ts_tensor *t = ts_list_add(&outs);
  assert_int_equal(ts_alloc(t, "p", TS_FP32, 2, sh, &err), 0);
  float *p = t->data;
  p[0] = 0.1f;
  p[1] = -2.5f;
  p[2] = 3e-8f;
  int64_t one = 1;
  t = ts_list_add(&outs);
  assert_int_equal(ts_alloc(t, "n", TS_INT64, 1, &one, &err), 0);
  ((int64_t *)t->data)[0] = -7;
  oip_request req;
  assert_int_equal(
      decode("{\"id\":\"q\\\"1\",\"inputs\":[],\"outputs\":[{\"name\":\"n\"}]}", &req, &err), 0);
  sbuf b;
  sbuf_init(&b);
  size_t jl;
  assert_int_equal(oip_encode("m", 3, &req, &outs, NULL, &b, &jl, &err), 0);
  assert_string_equal(b.data,
                      "{\"model_name\":\"m\",\"model_version\":\"3\",\"id\":\"q\\\"1\","
                      "\"outputs\":[{\"name\":\"n\",\"datatype\":\"INT64\",\"shape\":[1],"
                      "\"data\":[-7]}]}");
  assert_int_equal(jl, 0);
  sbuf_free(&b);
  oip_request_free(&req);
  /* all outputs; floats round-trip */
  sbuf_init(&b);
  assert_int_equal(oip_encode("m", 1, NULL, &outs, NULL, &b, &jl, &err), 0);
  assert_non_null(strstr(b.data, "\"data\":[0.1,-2.5,3e-08]"));
  sbuf_free(&b);
  /* unknown output */
  assert_int_equal(decode("{\"inputs\":[],\"outputs\":[{\"name\":\"zz\"}]}", &req, &err), 0);
  sbuf_init(&b);
  assert_int_equal(oip_encode("m", 1, &req, &outs, NULL, &b, &jl, &err), -TS_EINVAL);
  assert_non_null(strstr(err.msg, "this model has: p, n"));
  sbuf_free(&b);
  oip_request_free(&req);
  ts_list_free(&outs);
}

/* Every float prints as text that reads back to the same float, no longer
 * than %.9g, and as short as %g where 6 digits suffice. */
static void test_float_text_round_trips(void **s) {
  (void)s;
  uint32_t x = 12345;
  for (int i = 0; i < 300000; i++) {
    x = x * 1664525u + 1013904223u;
    uint32_t bits = x;
    if (i % 3 == 0) bits = (bits & 0x807fffffu) | ((uint32_t)(100 + (x >> 27)) << 23);
    float v;
    memcpy(&v, &bits, 4);
    if (!isfinite(v)) continue;
    sbuf b;
    sbuf_init(&b);
    sbuf_f32(&b, v);
    float back = strtof(b.data, NULL);
    if (back != v)
      fail_msg("%.9g printed as %s reads back as %.9g", (double)v, b.data, (double)back);
    char ref[40];
    snprintf(ref, sizeof ref, "%.9g", (double)v);
    assert_true(b.len <= strlen(ref) + 1);
    sbuf_free(&b);
  }
  const struct {
    float v;
    const char *s;
  } hand[] = {{0.1f, "0.1"},
              {-2.5f, "-2.5"},
              {3e-8f, "3e-08"},
              {1.0f, "1"},
              {100.0f, "100"},
              {123456.0f, "123456"},
              {1e9f, "1e+09"},
              {0.0001f, "0.0001"},
              {1e-5f, "1e-05"},
              {16777216.0f, "16777216"},
              {0.33333334f, "0.33333334"},
              {-0.0f, "-0"}};
  for (size_t i = 0; i < sizeof hand / sizeof *hand; i++) {
    sbuf b;
    sbuf_init(&b);
    sbuf_f32(&b, hand[i].v);
    assert_string_equal(b.data, hand[i].s);
    sbuf_free(&b);
  }
}

/* ---- issue 10 (defects 4, 5, 6, 11) and issue 11 (strict parameters) ---- */

static char *many_inputs(int n, int dup_last) {
  char *b = malloc((size_t)n * 64 + 64);
  int o = sprintf(b, "{\"inputs\":[");
  for (int i = 0; i < n; i++)
    o += sprintf(b + o, "%s{\"name\":\"i%d\",\"shape\":[0],\"datatype\":\"BOOL\",\"data\":[]}",
                 i ? "," : "", dup_last && i == n - 1 ? 0 : i);
  sprintf(b + o, "]}");
  return b;
}

static int decode_lim(const char *body, const oip_limits *lim, oip_request *req, ts_err *err) {
  return oip_decode_ex(body, strlen(body), 0, lim, req, err);
}

/* Defect 4: duplicates are found through a set (any position), the input
 * count has a limit, and a decode stops once abandoned or past its
 * deadline instead of running to the end. */
static void test_many_inputs(void **s) {
  (void)s;
  oip_request req;
  ts_err err = {0};
  char *b = many_inputs(20000, 0);
  oip_limits lim = {0};
  assert_int_equal(decode_lim(b, &lim, &req, &err), 0);
  assert_int_equal(req.inputs.n, 20000);
  oip_request_free(&req);
  lim.max_inputs = 19999;
  assert_int_equal(decode_lim(b, &lim, &req, &err), -TS_ETOOBIG);
  assert_non_null(strstr(err.msg, "--max-inputs"));
  oip_request_free(&req);
  volatile int cancelled = 1;
  oip_limits cl = {.cancelled = &cancelled};
  assert_int_equal(decode_lim(b, &cl, &req, &err), -TS_ETIMEOUT);
  assert_int_equal(req.inputs.n, 0); /* stopped before the first input */
  oip_request_free(&req);
  oip_limits dl = {.deadline = 1e-9}; /* long past on the monotonic clock */
  assert_int_equal(decode_lim(b, &dl, &req, &err), -TS_ETIMEOUT);
  assert_non_null(strstr(err.msg, "deadline"));
  oip_request_free(&req);
  free(b);
  b = many_inputs(20000, 1);
  assert_int_equal(decode_lim(b, &lim, &req, &err), -TS_ETOOBIG);
  oip_request_free(&req);
  lim.max_inputs = 0;
  assert_int_equal(decode_lim(b, &lim, &req, &err), -TS_EINVAL);
  assert_non_null(strstr(err.msg, "input 'i0' appears twice"));
  oip_request_free(&req);
  free(b);
}

static const char *X23 =
    "\"inputs\":[{\"name\":\"x\",\"shape\":[2,3],\"datatype\":\"FP32\","
    "\"data\":[1,2,3,4,5,6]}]";

static void expect_fail_lim(const char *body, const oip_limits *lim, int status,
                            const char *needle) {
  oip_request req;
  ts_err err = {0};
  int rc = decode_lim(body, lim, &req, &err);
  if (rc != -status || !strstr(err.msg, needle))
    fail_msg("body %s: rc %d msg '%s' (wanted %d, '%s')", body, rc, err.msg, -status, needle);
  oip_request_free(&req);
}

/* Defect 5: an output named twice is a 400 (Triton's answer), the output
 * count has a limit, and the answer's size is refused before it is built. */
static void test_outputs_bounded(void **s) {
  (void)s;
  char body[512];
  snprintf(body, sizeof body,
           "{%s,\"outputs\":[{\"name\":\"y\"},{\"name\":\"z\"},{\"name\":\"y\"}]}", X23);
  expect_fail(body, TS_EINVAL, "output 'y' is requested twice");
  oip_limits lim = {.max_outputs = 2};
  expect_fail_lim(body, &lim, TS_ETOOBIG, "--max-outputs");
  /* the answer: one [1000, 16] FP32 output as JSON is at least 16000 numbers */
  ts_list outs;
  ts_list_init(&outs);
  ts_tensor *t = ts_list_add(&outs);
  int64_t sh[2] = {1000, 16};
  ts_err err = {0};
  assert_int_equal(ts_alloc(t, "y", TS_FP32, 2, sh, &err), 0);
  memset(t->data, 0, t->nbytes);
  oip_request req;
  snprintf(body, sizeof body, "{%s}", X23);
  oip_limits rl = {.max_response_bytes = 100000};
  assert_int_equal(decode_lim(body, &rl, &req, &err), 0);
  sbuf b;
  sbuf_init(&b);
  size_t jl;
  assert_int_equal(oip_encode("m", 1, &req, &outs, NULL, &b, &jl, &err), -TS_ETOOBIG);
  assert_non_null(strstr(err.msg, "--max-response-bytes"));
  assert_int_equal(b.len, 0); /* nothing was built */
  req.max_response_bytes = 1 << 20;
  assert_int_equal(oip_encode("m", 1, &req, &outs, NULL, &b, &jl, &err), 0);
  assert_true(b.len <= (size_t)req.max_response_bytes);
  sbuf_free(&b);
  oip_request_free(&req);
  ts_list_free(&outs);
}

/* Defect 6: the parse tree is bounded: by the pre-scan estimate (numbers)
 * and by the counted allocator (a long string the estimate cannot see). */
static void test_parse_memory(void **s) {
  (void)s;
  int n = 100000;
  char *b = malloc((size_t)n * 2 + 200);
  int o =
      sprintf(b, "{\"inputs\":[{\"name\":\"x\",\"shape\":[%d],\"datatype\":\"FP32\",\"data\":[", n);
  for (int i = 0; i < n; i++) o += sprintf(b + o, "%s0", i ? "," : "");
  sprintf(b + o, "]}]}");
  oip_limits lim = {.max_json_bytes = 1 << 20};
  expect_fail_lim(b, &lim, TS_ETOOBIG, "--max-json-memory");
  lim.max_json_bytes = 64 << 20;
  oip_request req;
  ts_err err = {0};
  assert_int_equal(decode_lim(b, &lim, &req, &err), 0);
  oip_request_free(&req);
  free(b);
  size_t len = 2 << 20;
  b = malloc(len + 200);
  o = sprintf(b, "{\"inputs\":[],\"parameters\":{\"p\":\"");
  memset(b + o, 'a', len);
  o += (int)len;
  sprintf(b + o, "\"}}");
  lim.max_json_bytes = 1 << 20;
  expect_fail_lim(b, &lim, TS_ETOOBIG, "--max-json-memory");
  lim.max_json_bytes = 8 << 20;
  assert_int_equal(decode_lim(b, &lim, &req, &err), 0);
  oip_request_free(&req);
  free(b);
}

/* Defect 11 and issue 11: types and names the protocol fixes are checked. */
static void test_strict_fields(void **s) {
  (void)s;
  char body[1024];
  const struct {
    const char *params, *in_params, *out_params, *needle;
  } bad[] = {
      {"{\"timeout_ms\":\"5\"}", NULL, NULL, "timeout_ms"},
      {"{\"timeout_ms\":-1}", NULL, NULL, "timeout_ms"},
      {"{\"timeout\":1.5}", NULL, NULL, "'timeout'"},
      {"{\"timeout\":5,\"timeout_ms\":5}", NULL, NULL, "both"},
      {"{\"binary_data_output\":\"yes\"}", NULL, NULL, "binary_data_output"},
      {"{\"sequence_start\":1}", NULL, NULL, "sequence_start"},
      {"{\"priority\":-2}", NULL, NULL, "priority"},
      {"{\"triton_enable_x\":true}", NULL, NULL, "reserved"},
      {NULL, "{\"binary_data\":true}", NULL, "unknown parameter 'binary_data'"},
      {NULL, "{\"shared_memory_region\":\"r\"}", NULL, "shared memory"},
      {NULL, "{\"binary_data_size\":24}", NULL, "not both"},
      {NULL, NULL, "{\"binary_data\":\"yes\"}", "'binary_data' must be true or false"},
      {NULL, NULL, "{\"binary\":true}", "unknown parameter 'binary' (accepted: binary_data, "},
      {NULL, NULL, "{\"classification\":-1}", "classification"},
      {NULL, NULL, "{\"classification\":2,\"class_count\":2}", "not both"},
  };
  for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
    snprintf(body, sizeof body,
             "{%s%s%s\"inputs\":[{\"name\":\"x\",\"shape\":[2,3],\"datatype\":\"FP32\",%s%s%s"
             "\"data\":[1,2,3,4,5,6]}],\"outputs\":[{\"name\":\"y\"%s%s}]}",
             bad[i].params ? "\"parameters\":" : "", bad[i].params ? bad[i].params : "",
             bad[i].params ? "," : "", bad[i].in_params ? "\"parameters\":" : "",
             bad[i].in_params ? bad[i].in_params : "", bad[i].in_params ? "," : "",
             bad[i].out_params ? ",\"parameters\":" : "",
             bad[i].out_params ? bad[i].out_params : "");
    expect_fail(body, TS_EINVAL, bad[i].needle);
  }
  /* Triton's timeout is microseconds from arrival; the protocol's names pass */
  snprintf(body, sizeof body,
           "{\"parameters\":{\"timeout\":250000000,\"sequence_id\":\"s1\","
           "\"sequence_start\":true,\"sequence_end\":false,\"priority\":1,\"headers\":{},"
           "\"binary_data_output\":true},%s}",
           X23);
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  double now = (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
  oip_limits lim = {.t_submit = now, .deadline = now + 60};
  oip_request req;
  ts_err err = {0};
  assert_int_equal(decode_lim(body, &lim, &req, &err), 0);
  assert_true(fabs(req.deadline - (now + 250)) < 1e-9);
  assert_int_equal(req.binary_default, 1);
  oip_request_free(&req);
  snprintf(body, sizeof body, "{\"parameters\":{\"timeout_ms\":5000},%s}", X23);
  assert_int_equal(decode_lim(body, &lim, &req, &err), 0);
  assert_true(fabs(req.deadline - (now + 5)) < 1e-9);
  oip_request_free(&req);
  assert_true(oip_is_request_param("timeout") && oip_is_request_param("sequence_id"));
  assert_false(oip_is_request_param("attention"));
}

/* Triton's classification extension: top k per row as "value:index". */
static void test_classification(void **s) {
  (void)s;
  ts_list outs;
  ts_list_init(&outs);
  ts_err err = {0};
  int64_t sh[2] = {2, 4};
  ts_tensor *t = ts_list_add(&outs);
  assert_int_equal(ts_alloc(t, "probs", TS_FP32, 2, sh, &err), 0);
  const float v[8] = {1.1f, 3.3f, 0.5f, 2.4f, 7, 7, -1, 8};
  memcpy(t->data, v, sizeof v);
  int64_t bs[1] = {2};
  t = ts_list_add(&outs);
  assert_int_equal(ts_alloc(t, "flags", TS_BOOL, 1, bs, &err), 0);
  memset(t->data, 1, 2);
  oip_request req;
  assert_int_equal(decode("{\"inputs\":[],\"outputs\":[{\"name\":\"probs\",\"parameters\":"
                          "{\"classification\":2}}]}",
                          &req, &err),
                   0);
  sbuf b;
  sbuf_init(&b);
  size_t jl;
  assert_int_equal(oip_encode("m", 1, &req, &outs, NULL, &b, &jl, &err), 0);
  assert_non_null(strstr(b.data,
                         "\"datatype\":\"BYTES\",\"shape\":[2,2],\"data\":"
                         "[\"3.300000:1\",\"2.400000:3\",\"8.000000:3\",\"7.000000:0\"]"));
  sbuf_free(&b);
  oip_request_free(&req);
  /* k above the class count: every class; binary: length-prefixed strings */
  assert_int_equal(decode("{\"inputs\":[],\"outputs\":[{\"name\":\"probs\",\"parameters\":"
                          "{\"class_count\":9,\"binary_data\":true}}]}",
                          &req, &err),
                   0);
  sbuf_init(&b);
  assert_int_equal(oip_encode("m", 1, &req, &outs, NULL, &b, &jl, &err), 0);
  assert_non_null(strstr(b.data, "\"shape\":[2,4]"));
  assert_true(jl > 0 && b.len > jl);
  uint32_t l0;
  memcpy(&l0, b.data + jl, 4);
  assert_int_equal(l0, strlen("3.300000:1"));
  assert_memory_equal(b.data + jl + 4, "3.300000:1", l0);
  sbuf_free(&b);
  oip_request_free(&req);
  assert_int_equal(decode("{\"inputs\":[],\"outputs\":[{\"name\":\"flags\",\"parameters\":"
                          "{\"classification\":1}}]}",
                          &req, &err),
                   0);
  sbuf_init(&b);
  assert_int_equal(oip_encode("m", 1, &req, &outs, NULL, &b, &jl, &err), -TS_EINVAL);
  assert_non_null(strstr(err.msg, "cannot be classified"));
  sbuf_free(&b);
  oip_request_free(&req);
  ts_list_free(&outs);
}

int main(void) {
  oip_json_alloc_init(); /* as tallyd does: the parse tree is counted */
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_every_datatype),
      cmocka_unit_test(test_flat_and_nested_agree),
      cmocka_unit_test(test_limits_and_values),
      cmocka_unit_test(test_shape_mismatches),
      cmocka_unit_test(test_structure_errors),
      cmocka_unit_test(test_binary_part),
      cmocka_unit_test(test_encode),
      cmocka_unit_test(test_float_text_round_trips),
      cmocka_unit_test(test_many_inputs),
      cmocka_unit_test(test_outputs_bounded),
      cmocka_unit_test(test_parse_memory),
      cmocka_unit_test(test_strict_fields),
      cmocka_unit_test(test_classification),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
