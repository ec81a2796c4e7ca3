/* test_faults_alloc.c - every allocation on the request and load paths may fail.
 *
 * Each test runs one operation again and again with tl_mem_fail_after(N) for
 * N = 0, 1, 2, ... until it succeeds: every earlier run must come back with
 * an error value (a known status, a message), never crash, and (under
 * `make SAN=1`, where LeakSanitizer runs at exit) never leak. jansson
 * allocates through tl_malloc as in the daemon, so JSON parsing fails too.
 * Covered: the OIP decoder and encoder, the safetensors reader, the mlp
 * kind's load and infer, and the repository (open, scan, load, acquire). */
#include <limits.h>
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
#include "../../daemon/base/safetensors.h"
#include "../../daemon/models/model.h"
#include "../../daemon/repo/repo.h"
#include "../../daemon/server/repo_json.h"
#include "../../daemon/server/oip.h"

#define MAX_STEPS 5000

static char dir[PATH_MAX];
static char weights_path[PATH_MAX + 64];

/* mlp 4 -> 3 (relu) -> 2 (softmax) */
static void write_weights(const char *path) {
  ts_err err = {0};
  st_writer *w = st_writer_new();
  assert_non_null(w);
  float v[12];
  for (int i = 0; i < 12; i++) v[i] = (float)(i % 5) / 4.0f - 0.5f;
  int64_t s0[2] = {3, 4}, s1[1] = {3}, s2[2] = {2, 3}, s3[1] = {2};
  assert_int_equal(st_writer_add(w, "layers.0.weight", TS_FP32, 2, s0, v, &err), 0);
  assert_int_equal(st_writer_add(w, "layers.0.bias", TS_FP32, 1, s1, v, &err), 0);
  assert_int_equal(st_writer_add(w, "layers.1.weight", TS_FP32, 2, s2, v, &err), 0);
  assert_int_equal(st_writer_add(w, "layers.1.bias", TS_FP32, 1, s3, v, &err), 0);
  assert_int_equal(st_writer_save(w, path, &err), 0);
  st_writer_free(w);
}

static const char config_json[] = "{\"kind\": \"mlp\", \"activations\": [\"relu\", \"softmax\"]}";

static int setup(void **state) {
  (void)state;
  json_set_alloc_funcs(tl_malloc, tl_free);
  snprintf(dir, sizeof dir, "/tmp/tallyd-faults-XXXXXX");
  if (!mkdtemp(dir)) return -1;
  char p[PATH_MAX + 64];
  snprintf(p, sizeof p, "%s/m", dir);
  mkdir(p, 0755);
  snprintf(p, sizeof p, "%s/m/1", dir);
  mkdir(p, 0755);
  snprintf(p, sizeof p, "%s/m/config.json", dir);
  if (fs_write_file_sync(p, config_json, strlen(config_json), NULL)) return -1;
  snprintf(weights_path, sizeof weights_path, "%s/m/1/model.safetensors", dir);
  write_weights(weights_path);
  return 0;
}

static int teardown(void **state) {
  (void)state;
  tl_mem_fail_reset();
  return fs_rmtree(dir, NULL);
}

/* A failed step must say why, with a status the HTTP table knows. */
static void check_failure(int rc, const ts_err *err, long n) {
  if (rc >= 0 || -rc >= TS_STATUS_COUNT || !err->msg[0])
    fail_msg("step %ld: rc %d, message '%s'", n, rc, err->msg);
}

/* Runs op(N) for N = 0.. until it succeeds; returns the number of failing steps. */
static long until_success(int (*op)(ts_err *err), int *saw_enomem) {
  for (long n = 0; n < MAX_STEPS; n++) {
    ts_err err = {0};
    tl_mem_fail_after(n);
    int rc = op(&err);
    tl_mem_fail_reset();
    if (rc == 0) return n;
    check_failure(rc, &err, n);
    if (rc == -TS_ENOMEM) *saw_enomem = 1;
  }
  fail_msg("still failing after %d allocations", MAX_STEPS);
  return -1;
}

/* ---- the OIP codec ------------------------------------------------------ */

static const char request[] =
    "{\"id\": \"r1\", \"parameters\": {\"binary_data_output\": false},"
    " \"inputs\": [{\"name\": \"features\", \"shape\": [2, 4], \"datatype\": \"FP32\","
    "   \"data\": [[1, 2, 3, 4], [5, 6, 7, 8]]},"
    "  {\"name\": \"text\", \"shape\": [2], \"datatype\": \"BYTES\", \"data\": [\"ab\", \"c\"]},"
    "  {\"name\": \"bin\", \"shape\": [2], \"datatype\": \"INT32\","
    "   \"parameters\": {\"binary_data_size\": 8}}],"
    " \"outputs\": [{\"name\": \"features\"}, {\"name\": \"bin\", \"parameters\": "
    "{\"binary_data\": true}}]}";

