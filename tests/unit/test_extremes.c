/* test_extremes.c - numbers at the ends of their ranges, below HTTP: the
 * finite-output rule every infer answer passes (md_check_finite_outputs),
 * config.json's max_batch, the attention kind's and kernel's query_offset
 * near INT64_MAX (signed overflow before the fix; UBSan under make SAN=1),
 * and the attention kind's max_sequence_length bound. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "../../daemon/base/mem.h"
#include "../../daemon/kernels/attn.h"
#include "../../daemon/models/model.h"

static void add_f32(md_call *c, const char *name, const float *v, int n) {
  int64_t sh[1] = {n};
  ts_err err = {0};
  float *y = md_output(c, name, TS_FP32, 1, sh, &err);
  assert_non_null(y);
  memcpy(y, v, sizeof(float) * (size_t)n);
}

static void test_finite_outputs(void **state) {
  (void)state;
  ts_err err = {0};
  md_call c;
  md_call_init(&c);
  float ok[3] = {3.4e38f, -3.4e38f, 0.0f};
  add_f32(&c, "fine", ok, 3);
  assert_int_equal(md_check_finite_outputs(&c, &err), 0);
  float bad[3] = {1.0f, INFINITY, 2.0f};
  add_f32(&c, "scores", bad, 3);
  assert_int_equal(md_check_finite_outputs(&c, &err), -TS_EINVAL);
  assert_non_null(strstr(err.msg, "'scores' element 1 is +inf"));
  assert_non_null(strstr(err.msg, "overflow"));
  c.infinite_ok = 1; /* documented infinities (allow_infinite) pass... */
  assert_int_equal(md_check_finite_outputs(&c, &err), 0);
  float nan[2] = {-INFINITY, NAN};
  add_f32(&c, "worse", nan, 2);
  assert_int_equal(md_check_finite_outputs(&c, &err), -TS_EINVAL); /* ...NaN never */
  assert_non_null(strstr(err.msg, "'worse' element 1 is NaN"));
  md_call_free(&c);

  /* FP64 and integer outputs: only floating-point types are checked */
  md_call_init(&c);
  int64_t sh[1] = {2};
  double *d = md_output(&c, "d", TS_FP64, 1, sh, &err);
  int64_t *i = md_output(&c, "i", TS_INT64, 1, sh, &err);
  d[0] = 1e308;
  d[1] = 1e308 * 10;
  i[0] = INT64_MAX;
  i[1] = INT64_MIN;
  assert_int_equal(md_check_finite_outputs(&c, &err), -TS_EINVAL);
  assert_non_null(strstr(err.msg, "'d' element 1"));
  d[1] = -1e308;
  assert_int_equal(md_check_finite_outputs(&c, &err), 0);
  md_call_free(&c);
}

static json_t *cfg(const char *text) {
  json_error_t je;
  json_t *j = json_loads(text, 0, &je);
  assert_non_null(j);
  return j;
}

static void test_max_batch(void **state) {
  (void)state;
  const char *bad[] = {"{\"max_batch\": 1e300}",
                       "{\"max_batch\": -1}",
                       "{\"max_batch\": \"x\"}",
                       "{\"max_batch\": 2147483649}",
                       "{\"max_batch\": 9223372036854775807}",
                       "{\"max_batch\": 1.5}"};
  for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
    json_t *j = cfg(bad[i]);
    ts_err err = {0};
    assert_int_equal(md_config_check_keys(j, NULL, &err), -TS_EINVAL);
    assert_non_null(strstr(err.msg, "max_batch"));
    assert_int_equal(md_config_check_common(j, &err), -TS_EINVAL);
    json_decref(j);
  }
  const char *good[] = {"{\"max_batch\": 0}", "{\"max_batch\": 16}", "{\"max_batch\": 2147483648}",
                        "{}"};
  for (size_t i = 0; i < sizeof good / sizeof *good; i++) {
    json_t *j = cfg(good[i]);
    ts_err err = {0};
    assert_int_equal(md_config_check_keys(j, NULL, &err), 0);
    json_decref(j);
  }
}

