/* test_ensemble_kind.c - the `ensemble` kind through the model interface:
 * config validation messages, infer from member_outputs against the
 * two-tier formula worked out here, hosted members through a fake md_host
 * (every acquire released, unavailable members keep 503), fit's new weights
 * and version info, a fit stopped between epochs when the call is abandoned,
 * and every allocation failing in turn (an error value, never a crash or a
 * leak under ASan). */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "../../daemon/base/mem.h"
#include "../../daemon/base/safetensors.h"
#include "../../daemon/models/model.h"

/* ---- a fake member kind: output [B, 1] = scale * features[:, 0] ------------ */

static int fake_load(const md_load_ctx *ctx, void **state, ts_err *err) {
  (void)ctx;
  (void)err;
  *state = NULL;
  return 0;
}
static void fake_sig(void *s, md_sig *sig) {
  (void)s;
  memset(sig, 0, sizeof *sig);
}
static int fake_infer(void *state, md_call *c, ts_err *err) {
  double scale = *(const double *)state;
  const ts_tensor *t;
  int rc = md_input(c, "features", &t, err);
  if (rc) return rc;
  int64_t sh[2] = {t->shape[0], 1};
  float *y = md_output(c, "output", TS_FP32, 2, sh, err);
  if (!y) return -TS_ENOMEM;
  for (int64_t b = 0; b < t->shape[0]; b++)
    y[b] = (float)(scale * ((const float *)t->data)[b * t->shape[1]]);
  return 0;
}
static void fake_free(void *s) {
  (void)s;
}
static const md_kind fake_kind = {.name = "fake",
                                  .load = fake_load,
                                  .signature = fake_sig,
                                  .infer = fake_infer,
                                  .free = fake_free};

static double scales[3] = {1.0, -0.5, 2.0};
static int acquired;

static int host_acquire(md_host *h, const char *model, void **handle, const md_kind **kind,
                        void **state, ts_err *err) {
  (void)h;
  if (strcmp(model, "down") == 0)
    return ts_errf(err, TS_EUNAVAIL, "model 'down' has no ready version");
  if (strcmp(model, "gone") == 0) return ts_errf(err, TS_ENOTFOUND, "unknown model 'gone'");
  if (strncmp(model, "m", 1) != 0 || model[1] < '1' || model[1] > '3')
    return ts_errf(err, TS_ENOTFOUND, "unknown model '%s'", model);
  __atomic_add_fetch(&acquired, 1, __ATOMIC_SEQ_CST);
  *handle = (void *)model;
  *kind = &fake_kind;
  *state = &scales[model[1] - '1'];
  return 0;
}
static void host_release(md_host *h, void *handle) {
  (void)h;
  (void)handle;
  __atomic_sub_fetch(&acquired, 1, __ATOMIC_SEQ_CST);
}
static md_host host = {.acquire = host_acquire, .release = host_release};

/* ---- helpers ------------------------------------------------------------------ */

/* fail_after >= 0: allocations fail after that many, inside load only */
static int load_cfg_faulty(const char *cfg, st_file *w, void **state, long fail_after,
                           ts_err *err) {
  json_error_t je;
  json_t *config = json_loads(cfg, 0, &je);
  assert_non_null(config);
  md_load_ctx ctx = {
      .model_name = "ens", .version = 1, .config = config, .weights = w, .host = &host};
  const md_kind *k = md_kind_find("ensemble");
  assert_non_null(k);
  tl_mem_fail_after(fail_after);
  int rc = k->load(&ctx, state, err);
  tl_mem_fail_reset();
  json_decref(config);
  return rc;
}

static int load_cfg(const char *cfg, st_file *w, void **state, ts_err *err) {
  return load_cfg_faulty(cfg, w, state, -1, err);
}

static void add_f32(ts_list *in, const char *name, int ndim, const int64_t *shape, const float *v) {
  ts_err err = {0};
  ts_tensor *t = ts_list_add(in);
  assert_non_null(t);
  assert_int_equal(ts_alloc(t, name, TS_FP32, ndim, shape, &err), 0);
  memcpy(t->data, v, t->nbytes);
}

