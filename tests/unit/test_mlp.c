/* test_mlp.c - the mlp kind against values worked out by hand, through the
 * model interface, with every activation (the pool's tests: test_pool.c). */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "../../daemon/base/mem.h"
#include "../../daemon/base/pool.h"
#include "../../daemon/base/safetensors.h"
#include "../../daemon/models/mlp.h"
#include "../../daemon/models/model.h"

/* Writes a two-layer net: W0 [2,3], b0 [2], W1 [1,2], b1 [1]. */
static st_file *hand_weights(char *path) {
  static const float w0[] = {1, 0, -1, 0.5f, 0.5f, 0.5f}, b0[] = {0, 1}, w1[] = {1, -1},
                     b1[] = {0.5f};
  ts_err err = {0};
  st_writer *w = st_writer_new();
  int64_t s0[2] = {2, 3}, s1[1] = {2}, s2[2] = {1, 2}, s3[1] = {1};
  assert_int_equal(st_writer_add(w, "layers.0.weight", TS_FP32, 2, s0, w0, &err), 0);
  assert_int_equal(st_writer_add(w, "layers.0.bias", TS_FP32, 1, s1, b0, &err), 0);
  assert_int_equal(st_writer_add(w, "layers.1.weight", TS_FP32, 2, s2, w1, &err), 0);
  assert_int_equal(st_writer_add(w, "layers.1.bias", TS_FP32, 1, s3, b1, &err), 0);
  strcpy(path, "/tmp/tallyd-test-mlp-XXXXXX");
  int fd = mkstemp(path);
  close(fd);
  assert_int_equal(st_writer_save(w, path, &err), 0);
  st_writer_free(w);
  st_file *f;
  assert_int_equal(st_open(&f, path, &err), 0);
  return f;
}

static int run(const char *acts_json, const float *x, int64_t B, float *y, ts_err *err) {
  char path[64];
  st_file *f = hand_weights(path);
  const md_kind *k = md_kind_find("mlp");
  assert_non_null(k);
  char cfg[256];
  snprintf(cfg, sizeof cfg, "{\"kind\":\"mlp\",\"activations\":%s}", acts_json);
  json_t *config = json_loads(cfg, 0, NULL);
  md_load_ctx ctx = {.model_name = "hand", .version = 1, .config = config, .weights = f};
  void *state = NULL;
  int rc = k->load(&ctx, &state, err);
  if (rc == 0) {
    ts_list in;
    ts_list_init(&in);
    int64_t sh[2] = {B, 3};
    ts_tensor *t = ts_list_add(&in);
    ts_alloc(t, "features", TS_FP32, 2, sh, err);
    memcpy(t->data, x, sizeof(float) * (size_t)(B * 3));
    md_call c;
    md_call_init(&c);
    c.inputs = &in;
    rc = k->infer(state, &c, err);
    if (rc == 0) memcpy(y, c.outputs.items[0].data, sizeof(float) * (size_t)B);
    md_call_free(&c);
    ts_list_free(&in);
    k->free(state);
  }
  json_decref(config);
  st_close(f);
  unlink(path);
  return rc;
}

static void test_hand_values(void **s) {
  (void)s;
  /* x=[1,2,3]: h = relu([-2, 4]) = [0,4]; y = -4 + 0.5 = -3.5
   * x=[3,2,1]: h = [2,4]; y = -1.5 */
  float x[6] = {1, 2, 3, 3, 2, 1}, y[2];
  ts_err err = {0};
  assert_int_equal(run("[\"relu\",\"none\"]", x, 2, y, &err), 0);
  assert_float_equal(y[0], -3.5f, 1e-6);
  assert_float_equal(y[1], -1.5f, 1e-6);
  /* tanh then sigmoid: h = tanh([-2, 4]); y = sigmoid(h0 - h1 + 0.5) */
  assert_int_equal(run("[\"tanh\",\"sigmoid\"]", x, 1, y, &err), 0);
  double h0 = tanh(-2.0), h1 = tanh(4.0), want = 1.0 / (1.0 + exp(-(h0 - h1 + 0.5)));
  assert_float_equal(y[0], want, 1e-6);
  /* elu: h = [e^-2 - 1, 4]; y = h0 - 4 + 0.5 */
  assert_int_equal(run("[\"elu\",\"none\"]", x, 1, y, &err), 0);
  assert_float_equal(y[0], exp(-2.0) - 1 - 3.5, 1e-6);
  /* gelu (erf) and gelu_tanh on h = [-2, 4] */
  assert_int_equal(run("[\"gelu\",\"none\"]", x, 1, y, &err), 0);
  double g0 = -2 * 0.5 * (1 + erf(-2 / sqrt(2.0))), g1 = 4 * 0.5 * (1 + erf(4 / sqrt(2.0)));
  assert_float_equal(y[0], g0 - g1 + 0.5, 1e-5);
  assert_int_equal(run("[\"gelu_tanh\",\"none\"]", x, 1, y, &err), 0);
  double c = sqrt(2 / M_PI);
  double t0 = 0.5 * -2 * (1 + tanh(c * (-2 + 0.044715 * -8))),
         t1 = 0.5 * 4 * (1 + tanh(c * (4 + 0.044715 * 64)));
  assert_float_equal(y[0], t0 - t1 + 0.5, 1e-5);
  /* softmax over a single output is 1 */
  assert_int_equal(run("[\"relu\",\"softmax\"]", x, 1, y, &err), 0);
  assert_float_equal(y[0], 1.0f, 1e-7);
}

static void test_bad_configs(void **s) {
  (void)s;
  float x[3] = {1, 2, 3}, y[1];
  ts_err err = {0};
  assert_int_equal(run("[\"relu\"]", x, 1, y, &err), 0); /* one layer: y = relu(W0 x + b0) */
  assert_int_equal(run("[\"swish\",\"none\"]", x, 1, y, &err), -TS_EINVAL);
  assert_non_null(strstr(err.msg, "swish"));
  assert_int_equal(run("[\"relu\",\"none\",\"none\"]", x, 1, y, &err), -TS_ENOTFOUND);
  assert_non_null(strstr(err.msg, "layers.2.weight"));
  assert_int_equal(run("[]", x, 1, y, &err), -TS_EINVAL);
}

int main(void) {
  const struct CMUnitTest tests[] = {cmocka_unit_test(test_hand_values),
                                     cmocka_unit_test(test_bad_configs)};
  return cmocka_run_group_tests(tests, NULL, NULL);
}
