/* test_quantile_live.c - the quantile_ensemble kind's live state through
 * the model interface: an adaptive calibration's new weights loaded as a
 * version, observe (without and with the served answers) moving a_t by the
 * update rule, the state file written and read back by a second load, a
 * stored score tensor of the wrong shape refused by name, and every
 * allocation failing in turn in load and observe (an error value, never a
 * crash or a leak under ASan). */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include "../../daemon/base/fsutil.h"
#include "../../daemon/base/mem.h"
#include "../../daemon/base/rng.h"
#include "../../daemon/base/safetensors.h"
#include "../../daemon/models/model.h"

static const char *CFG =
    "{\"kind\":\"quantile_ensemble\",\"levels\":[0.1,0.5,0.9],"
    "\"bases\":[{\"external\":\"b\"}],\"conformal\":{\"window\":50}}";
enum { N = 200 };
static const double Z80 = 1.2815515655446004;

static void add_rows(ts_list *in, int n, double sd, uint64_t *r) {
  ts_err err = {0};
  int64_t sq[3] = {n, 1, 3}, sy[1] = {n};
  ts_tensor *q = ts_list_add(in);
  assert_int_equal(ts_alloc(q, "base_quantiles", TS_FP32, 3, sq, &err), 0);
  ts_tensor *y = ts_list_add(in);
  assert_int_equal(ts_alloc(y, "targets", TS_FP32, 1, sy, &err), 0);
  for (int i = 0; i < n; i++) {
    double x = 6 * rng_unif01(r) - 3;
    float *qq = (float *)q->data + i * 3;
    qq[0] = (float)(x - Z80);
    qq[1] = (float)x;
    qq[2] = (float)(x + Z80);
    ((float *)y->data)[i] = (float)(x + sd * rng_normal(r));
  }
}

static int load(const char *vdir, st_file *w, void **state, long fail_after, ts_err *err) {
  json_error_t je;
  json_t *cfg = json_loads(CFG, 0, &je);
  md_load_ctx ctx = {
      .model_name = "q", .version = 2, .version_dir = vdir, .config = cfg, .weights = w};
  tl_mem_fail_after(fail_after);
  int rc = md_kind_find("quantile_ensemble")->load(&ctx, state, err);
  tl_mem_fail_reset();
  json_decref(cfg);
  return rc;
}

static char dir[] = "/tmp/tallyd-test-qlive-XXXXXX";
static char wpath[256];

/* Version 1 (no weights) calibrated adaptively; the weights saved for version 2. */
static void make_adaptive(void) {
  assert_non_null(mkdtemp(dir));
  ts_err err = {0};
  void *s1;
  assert_int_equal(load(NULL, NULL, &s1, -1, &err), 0);
  ts_list in;
  ts_list_init(&in);
  uint64_t r = 5;
  add_rows(&in, N, 1.0, &r);
  md_call c;
  md_call_init(&c);
  c.inputs = &in;
  c.params =
      json_pack("{s:s, s:{s:f, s:i}}", "method", "cqr", "adaptive", "gamma", 0.01, "window", 100);
  int rc = md_kind_find("quantile_ensemble")->calibrate(s1, &c, &err);
  if (rc) fail_msg("calibrate: %s", err.msg);
  json_t *ad = json_object_get(json_object_get(c.result, "corrections"), "adaptive");
  assert_int_equal(json_integer_value(json_object_get(ad, "scores")), 100);
  snprintf(wpath, sizeof wpath, "%s/model.safetensors", dir);
  assert_int_equal(st_writer_save(c.new_weights, wpath, &err), 0);
  json_decref((json_t *)c.params);
  md_call_free(&c);
  ts_list_free(&in);
  md_kind_find("quantile_ensemble")->free(s1);
}