static void add_i32(ts_list *in, const char *name, int64_t n, const int32_t *v) {
  ts_err err = {0};
  ts_tensor *t = ts_list_add(in);
  assert_non_null(t);
  assert_int_equal(ts_alloc(t, name, TS_INT32, 1, &n, &err), 0);
  memcpy(t->data, v, t->nbytes);
}

static double sig(double z) {
  return 1.0 / (1.0 + exp(-z));
}

static const char *BIN3 =
    "{\"kind\":\"ensemble\",\"member_output\":\"logit\",\"families\":["
    "{\"name\":\"a\",\"members\":[{\"model\":\"m1\"}]},"
    "{\"name\":\"b\",\"members\":[{\"model\":\"m2\"},{\"model\":\"m3\"}]}]}";

/* ---- tests --------------------------------------------------------------------- */

static void test_config_errors(void **st) {
  (void)st;
  static const struct {
    const char *cfg, *want;
  } cases[] = {
      {"{\"kind\":\"ensemble\",\"families\":[]}", "member_output"},
      {"{\"kind\":\"ensemble\",\"member_output\":\"logit\",\"families\":[]}", "'families'"},
      {"{\"kind\":\"ensemble\",\"member_output\":\"logit\",\"classes\":0,\"families\":[]}",
       "'classes'"},
      {"{\"kind\":\"ensemble\",\"member_output\":\"logit\",\"extra\":1}", "unknown key 'extra'"},
      {"{\"kind\":\"ensemble\",\"member_output\":\"logit\",\"families\":[{\"name\":\"a\","
       "\"members\":[]}]}",
       "non-empty list 'members'"},
      {"{\"kind\":\"ensemble\",\"member_output\":\"logit\",\"families\":[{\"members\":"
       "[{\"model\":\"m1\"}]}]}",
       "'name'"},
      {"{\"kind\":\"ensemble\",\"member_output\":\"logit\",\"families\":[{\"name\":\"a\","
       "\"members\":[{\"model\":\"m1\",\"external\":\"x\"}]}]}",
       "{\"model\""},
      {"{\"kind\":\"ensemble\",\"member_output\":\"logit\",\"families\":[{\"name\":\"a\","
       "\"members\":[{\"model\":\"m1\"}]},{\"name\":\"a\",\"members\":[{\"model\":\"m2\"}]}]}",
       "used twice"},
      {"{\"kind\":\"ensemble\",\"member_output\":\"logit\",\"families\":[{\"name\":\"a\","
       "\"members\":[{\"model\":\"m1\"},{\"external\":\"m1\"}]}]}",
       "listed twice"},
      {"{\"kind\":\"ensemble\",\"member_output\":\"logit\",\"families\":[{\"name\":\"a\","
       "\"members\":[{\"model\":\"ens\"}]}]}",
       "its own member"},
      {"{\"kind\":\"ensemble\",\"member_output\":\"logit\",\"threshold\":2,\"families\":[]}",
       "'threshold'"},
      {"{\"kind\":\"ensemble\",\"member_output\":\"logit\",\"families\":[{\"name\":\"a\","
       "\"members\":[{\"modle\":\"m1\"}]}]}",
       "unknown key 'modle'"},
  };
  for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
    void *state = NULL;
    ts_err err = {0};
    int rc = load_cfg(cases[i].cfg, NULL, &state, &err);
    if (rc != -TS_EINVAL || !strstr(err.msg, cases[i].want))
      fail_msg("case %zu: rc %d, message '%s' lacks '%s'", i, rc, err.msg, cases[i].want);
  }
}

