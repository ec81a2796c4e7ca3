/* test_fuzz_regressions.c - replays fuzzing inputs through the fuzz targets.
 *
 * Every input that once crashed a target is kept in
 * tests/fuzz/regressions/<target>/ and replayed here, through the very code
 * the fuzzer runs (each tests/fuzz/fuzz_<target>.c is included with its entry
 * point renamed), on every `make test` and under ASan+UBSan in CI. The seed
 * corpora (tests/fuzz/corpus/<target>/) are replayed too, so a target that
 * stops accepting real requests is noticed without running libFuzzer. A
 * target's invariants abort(), which cmocka reports as a failure.
 * Paths are relative to the repository root (tests/run.sh runs from there);
 * TALLYD_SRC overrides it. */
#include <dirent.h>
#include <limits.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <cmocka.h>

#define FUZZ_ENTRY fuzz_safetensors_one
#include "../fuzz/fuzz_safetensors.c"
#undef FUZZ_ENTRY
#define FUZZ_ENTRY fuzz_oip_one
#include "../fuzz/fuzz_oip.c"
#undef FUZZ_ENTRY
#define FUZZ_ENTRY fuzz_oip_binary_one
#include "../fuzz/fuzz_oip_binary.c"
#undef FUZZ_ENTRY
#define FUZZ_ENTRY fuzz_config_one
#include "../fuzz/fuzz_config.c"
#undef FUZZ_ENTRY
#define FUZZ_ENTRY fuzz_http_one
#include "../fuzz/fuzz_http.c"
#undef FUZZ_ENTRY
#define FUZZ_ENTRY fuzz_keyfile_one
#include "../fuzz/fuzz_keyfile.c"
#undef FUZZ_ENTRY

typedef int (*fuzz_fn)(const uint8_t *, size_t);

static const char *src_root(void) {
  const char *s = getenv("TALLYD_SRC");
  return s && *s ? s : ".";
}

/* Feeds every regular file of <root>/tests/fuzz/<kind>/<target> to fn;
 * returns how many were replayed. */
static int replay_dir(const char *kind, const char *target, fuzz_fn fn) {
  char dir[PATH_MAX];
  snprintf(dir, sizeof dir, "%s/tests/fuzz/%s/%s", src_root(), kind, target);
  DIR *d = opendir(dir);
  if (!d) return 0;
  int n = 0;
  struct dirent *e;
  while ((e = readdir(d))) {
    if (e->d_name[0] == '.') continue;
    char path[PATH_MAX + 256];
    snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
    struct stat st;
    if (stat(path, &st) != 0 || !S_ISREG(st.st_mode)) continue;
    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    /* libFuzzer hands over a heap copy of exactly the input's size: do the
     * same, so that ASan catches a read one byte past the end */
    uint8_t *buf = malloc(st.st_size ? (size_t)st.st_size : 1);
    assert_non_null(buf);
    assert_int_equal(fread(buf, 1, (size_t)st.st_size, f), (size_t)st.st_size);
    fclose(f);
    fprintf(stderr, "replay %s/%s/%s\n", kind, target, e->d_name);
    fn(buf, (size_t)st.st_size);
    free(buf);
    n++;
  }
  closedir(d);
  return n;
}

static void replay(const char *target, fuzz_fn fn) {
  int seeds = replay_dir("corpus", target, fn);
  int regs = replay_dir("regressions", target, fn);
  print_message("%s: %d seeds, %d regressions replayed\n", target, seeds, regs);
  /* a missing corpus means the paths are wrong, not that all is well */
  assert_true(seeds > 0);
}

static void test_safetensors(void **state) {
  (void)state;
  replay("safetensors", fuzz_safetensors_one);
}

static void test_oip(void **state) {
  (void)state;
  replay("oip", fuzz_oip_one);
}

static void test_oip_binary(void **state) {
  (void)state;
  replay("oip_binary", fuzz_oip_binary_one);
}

static void test_config(void **state) {
  (void)state;
  replay("config", fuzz_config_one);
}

static void test_http(void **state) {
  (void)state;
  replay("http", fuzz_http_one);
  fuzz_http_alive(); /* and the in-process daemon still answers */
}

static void test_keyfile(void **state) {
  (void)state;
  replay("keyfile", fuzz_keyfile_one);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_safetensors), cmocka_unit_test(test_oip),
      cmocka_unit_test(test_oip_binary),  cmocka_unit_test(test_config),
      cmocka_unit_test(test_http),        cmocka_unit_test(test_keyfile),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