static void test_observe_and_state_file(void **st) {
  (void)st;
  make_adaptive();
  const md_kind *k = md_kind_find("quantile_ensemble");
  ts_err err = {0};
  st_file *w;
  assert_int_equal(st_open(&w, wpath, &err), 0);
  void *s2;
  assert_int_equal(load(dir, w, &s2, -1, &err), 0);
  /* 20 rows of twice the noise, observed as answered now */
  ts_list in;
  ts_list_init(&in);
  uint64_t r = 6;
  add_rows(&in, 20, 2.0, &r);
  md_call c;
  md_call_init(&c);
  c.inputs = &in;
  int rc = k->observe(s2, &c, NULL, &err);
  if (rc) fail_msg("observe: %s", err.msg);
  json_t *ad = json_object_get(c.result, "adaptive");
  int64_t miss = json_integer_value(json_array_get(json_object_get(ad, "misses"), 0));
  double at = json_real_value(json_array_get(json_object_get(ad, "alpha_t"), 0));
  /* a_t = 0.2 + 0.01 (20 * 0.2 - misses): at most 20 misses, never down to 0 */
  double want = 0.2 + 0.01 * (20 * 0.2 - (double)miss);
  assert_true(miss > 0);
  assert_true(fabs(at - want) < 1e-9);
  assert_int_equal(json_integer_value(json_object_get(c.result, "rows_in_window")), 20);
  assert_int_equal(json_integer_value(json_object_get(ad, "scores_taken")), 20);
  md_call_free(&c);
  /* with the served answers: a row far outside any interval is a miss */
  ts_list served;
  ts_list_init(&served);
  int64_t sh[2] = {1, 3}, sy[1] = {1};
  ts_tensor *o = ts_list_add(&served);
  assert_int_equal(ts_alloc(o, "quantiles", TS_FP32, 2, sh, &err), 0);
  ((float *)o->data)[0] = -1;
  ((float *)o->data)[1] = 0;
  ((float *)o->data)[2] = 1;
  ts_list in2;
  ts_list_init(&in2);
  ts_tensor *y = ts_list_add(&in2);
  assert_int_equal(ts_alloc(y, "targets", TS_FP64, 1, sy, &err), 0);
  ((double *)y->data)[0] = 100;
  md_call_init(&c);
  c.inputs = &in2;
  assert_int_equal(k->observe(s2, &c, &served, &err), 0);
  ad = json_object_get(c.result, "adaptive");
  assert_int_equal(json_integer_value(json_array_get(json_object_get(ad, "misses"), 0)), miss + 1);
  assert_int_equal(json_integer_value(json_object_get(ad, "scores_taken")), 20); /* no inputs */
  double at2 = json_real_value(json_array_get(json_object_get(ad, "alpha_t"), 0));
  assert_true(fabs(at2 - (at - 0.01 * 0.8)) < 1e-9);
  md_call_free(&c);
  /* a served answer of the wrong shape is refused by name */
  ((double *)y->data)[0] = 0;
  o->shape[1] = 2;
  md_call_init(&c);
  c.inputs = &in2;
  assert_int_equal(k->observe(s2, &c, &served, &err), -TS_EINVAL);
  assert_non_null(strstr(err.msg, "served answer"));
  md_call_free(&c);
  o->shape[1] = 3;
  ts_list_free(&in2);
  ts_list_free(&served);
  /* the state file: a second load of the version starts where this one is */
  char state[300];
  snprintf(state, sizeof state, "%s/.adaptive.safetensors", dir);
  struct stat sb;
  assert_int_equal(stat(state, &sb), 0);
  void *s3;
  assert_int_equal(load(dir, w, &s3, -1, &err), 0);
  md_call_init(&c);
  c.inputs = &in;
  c.params = json_pack("{s:b}", "observe", 0);
  assert_int_equal(k->evaluate(s3, &c, &err), 0);
  ad = json_object_get(json_object_get(c.result, "live"), "adaptive");
  assert_true(fabs(json_real_value(json_array_get(json_object_get(ad, "alpha_t"), 0)) - at2) <
              1e-12);
  assert_int_equal(json_integer_value(json_object_get(ad, "rows")), 21);
  json_decref((json_t *)c.params);
  md_call_free(&c);
  k->free(s3);
  k->free(s2);
  ts_list_free(&in);
  st_close(w);
}

/* Every allocation failing in turn, in load (with the state file) and in
 * observe: an error value each time, and success once enough pass. */
static void test_alloc_failures(void **st) {
  (void)st;
  const md_kind *k = md_kind_find("quantile_ensemble");
  ts_err err = {0};
  st_file *w;
  assert_int_equal(st_open(&w, wpath, &err), 0);
  long n;
  for (n = 0;; n++) {
    void *s = NULL;
    ts_err e = {0};
    int rc = load(dir, w, &s, n, &e);
    if (rc == 0) {
      k->free(s);
      break;
    }
    if (!(rc < 0 && e.msg[0])) fail_msg("load, failure %ld: rc %d", n, rc);
    if (n > 5000) fail_msg("load never succeeded: %s", e.msg);
  }
  print_message("load: %ld allocation points\n", n);
  void *s;
  assert_int_equal(load(dir, w, &s, -1, &err), 0);
  ts_list in;
  ts_list_init(&in);
  uint64_t r = 8;
  add_rows(&in, 10, 1.0, &r);
  for (n = 0;; n++) {
    md_call c;
    md_call_init(&c);
    c.inputs = &in;
    ts_err e = {0};
    tl_mem_fail_after(n);
    int rc = k->observe(s, &c, NULL, &e);
    tl_mem_fail_reset();
    md_call_free(&c);
    if (rc == 0) break;
    if (!(rc < 0 && e.msg[0])) fail_msg("observe, failure %ld: rc %d", n, rc);
    if (n > 5000) fail_msg("observe never succeeded: %s", e.msg);
  }
  print_message("observe: %ld allocation points\n", n);
  ts_list_free(&in);
  k->free(s);
  st_close(w);
}

/* A stored score tensor that does not match the levels is refused by name. */
static void test_bad_scores_refused(void **st) {
  (void)st;
  ts_err err = {0};
  st_file *w0;
  assert_int_equal(st_open(&w0, wpath, &err), 0);
  st_writer *wr = st_writer_new();
  for (int i = 0; i < st_count(w0); i++) {
    ts_tensor t;
    assert_int_equal(st_get(w0, st_name(w0, i), &t, &err), 0);
    if (strcmp(st_name(w0, i), "conformal.scores") == 0) t.shape[0] = 2, t.shape[1] = 50;
    assert_int_equal(st_writer_add(wr, st_name(w0, i), t.dtype, t.ndim, t.shape, t.data, &err), 0);
    ts_free(&t);
  }
  for (int i = 0; i < st_meta_count(w0); i++)
    assert_int_equal(st_writer_meta(wr, st_meta_key(w0, i), st_meta_value(w0, i), &err), 0);
  char bad[300];
  snprintf(bad, sizeof bad, "%s/bad.safetensors", dir);
  assert_int_equal(st_writer_save(wr, bad, &err), 0);
  st_writer_free(wr);
  st_close(w0);
  st_file *w;
  assert_int_equal(st_open(&w, bad, &err), 0);
  void *s;
  assert_int_equal(load(NULL, w, &s, -1, &err), -TS_EINVAL);
  assert_non_null(strstr(err.msg, "conformal.scores"));
  st_close(w);
  char cmd[400];
  snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
  assert_int_equal(system(cmd), 0);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_observe_and_state_file),
      cmocka_unit_test(test_alloc_failures),
      cmocka_unit_test(test_bad_scores_refused),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