/* theta = [0.4, -0.4] from a weights file; member outputs sent by the caller */
static void test_infer_member_outputs(void **st) {
  (void)st;
  ts_err err = {0};
  st_writer *w = st_writer_new();
  float th[2] = {0.4f, -0.4f};
  int64_t two = 2;
  assert_int_equal(st_writer_add(w, "tier2.logits", TS_FP32, 1, &two, th, &err), 0);
  char path[] = "/tmp/tallyd-test-ens-XXXXXX";
  close(mkstemp(path));
  assert_int_equal(st_writer_save(w, path, &err), 0);
  st_writer_free(w);
  st_file *f;
  assert_int_equal(st_open(&f, path, &err), 0);
  void *state;
  assert_int_equal(load_cfg(BIN3, f, &state, &err), 0);
  const md_kind *k = md_kind_find("ensemble");

  float z[2 * 3] = {0.5f, -1.0f, 2.0f, -0.2f, 0.3f, 0.0f};
  ts_list in;
  ts_list_init(&in);
  int64_t sh[2] = {2, 3};
  add_f32(&in, "member_outputs", 2, sh, z);
  md_call c;
  md_call_init(&c);
  c.inputs = &in;
  c.host = &host;
  assert_int_equal(k->infer(state, &c, &err), 0);
  assert_int_equal(c.outputs.n, 2);
  const float *p = c.outputs.items[0].data, *fp = c.outputs.items[1].data;
  double a0 = exp(0.4) / (exp(0.4) + exp(-0.4)), a1 = 1 - a0;
  for (int b = 0; b < 2; b++) {
    double Pa = sig(z[b * 3]), Pb = (sig(z[b * 3 + 1]) + sig(z[b * 3 + 2])) / 2;
    assert_true(fabs(fp[b * 2] - Pa) < 1e-6 && fabs(fp[b * 2 + 1] - Pb) < 1e-6);
    assert_true(fabs(p[b] - (a0 * Pa + a1 * Pb)) < 1e-6);
  }
  md_call_free(&c);
  ts_list_free(&in);

  /* NaN names the row and member; a wrong count names the expected shape */
  z[4] = NAN;
  ts_list_init(&in);
  add_f32(&in, "member_outputs", 2, sh, z);
  md_call_init(&c);
  c.inputs = &in;
  assert_int_equal(k->infer(state, &c, &err), -TS_EINVAL);
  assert_non_null(strstr(err.msg, "input 'member_outputs': row 1, member 1 ('m2', family 'b')"));
  assert_non_null(strstr(err.msg, "NaN"));
  md_call_free(&c);
  ts_list_free(&in);
  int64_t sh2[2] = {3, 2};
  ts_list_init(&in);
  add_f32(&in, "member_outputs", 2, sh2, z);
  md_call_init(&c);
  c.inputs = &in;
  assert_int_equal(k->infer(state, &c, &err), -TS_EINVAL);
  assert_non_null(strstr(err.msg, "expected shape [B, 3]"));
  md_call_free(&c);
  ts_list_free(&in);

  k->free(state);
  st_close(f);
  unlink(path);
}

static void run_hosted(const char *cfg, int want_rc, const char *want_msg) {
  ts_err err = {0};
  void *state;
  assert_int_equal(load_cfg(cfg, NULL, &state, &err), 0);
  const md_kind *k = md_kind_find("ensemble");
  float x[4 * 2] = {1, 9, -2, 9, 0.5f, 9, 0, 9};
  ts_list in;
  ts_list_init(&in);
  int64_t sh[2] = {4, 2};
  add_f32(&in, "features", 2, sh, x);
  md_call c;
  md_call_init(&c);
  c.inputs = &in;
  c.host = &host;
  int rc = k->infer(state, &c, &err);
  assert_int_equal(rc, want_rc);
  if (rc) {
    if (!strstr(err.msg, want_msg)) fail_msg("'%s' lacks '%s'", err.msg, want_msg);
  } else {
    const float *p = c.outputs.items[0].data;
    for (int b = 0; b < 4; b++) {
      double x0 = x[b * 2];
      double Pa = sig(scales[0] * x0), Pb = (sig(scales[1] * x0) + sig(scales[2] * x0)) / 2;
      assert_true(fabs(p[b] - (Pa + Pb) / 2) < 1e-6);
    }
  }
  assert_int_equal(acquired, 0);
  md_call_free(&c);
  ts_list_free(&in);
  k->free(state);
}

