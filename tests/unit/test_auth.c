/* test_auth.c - the API-key module: key-file parsing (comments, blank lines,
 * case of the hex, every malformed line named by its number), lookup of
 * presented keys (scope of the matching entry, the highest when a key is
 * listed twice, nothing for near misses), the route -> scope table, keygen
 * output that the parser and lookup accept, and allocation failures. Also
 * the server-level input limits (--max-batch, --max-sequence-length). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include "../../daemon/base/hash.h"
#include "../../daemon/base/mem.h"
#include "../../daemon/server/auth.h"
#include "../../daemon/server/server.h"

/* sha256("secret-infer") and sha256("secret-admin"), computed by hash.c,
 * an independent SHA-256 path (EVP through hash_sha256_buf). */
static char d_infer[65], d_admin[65];

static int setup(void **state) {
  (void)state;
  hash_sha256_buf("secret-infer", 12, d_infer);
  hash_sha256_buf("secret-admin", 12, d_admin);
  return 0;
}

static auth_keys *parse_ok(const char *text) {
  auth_keys *k = NULL;
  ts_err err = {0};
  int rc = auth_parse(text, strlen(text), "keys", &k, &err);
  if (rc) fprintf(stderr, "unexpected: %s\n", err.msg);
  assert_int_equal(rc, 0);
  assert_non_null(k);
  return k;
}

static void parse_fails(const char *text, const char *needle) {
  auth_keys *k = (auth_keys *)1;
  ts_err err = {0};
  int rc = auth_parse(text, strlen(text), "keys", &k, &err);
  assert_int_equal(rc, -TS_EINVAL);
  assert_null(k);
  if (!strstr(err.msg, needle)) fprintf(stderr, "message '%s' lacks '%s'\n", err.msg, needle);
  assert_non_null(strstr(err.msg, needle));
}

static void test_parse_and_lookup(void **state) {
  (void)state;
  char text[512];
  /* comments, blank lines, tabs, CRLF, upper-case hex, a trailing comment */
  char upper[65];
  for (int i = 0; i < 65; i++)
    upper[i] = (char)(d_admin[i] >= 'a' && d_admin[i] <= 'f' ? d_admin[i] - 32 : d_admin[i]);
  snprintf(text, sizeof text, "# tallyd keys\n\n  %s infer\r\n\t%s\tadmin   # ops team\n#end",
           d_infer, upper);
  auth_keys *k = parse_ok(text);
  assert_int_equal(auth_count(k), 2);
  assert_int_equal(auth_lookup(k, "secret-infer", 12), AUTH_INFER);
  assert_int_equal(auth_lookup(k, "secret-admin", 12), AUTH_ADMIN);
  assert_int_equal(auth_lookup(k, "secret-admiN", 12), AUTH_NONE);
  assert_int_equal(auth_lookup(k, "secret-admin ", 13), AUTH_NONE);
  assert_int_equal(auth_lookup(k, "secret-admi", 11), AUTH_NONE);
  assert_int_equal(auth_lookup(k, "", 0), AUTH_NONE);
  assert_int_equal(auth_lookup(NULL, "secret-admin", 12), AUTH_NONE);
  auth_free(k);
}

static void test_duplicate_key_gets_highest_scope(void **state) {
  (void)state;
  char text[512];
  snprintf(text, sizeof text, "%s admin\n%s infer\n", d_infer, d_infer);
  auth_keys *k = parse_ok(text);
  assert_int_equal(auth_lookup(k, "secret-infer", 12), AUTH_ADMIN);
  auth_free(k);
}

static void test_parse_errors(void **state) {
  (void)state;
  char text[512];
  parse_fails("", "holds no key");
  parse_fails("# only a comment\n\n", "holds no key");
  parse_fails("abc infer\n", "keys:1: expected");
  snprintf(text, sizeof text, "%s infer\n%s\n", d_infer, d_admin);
  parse_fails(text, "keys:2: the scope is missing");
  snprintf(text, sizeof text, "\n%s root\n", d_admin);
  parse_fails(text, "keys:2: unknown scope 'root'");
  snprintf(text, sizeof text, "%s admin extra\n", d_admin);
  parse_fails(text, "keys:1: unexpected text");
  snprintf(text, sizeof text, "%s admin\n", d_admin);
  text[10] = 'g';
  parse_fails(text, "not hexadecimal");
  /* a NUL byte inside a line */
  char nul[80];
  snprintf(nul, sizeof nul, "%s infer", d_infer);
  nul[3] = 0;
  auth_keys *k = NULL;
  ts_err err = {0};
  assert_int_equal(auth_parse(nul, 70, "keys", &k, &err), -TS_EINVAL);
  assert_non_null(strstr(err.msg, "NUL"));
}

static void test_load_missing_file(void **state) {
  (void)state;
  auth_keys *k = NULL;
  ts_err err = {0};
  assert_true(auth_load("/nonexistent/keys.txt", &k, &err) < 0);
  assert_null(k);
  assert_non_null(strstr(err.msg, "/nonexistent/keys.txt"));
}