/* The attention kind over 3-D [H, L, d] inputs of one head, L = 2, d = 2. */
static int att_infer(void *st, const char *params, ts_err *err) {
  const md_kind *k = md_kind_find("attention");
  ts_list in;
  ts_list_init(&in);
  const char *names[3] = {"query", "key", "value"};
  int64_t sh[3] = {1, 2, 2};
  for (int i = 0; i < 3; i++) {
    ts_tensor *t = ts_list_add(&in);
    assert_int_equal(ts_alloc(t, names[i], TS_FP32, 3, sh, err), 0);
    for (int e = 0; e < 4; e++) ((float *)t->data)[e] = 0.25f * (float)(e + i);
  }
  json_t *p = params ? cfg(params) : NULL;
  md_call c;
  md_call_init(&c);
  c.inputs = &in;
  c.params = p;
  int rc = k->infer(st, &c, err);
  if (!rc) assert_int_equal(md_check_finite_outputs(&c, err), 0);
  md_call_free(&c);
  json_decref(p);
  ts_list_free(&in);
  return rc;
}

static void test_attention_query_offset(void **state) {
  (void)state;
  const md_kind *k = md_kind_find("attention");
  assert_non_null(k);
  ts_err err = {0};
  void *st = NULL;
  /* max_sequence_length: bounded at load */
  json_t *big = cfg("{\"kind\": \"attention\", \"max_sequence_length\": 9223372036854775807}");
  md_load_ctx ctx = {.model_name = "a", .version = 1, .config = big};
  assert_int_equal(k->load(&ctx, &st, &err), -TS_EINVAL);
  assert_non_null(strstr(err.msg, "max_sequence_length"));
  json_decref(big);
  json_t *c = cfg("{\"kind\": \"attention\", \"max_sequence_length\": 8}");
  ctx.config = c;
  assert_int_equal(k->load(&ctx, &st, &err), 0);

  const char *refused[] = {
      "{\"causal\": true, \"query_offset\": 9223372036854775807}",
      "{\"causal\": true, \"query_offset\": 9223372036854775806}",
      "{\"causal\": false, \"query_offset\": 9223372036854775807}",
      "{\"causal\": false, \"query_offset\": 9223372036854775807, \"attention\": \"lssar\"}",
      "{\"causal\": false, \"query_offset\": 9223372036854775807, \"attention\": \"lssa\"}",
      "{\"causal\": false, \"query_offset\": 7}",
      "{\"causal\": false, \"query_offset\": -9223372036854775808}",
      "{\"causal\": false, \"query_offset\": 1e300}",
  };
  for (size_t i = 0; i < sizeof refused / sizeof *refused; i++) {
    assert_int_equal(att_infer(st, refused[i], &err), -TS_EINVAL);
    assert_non_null(strstr(err.msg, "query_offset"));
  }
  /* the last positions that fit: 6 and 7 of max_sequence_length 8 */
  assert_int_equal(att_infer(st,
                             "{\"causal\": false, \"query_offset\": 6, \"attention\": "
                             "\"lssar\"}",
                             &err),
                   0);
  assert_int_equal(att_infer(st, NULL, &err), 0);
  k->free(st);
  json_decref(c);
}

/* The kernel's own check, for callers other than the kind. */
static void test_kernel_query_offset(void **state) {
  (void)state;
  float q[4] = {0.1f, 0.2f, 0.3f, 0.4f}, y[4];
  attn_tensor t = {q, 4, 2};
  attn_out o = {y, 4, 2};
  ts_err err = {0};
  for (int v = 0; v < 3; v++) {
    attn_params p = attn_params_default((attn_variant)v);
    p.causal = 0;
    p.query_offset = INT64_MAX;
    assert_int_equal(attn_forward(NULL, &p, 1, 1, 2, 2, 2, 2, t, t, t, o, &err), -TS_EINVAL);
    assert_non_null(strstr(err.msg, "query_offset"));
    p.query_offset = INT64_MAX - 2; /* positions up to INT64_MAX - 1, and their end, fit */
    assert_int_equal(attn_check_args(&p, 1, 1, 2, 2, 2, 2, t, t, t, o, &err), 0);
  }
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_finite_outputs),
      cmocka_unit_test(test_max_batch),
      cmocka_unit_test(test_attention_query_offset),
      cmocka_unit_test(test_kernel_query_offset),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