static void test_infer_hosted(void **st) {
  (void)st;
  run_hosted(BIN3, 0, NULL);
  run_hosted(
      "{\"kind\":\"ensemble\",\"member_output\":\"logit\",\"families\":["
      "{\"name\":\"a\",\"members\":[{\"model\":\"m1\"},{\"model\":\"down\"}]}]}",
      -TS_EUNAVAIL, "member 'down' is unavailable");
  /* a member missing from the repository leaves the ensemble unavailable, not unknown */
  run_hosted(
      "{\"kind\":\"ensemble\",\"member_output\":\"logit\",\"families\":["
      "{\"name\":\"a\",\"members\":[{\"model\":\"gone\"}]}]}",
      -TS_EUNAVAIL, "member 'gone' is unavailable: unknown model 'gone'");
  run_hosted(
      "{\"kind\":\"ensemble\",\"member_output\":\"logit\",\"families\":["
      "{\"name\":\"a\",\"members\":[{\"model\":\"m1\"},{\"external\":\"x\"}]}]}",
      -TS_EINVAL, "member 'x' is external");
  /* the fake members output [B, 1]: a 3-class ensemble refuses that shape */
  run_hosted(
      "{\"kind\":\"ensemble\",\"member_output\":\"logit\",\"classes\":3,\"families\":["
      "{\"name\":\"a\",\"members\":[{\"model\":\"m1\"}]}]}",
      -TS_EINVAL, "member 'm1': output 'output' has shape [4, 1]");
}

/* One fit: returns its status; *c keeps the outputs for the caller to check. */
static int fit_once(void *state, md_call *c, ts_list *in, const volatile int *cancelled,
                    ts_err *err) {
  enum { N = 64 };
  static float z[N * 3];
  static int32_t lab[N];
  for (int b = 0; b < N; b++) {
    lab[b] = b % 2;
    double s = lab[b] ? 1.0 : -1.0;
    z[b * 3] = (float)(2.0 * s + 0.1 * ((b * 7) % 5 - 2)); /* family a knows */
    z[b * 3 + 1] = (float)(0.3 * ((b * 3) % 7 - 3));
    z[b * 3 + 2] = (float)(0.2 * ((b * 5) % 3 - 1));
  }
  ts_list_init(in);
  int64_t sh[2] = {N, 3};
  add_f32(in, "member_outputs", 2, sh, z);
  add_i32(in, "labels", N, lab);
  md_call_init(c);
  c->inputs = in;
  c->params = json_pack("{s:i, s:f, s:i}", "epochs", 50, "learning_rate", 0.1, "seed", 2);
  c->cancelled = cancelled;
  const md_kind *k = md_kind_find("ensemble");
  int rc = k->fit(state, c, err);
  json_decref((json_t *)c->params);
  c->params = NULL;
  return rc;
}

static void test_fit(void **st) {
  (void)st;
  ts_err err = {0};
  void *state;
  assert_int_equal(load_cfg(BIN3, NULL, &state, &err), 0);
  md_call c;
  ts_list in;
  int rc = fit_once(state, &c, &in, NULL, &err);
  if (rc) fail_msg("fit: %s", err.msg);
  assert_non_null(c.new_weights);
  json_t *alpha = json_object_get(json_object_get(c.result, "weights"), "alpha");
  assert_int_equal(json_array_size(alpha), 2);
  assert_true(json_real_value(json_array_get(alpha, 0)) > 0.6);
  json_t *m = json_object_get(c.result, "metrics");
  assert_true(json_real_value(json_object_get(json_object_get(m, "after"), "log_loss")) <
              json_real_value(json_object_get(json_object_get(m, "before"), "log_loss")));
  assert_non_null(json_object_get(json_object_get(m, "families"), "a"));
  const char *sha = json_string_value(json_object_get(c.new_version_info, "sha256_training_data"));
  assert_non_null(sha);
  assert_int_equal(strlen(sha), 64);
  assert_int_equal(json_integer_value(json_object_get(c.new_version_info, "rows")), 64);
  assert_int_equal(
      json_integer_value(json_object_get(json_object_get(c.new_version_info, "fit"), "epochs")),
      50);
  /* the same request hashes the same */
  char first[65];
  snprintf(first, sizeof first, "%s", sha);
  md_call_free(&c);
  ts_list_free(&in);
  assert_int_equal(fit_once(state, &c, &in, NULL, &err), 0);
  assert_string_equal(
      json_string_value(json_object_get(c.new_version_info, "sha256_training_data")), first);
  md_call_free(&c);
  ts_list_free(&in);

  /* an abandoned call stops after its first epoch, with no weights */
  volatile int cancelled = 1;
  assert_int_equal(fit_once(state, &c, &in, &cancelled, &err), -TS_ETIMEOUT);
  assert_non_null(strstr(err.msg, "abandoned"));
  assert_null(c.new_weights);
  md_call_free(&c);
  ts_list_free(&in);
  md_kind_find("ensemble")->free(state);
}