static void test_scope_table(void **state) {
  (void)state;
  assert_int_equal(auth_required(R_LIVE), AUTH_NONE);
  assert_int_equal(auth_required(R_READY), AUTH_NONE);
  assert_int_equal(auth_required(R_REPO_LOAD), AUTH_ADMIN);
  assert_int_equal(auth_required(R_REPO_UNLOAD), AUTH_ADMIN);
  assert_int_equal(auth_required(R_FIT), AUTH_ADMIN);
  assert_int_equal(auth_required(R_CALIBRATE), AUTH_ADMIN);
  int infer_routes[] = {R_NONE,           R_SERVER,        R_MODEL_META, R_MODEL_READY,
                        R_INFER,          R_EVALUATE,      R_SESSIONS,   R_SESSION,
                        R_SESSION_DELETE, R_SESSION_INFER, R_REPO_INDEX, R_METRICS};
  for (size_t i = 0; i < sizeof infer_routes / sizeof *infer_routes; i++)
    assert_int_equal(auth_required(infer_routes[i]), AUTH_INFER);
  /* every route has an answer, and only the two health routes are open */
  int open = 0;
  for (int r = 0; r < R_COUNT; r++) open += auth_required(r) == AUTH_NONE;
  assert_int_equal(open, 2);
  assert_string_equal(auth_scope_name(AUTH_ADMIN), "admin");
  assert_string_equal(auth_scope_name(AUTH_INFER), "infer");
}

static void test_keygen_round_trip(void **state) {
  (void)state;
  char key[64], line[128], key2[64], line2[128];
  ts_err err = {0};
  assert_int_equal(auth_keygen(AUTH_ADMIN, key, sizeof key, line, sizeof line, &err), 0);
  assert_int_equal(auth_keygen(AUTH_INFER, key2, sizeof key2, line2, sizeof line2, &err), 0);
  assert_int_equal(strlen(key), 43);
  assert_string_not_equal(key, key2);
  for (const char *p = key; *p; p++)
    assert_true((*p >= 'A' && *p <= 'Z') || (*p >= 'a' && *p <= 'z') || (*p >= '0' && *p <= '9') ||
                *p == '-' || *p == '_');
  /* the line is the digest of the key and the scope */
  char hex[65];
  hash_sha256_buf(key, strlen(key), hex);
  assert_int_equal(strncmp(line, hex, 64), 0);
  assert_string_equal(line + 64, " admin");
  char text[300];
  snprintf(text, sizeof text, "%s\n%s\n", line, line2);
  auth_keys *k = parse_ok(text);
  assert_int_equal(auth_lookup(k, key, strlen(key)), AUTH_ADMIN);
  assert_int_equal(auth_lookup(k, key2, strlen(key2)), AUTH_INFER);
  auth_free(k);
  assert_int_equal(auth_keygen(AUTH_NONE, key, sizeof key, line, sizeof line, &err), -TS_EINVAL);
  assert_int_equal(auth_keygen(AUTH_INFER, key, 10, line, sizeof line, &err), -TS_EINVAL);
}

static void test_parse_out_of_memory(void **state) {
  (void)state;
  char text[2048] = "";
  for (int i = 0; i < 20; i++) {
    strcat(text, i % 2 ? d_admin : d_infer);
    strcat(text, i % 2 ? " admin\n" : " infer\n");
  }
  int failures = 0;
  for (long n = 0; n < 50; n++) {
    tl_mem_fail_after(n);
    auth_keys *k = NULL;
    ts_err err = {0};
    int rc = auth_parse(text, strlen(text), "keys", &k, &err);
    tl_mem_fail_reset();
    if (rc) {
      assert_int_equal(rc, -TS_ENOMEM);
      assert_null(k);
      failures++;
      continue;
    }
    assert_int_equal(auth_count(k), 20);
    auth_free(k);
    break;
  }
  assert_true(failures > 0);
}

static void test_limits(void **state) {
  (void)state;
  srv_config cfg;
  cfg_defaults(&cfg);
  ts_list l;
  ts_list_init(&l);
  ts_tensor *a = ts_list_add(&l);
  a->name = tl_strdup("input_ids");
  a->ndim = 2;
  a->shape[0] = 4;
  a->shape[1] = 100;
  ts_tensor *q = ts_list_add(&l);
  q->name = tl_strdup("query");
  q->ndim = 3;
  q->shape[0] = 2; /* heads */
  q->shape[1] = 50;
  q->shape[2] = 8;
  ts_err err = {0};
  assert_int_equal(server_check_limits(&cfg, &l, &err), 0); /* no limits by default */
  cfg.max_batch = 4;
  cfg.max_sequence_length = 100;
  assert_int_equal(server_check_limits(&cfg, &l, &err), 0); /* at the limits */
  cfg.max_batch = 3;
  assert_int_equal(server_check_limits(&cfg, &l, &err), -TS_EINVAL);
  assert_non_null(strstr(err.msg, "--max-batch"));
  cfg.max_batch = 0;
  cfg.max_sequence_length = 99;
  assert_int_equal(server_check_limits(&cfg, &l, &err), -TS_EINVAL);
  assert_non_null(strstr(err.msg, "'input_ids': sequence length 100"));
  cfg.max_sequence_length = 60; /* input_ids too long, query fine */
  a->shape[1] = 60;
  assert_int_equal(server_check_limits(&cfg, &l, &err), 0);
  q->shape[1] = 61; /* query's length is its second-to-last dimension */
  assert_int_equal(server_check_limits(&cfg, &l, &err), -TS_EINVAL);
  assert_non_null(strstr(err.msg, "'query'"));
  ts_list_free(&l);
  cfg_free(&cfg);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_parse_and_lookup),
      cmocka_unit_test(test_duplicate_key_gets_highest_scope),
      cmocka_unit_test(test_parse_errors),
      cmocka_unit_test(test_load_missing_file),
      cmocka_unit_test(test_scope_table),
      cmocka_unit_test(test_keygen_round_trip),
      cmocka_unit_test(test_parse_out_of_memory),
      cmocka_unit_test(test_limits),
  };
  return cmocka_run_group_tests(tests, setup, NULL);
}