static int op_decode_encode(ts_err *err) {
  char body[sizeof request + 8];
  memcpy(body, request, sizeof request - 1);
  int32_t bin[2] = {7, -7};
  memcpy(body + sizeof request - 1, bin, 8);
  oip_request req;
  int rc =
      oip_decode_capped(body, sizeof request - 1 + 8, sizeof request - 1, 1000, 1 << 20, &req, err);
  if (!rc) {
    assert_int_equal(req.inputs.n, 3);
    sbuf b;
    sbuf_init(&b);
    size_t json_len = 0;
    rc = oip_encode("m", 1, &req, &req.inputs, NULL, &b, &json_len, err);
    if (!rc) assert_true(json_len > 0 && b.len == json_len + 8);
    sbuf_free(&b);
  }
  oip_request_free(&req);
  return rc;
}

static void test_oip(void **state) {
  (void)state;
  int enomem = 0;
  long steps = until_success(op_decode_encode, &enomem);
  print_message("oip decode+encode: %ld failing steps\n", steps);
  assert_true(steps > 5);
  assert_true(enomem);
}

/* ---- safetensors -------------------------------------------------------- */

static int op_safetensors(ts_err *err) {
  st_file *f;
  int rc = st_open(&f, weights_path, err);
  if (rc) return rc;
  for (int i = 0; i < st_count(f) && !rc; i++) {
    ts_tensor t;
    if (!(rc = st_get(f, st_name(f, i), &t, err))) ts_free(&t);
    if (!rc && !(rc = st_get_f32(f, st_name(f, i), -1, NULL, &t, err))) ts_free(&t);
  }
  st_close(f);
  return rc;
}

static void test_safetensors(void **state) {
  (void)state;
  int enomem = 0;
  long steps = until_success(op_safetensors, &enomem);
  print_message("safetensors open+get: %ld failing steps\n", steps);
  assert_true(steps > 0);
  assert_true(enomem);
}

/* ---- the mlp kind ------------------------------------------------------- */

static int op_mlp(ts_err *err) {
  const md_kind *k = md_kind_find("mlp");
  assert_non_null(k);
  st_file *f = NULL;
  json_t *config = NULL;
  void *state = NULL;
  oip_request req;
  md_call call;
  md_call_init(&call);
  memset(&req, 0, sizeof req);
  int rc = st_open(&f, weights_path, err);
  if (!rc && !(config = json_loads(config_json, 0, NULL)))
    rc = ts_errf(err, TS_ENOMEM, "out of memory parsing the config");
  md_load_ctx ctx = {
      .model_name = "m", .version = 1, .version_dir = dir, .config = config, .weights = f};
  if (!rc) rc = k->load(&ctx, &state, err);
  static const char body[] =
      "{\"inputs\": [{\"name\": \"features\", \"shape\": [3, 4],"
      " \"datatype\": \"FP64\", \"data\": [1,2,3,4,5,6,7,8,9,10,11,12]}]}";
  if (!rc) rc = oip_decode(body, sizeof body - 1, 0, 0, &req, err);
  if (!rc) {
    call.inputs = &req.inputs;
    call.model_name = "m";
    call.version = 1;
    rc = k->infer(state, &call, err);
  }
  if (!rc) {
    assert_int_equal(call.outputs.n, 1);
    const float *y = call.outputs.items[0].data;
    for (int r = 0; r < 3; r++) assert_float_equal(y[2 * r] + y[2 * r + 1], 1.0, 1e-5);
  }
  md_call_free(&call);
  oip_request_free(&req);
  if (state) k->free(state);
  if (config) json_decref(config);
  st_close(f);
  return rc;
}

static void test_mlp(void **state) {
  (void)state;
  int enomem = 0;
  long steps = until_success(op_mlp, &enomem);
  print_message("mlp load+infer: %ld failing steps\n", steps);
  assert_true(steps > 5);
  assert_true(enomem);
}

/* ---- the repository ----------------------------------------------------- */

static int op_repo(ts_err *err) {
  repo_t *r = NULL;
  const char *only[] = {"m", NULL};
  int rc = repo_open(&r, dir, only, NULL, err);
  if (rc) return rc;
  repo_sync(r); /* per-model failures go to the index, not to a return value */
  repo_ver *v;
  rc = repo_acquire(r, "m", 0, &v, err);
  if (!rc) {
    assert_int_equal(repo_ver_version(v), 1);
    assert_string_equal(repo_ver_kind(v)->name, "mlp");
    repo_release(v);
    json_t *ix = repo_index_json(r);
    if (!ix)
      rc = ts_errf(err, TS_ENOMEM, "out of memory building the index");
    else
      json_decref(ix);
  } else {
    /* a load that failed for want of memory leaves the model unavailable */
    assert_true(rc == -TS_EUNAVAIL || rc == -TS_ENOTFOUND);
  }
  repo_close(r);
  return rc;
}

static void test_repo(void **state) {
  (void)state;
  int enomem = 0;
  long steps = until_success(op_repo, &enomem);
  print_message("repository open+sync+acquire: %ld failing steps\n", steps);
  assert_true(steps > 5);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_oip),
      cmocka_unit_test(test_safetensors),
      cmocka_unit_test(test_mlp),
      cmocka_unit_test(test_repo),
  };
  return cmocka_run_group_tests(tests, setup, teardown);
}