/* calibrate: temperature scaling of overconfident members. The new weights
 * hold theta unchanged and calibration.temperature; a version loaded from
 * them serves sigmoid(logit(y) / T) and its evaluate shows a lower ECE. */
static void test_calibrate_temperature(void **st) {
  (void)st;
  ts_err err = {0};
  void *state;
  assert_int_equal(load_cfg(BIN3, NULL, &state, &err), 0);
  const md_kind *k = md_kind_find("ensemble");
  enum { N = 400 };
  static float z[N * 3];
  static int32_t lab[N];
  uint64_t r = 5;
  for (int b = 0; b < N; b++) {
    double t = 4 * (double)((r = r * 6364136223846793005ull + 1442695040888963407ull) >> 11) /
                   9007199254740992.0 -
               2;
    double u = (double)((r = r * 6364136223846793005ull + 1442695040888963407ull) >> 11) /
               9007199254740992.0;
    lab[b] = u < 1 / (1 + exp(-t));
    z[b * 3] = z[b * 3 + 1] = z[b * 3 + 2] = (float)(4 * t); /* four times too sure */
  }
  ts_list in;
  ts_list_init(&in);
  int64_t sh[2] = {N, 3};
  add_f32(&in, "member_outputs", 2, sh, z);
  add_i32(&in, "labels", N, lab);
  md_call c;
  md_call_init(&c);
  c.inputs = &in;
  c.params = json_pack("{s:s, s:i}", "method", "temperature", "ece_bins", 10);
  int rc = k->calibrate(state, &c, &err);
  if (rc) fail_msg("calibrate: %s", err.msg);
  double T =
      json_real_value(json_object_get(json_object_get(c.result, "calibration"), "temperature"));
  assert_true(T > 2.5 && T < 6);
  json_t *rel = json_object_get(c.result, "reliability");
  double ece0 = json_real_value(json_object_get(json_object_get(rel, "before"), "ece"));
  double ece1 = json_real_value(json_object_get(json_object_get(rel, "after"), "ece"));
  assert_true(ece1 < ece0);
  assert_int_equal(json_array_size(json_object_get(json_object_get(rel, "after"), "reliability")),
                   10);
  json_t *m = json_object_get(c.result, "metrics");
  assert_true(json_real_value(json_object_get(json_object_get(m, "after"), "log_loss")) <
              json_real_value(json_object_get(json_object_get(m, "before"), "log_loss")));
  assert_non_null(json_object_get(c.new_version_info, "sha256_calibration_data"));
  char path[] = "/tmp/tallyd-test-ens-XXXXXX";
  close(mkstemp(path));
  assert_int_equal(st_writer_save(c.new_weights, path, &err), 0);
  json_decref((json_t *)c.params);
  md_call_free(&c);
  st_file *f;
  assert_int_equal(st_open(&f, path, &err), 0);
  void *s2;
  assert_int_equal(load_cfg(BIN3, f, &s2, &err), 0);
  /* infer: uniform theta, one row whose members all say logit 2 */
  float z1[3] = {2, 2, 2};
  ts_list in1;
  ts_list_init(&in1);
  int64_t sh1[2] = {1, 3};
  add_f32(&in1, "member_outputs", 2, sh1, z1);
  md_call_init(&c);
  c.inputs = &in1;
  assert_int_equal(k->infer(s2, &c, &err), 0);
  double got = ((const float *)c.outputs.items[0].data)[0];
  assert_true(fabs(got - sig(2.0 / (float)T)) < 1e-6);
  md_call_free(&c);
  ts_list_free(&in1);
  /* evaluate on the same rows: the served ECE is calibrate's "after" */
  md_call_init(&c);
  c.inputs = &in;
  c.params = json_pack("{s:i}", "ece_bins", 10);
  assert_int_equal(k->evaluate(s2, &c, &err), 0);
  json_t *cal = json_object_get(c.result, "calibration");
  assert_true(fabs(json_real_value(json_object_get(cal, "ece")) - ece1) < 1e-9);
  assert_true(fabs(json_real_value(json_object_get(cal, "temperature")) - T) < 1e-12);
  json_decref((json_t *)c.params);
  md_call_free(&c);
  /* refusals by name */
  md_call_init(&c);
  c.inputs = &in;
  c.params = json_pack("{s:s}", "method", "isotonic");
  assert_int_equal(k->calibrate(s2, &c, &err), -TS_EINVAL);
  assert_non_null(strstr(err.msg, "isotonic"));
  json_decref((json_t *)c.params);
  c.params = json_pack("{s:i}", "ece_bins", 0);
  assert_int_equal(k->evaluate(s2, &c, &err), -TS_EINVAL);
  assert_non_null(strstr(err.msg, "ece_bins"));
  json_decref((json_t *)c.params);
  md_call_free(&c);
  ts_list_free(&in);
  k->free(s2);
  st_close(f);
  unlink(path);
  k->free(state);
}

