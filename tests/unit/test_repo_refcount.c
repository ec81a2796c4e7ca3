/* test_repo_refcount.c - reference counting of served versions in the model
 * repository (repo.c).
 *
 * A served version (ST_MMAP, the default) holds its weights file mmap'ed until its last reference
 * is released, so /proc/self/maps tells from outside whether a version was
 * freed: after a model is unloaded and the last request released it, its
 * model.safetensors must be unmapped. A rescan (SIGHUP, polling) that finds
 * a version unchanged must not add a reference the table never gives back. */
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
#include "../../daemon/base/safetensors.h"
#include "../../daemon/repo/repo.h"

static char root[64];

static void write_file(const char *path, const char *text) {
  FILE *f = fopen(path, "w");
  assert_non_null(f);
  fputs(text, f);
  fclose(f);
}

/* <root>/m/config.json and <root>/m/1/model.safetensors: a 2 -> 1 mlp. */
static void make_repo(void) {
  static const float w[] = {1, -1}, b[] = {0.5f};
  char path[256];
  ts_err err = {0};
  snprintf(root, sizeof root, "/tmp/tallyd-review-repo-XXXXXX");
  assert_non_null(mkdtemp(root));
  snprintf(path, sizeof path, "%s/m", root);
  assert_int_equal(mkdir(path, 0755), 0);
  snprintf(path, sizeof path, "%s/m/1", root);
  assert_int_equal(mkdir(path, 0755), 0);
  snprintf(path, sizeof path, "%s/m/config.json", root);
  write_file(path, "{\"kind\": \"mlp\", \"activations\": [\"none\"]}");
  st_writer *wr = st_writer_new();
  assert_non_null(wr);
  int64_t s0[2] = {1, 2}, s1[1] = {1};
  assert_int_equal(st_writer_add(wr, "layers.0.weight", TS_FP32, 2, s0, w, &err), 0);
  assert_int_equal(st_writer_add(wr, "layers.0.bias", TS_FP32, 1, s1, b, &err), 0);
  snprintf(path, sizeof path, "%s/m/1/model.safetensors", root);
  assert_int_equal(st_writer_save(wr, path, &err), 0);
  st_writer_free(wr);
}

/* 1 when the weights of version 1 are still mapped into this process. */
static int weights_mapped(void) {
  char want[256], line[1024];
  snprintf(want, sizeof want, "%s/m/1/model.safetensors", root);
  FILE *f = fopen("/proc/self/maps", "r");
  assert_non_null(f);
  int found = 0;
  while (!found && fgets(line, sizeof line, f)) found = strstr(line, want) != NULL;
  fclose(f);
  return found;
}

static void cleanup(void) {
  fs_rmtree(root, NULL);
}

/* Load, rescan twice with nothing changed, unload: the version is freed. */
static void test_rescan_then_unload_frees(void **st) {
  (void)st;
  make_repo();
  repo_t *r;
  ts_err err = {0};
  assert_int_equal(repo_open(&r, root, NULL, NULL, &err), 0);
  repo_set_weights_load(r, ST_MMAP); /* the default; /proc/self/maps shows it */
  repo_sync(r);
  assert_true(weights_mapped());
  repo_sync(r); /* SIGHUP: nothing changed */
  repo_sync(r);
  assert_true(weights_mapped());
  assert_int_equal(repo_unload_model(r, "m", &err), 0);
  assert_false(weights_mapped());
  repo_close(r);
  cleanup();
}

/* A request that holds the version across a rescan and an unload keeps it
 * alive until it releases it, and not one moment longer. */
static void test_inflight_keeps_version(void **st) {
  (void)st;
  make_repo();
  repo_t *r;
  ts_err err = {0};
  assert_int_equal(repo_open(&r, root, NULL, NULL, &err), 0);
  repo_set_weights_load(r, ST_MMAP); /* the default; /proc/self/maps shows it */
  repo_sync(r);
  repo_ver *v;
  assert_int_equal(repo_acquire(r, "m", 0, &v, &err), 0);
  repo_sync(r);
  assert_int_equal(repo_unload_model(r, "m", &err), 0);
  assert_true(weights_mapped()); /* the request still uses it */
  assert_int_equal(repo_ver_version(v), 1);
  repo_release(v);
  assert_false(weights_mapped());
  /* load again, rescan, close: closing frees what the table held */
  assert_int_equal(repo_load_model(r, "m", &err), 0);
  repo_sync(r);
  assert_true(weights_mapped());
  repo_close(r);
  assert_false(weights_mapped());
  cleanup();
}

int main(void) {
  const struct CMUnitTest tests[] = {cmocka_unit_test(test_rescan_then_unload_frees),
                                     cmocka_unit_test(test_inflight_keeps_version)};
  return cmocka_run_group_tests(tests, NULL, NULL);
}