/* Every allocation failing in turn (load, then infer on hosted members, then
 * fit, each from its first allocation on): an error value each time, no
 * leak, every member released, and success once enough allocations pass. */
static int faulty_call(int which, long n, ts_err *err) {
  const md_kind *k = md_kind_find("ensemble");
  void *state = NULL;
  int rc = load_cfg_faulty(BIN3, NULL, &state, which == 0 ? n : -1, err);
  if (rc) return rc;
  if (which == 0) {
    k->free(state);
    return 0;
  }
  enum { N = 64 };
  float z[N * 3], x[N * 2];
  int32_t lab[N];
  for (int b = 0; b < N; b++) {
    lab[b] = b % 2;
    z[b * 3] = lab[b] ? 1.0f : -1.0f;
    z[b * 3 + 1] = z[b * 3 + 2] = 0.1f * (float)(b % 3);
    x[b * 2] = z[b * 3];
    x[b * 2 + 1] = 0;
  }
  ts_list in;
  ts_list_init(&in);
  md_call c;
  md_call_init(&c);
  c.inputs = &in;
  c.host = &host;
  if (which == 1) {
    int64_t sh[2] = {N, 2};
    add_f32(&in, "features", 2, sh, x);
  } else {
    int64_t sh[2] = {N, 3};
    add_f32(&in, "member_outputs", 2, sh, z);
    add_i32(&in, "labels", N, lab);
  }
  tl_mem_fail_after(n); /* the request is built; only the kind's allocations fail */
  rc = which == 1   ? k->infer(state, &c, err)
       : which == 2 ? k->fit(state, &c, err)
                    : k->calibrate(state, &c, err);
  tl_mem_fail_reset();
  md_call_free(&c);
  ts_list_free(&in);
  k->free(state);
  return rc;
}

static void test_alloc_failures(void **st) {
  (void)st;
  for (int which = 0; which < 4; which++) {
    long n = 0;
    for (;; n++) {
      ts_err err = {0};
      int rc = faulty_call(which, n, &err);
      assert_int_equal(acquired, 0);
      if (rc == 0) break;
      if (!(rc < 0 && err.msg[0])) fail_msg("step %d, failure %ld: rc %d", which, n, rc);
      if (n > 5000) fail_msg("step %d never succeeded: %s", which, err.msg);
    }
    print_message("step %d: %ld allocation points\n", which, n);
  }
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_config_errors),  cmocka_unit_test(test_infer_member_outputs),
      cmocka_unit_test(test_infer_hosted),   cmocka_unit_test(test_fit),
      cmocka_unit_test(test_alloc_failures), cmocka_unit_test(test_calibrate_temperature),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
