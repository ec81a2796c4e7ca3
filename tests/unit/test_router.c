/* test_router.c - path and method routing, names and versions, and the one
 * table from statuses to HTTP codes. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "../../daemon/server/server.h"

static route rt;
static const char *allow;
static ts_err err;

static int parse(const char *m, const char *p) {
  memset(&err, 0, sizeof err);
  return route_parse(m, p, &rt, &allow, &err);
}

static void test_routes(void **s) {
  (void)s;
  struct { const char *m, *p; int id; const char *model; int64_t v; const char *sess; } ok[] = {
      {"GET", "/v2/health/live", R_LIVE, "", 0, ""},
      {"GET", "/v2/health/ready", R_READY, "", 0, ""},
      {"HEAD", "/v2/health/ready", R_READY, "", 0, ""},
      {"GET", "/v2", R_SERVER, "", 0, ""},
      {"GET", "/v2/", R_SERVER, "", 0, ""},
      {"GET", "/metrics", R_METRICS, "", 0, ""},
      {"GET", "/v2/models/m1", R_MODEL_META, "m1", 0, ""},
      {"GET", "/v2/models/m1/versions/12", R_MODEL_META, "m1", 12, ""},
      {"GET", "/v2/models/m.x-y_z/ready", R_MODEL_READY, "m.x-y_z", 0, ""},
      {"GET", "/v2/models/m/versions/3/ready", R_MODEL_READY, "m", 3, ""},
      {"POST", "/v2/models/m/infer", R_INFER, "m", 0, ""},
      {"POST", "/v2/models/m/versions/2/infer", R_INFER, "m", 2, ""},
      {"POST", "/v2/models/m/fit", R_FIT, "m", 0, ""},
      {"POST", "/v2/models/m/versions/2/evaluate", R_EVALUATE, "m", 2, ""},
      {"POST", "/v2/models/m/calibrate", R_CALIBRATE, "m", 0, ""},
      {"POST", "/v2/models/m/sessions", R_SESSIONS, "m", 0, ""},
      {"GET", "/v2/models/m/sessions/abc", R_SESSION, "m", 0, "abc"},
      {"DELETE", "/v2/models/m/sessions/abc", R_SESSION, "m", 0, "abc"},
      {"POST", "/v2/models/m/sessions/abc/infer", R_SESSION_INFER, "m", 0, "abc"},
      {"POST", "/v2/repository/index", R_REPO_INDEX, "", 0, ""},
      {"POST", "/v2/repository/models/m/load", R_REPO_LOAD, "m", 0, ""},
      {"POST", "/v2/repository/models/m/unload", R_REPO_UNLOAD, "m", 0, ""},
  };
  for (size_t i = 0; i < sizeof ok / sizeof *ok; i++) {
    if (parse(ok[i].m, ok[i].p) != 0) fail_msg("%s %s: %s", ok[i].m, ok[i].p, err.msg);
    assert_int_equal(rt.id, ok[i].id);
    assert_string_equal(rt.model, ok[i].model);
    assert_true(rt.version == ok[i].v);
    assert_string_equal(rt.session, ok[i].sess);
  }
}

static void test_not_found_and_methods(void **s) {
  (void)s;
  const char *nf[] = {"/", "/v3", "/v2/health", "/v2/health/alive", "/v2/models",
                      "/v2/models/m/infer/x", "/v2/models/m/versions/2/fit",
                      "/v2/models/m/versions/2/sessions", "/v2/repository/models/m/reload",
                      "/metrics/x"};
  for (size_t i = 0; i < sizeof nf / sizeof *nf; i++) {
    assert_int_equal(parse("GET", nf[i]), -TS_ENOTFOUND);
    assert_non_null(strstr(err.msg, "unknown route"));
  }
  assert_int_equal(parse("GET", "/v2/models/m/infer"), -TS_EMETHOD);
  assert_string_equal(allow, "POST");
  assert_int_equal(parse("POST", "/v2/health/live"), -TS_EMETHOD);
  assert_string_equal(allow, "GET, HEAD");
  assert_int_equal(parse("PUT", "/v2/models/m/sessions/a"), -TS_EMETHOD);
  assert_string_equal(allow, "GET, HEAD, DELETE");
}

static void test_bad_names_and_versions(void **s) {
  (void)s;
  assert_int_equal(parse("GET", "/v2/models/m/versions/0"), -TS_EINVAL);
  assert_int_equal(parse("GET", "/v2/models/m/versions/01"), -TS_EINVAL);
  assert_int_equal(parse("GET", "/v2/models/m/versions/-1"), -TS_EINVAL);
  assert_int_equal(parse("GET", "/v2/models/m/versions/1x"), -TS_EINVAL);
  assert_int_equal(parse("GET", "/v2/models/m/versions/99999999999999999999"), -TS_EINVAL);
  assert_int_equal(parse("GET", "/v2/models/../ready"), -TS_EINVAL);
  assert_int_equal(parse("GET", "/v2/models/.hidden"), -TS_EINVAL);
  assert_int_equal(parse("GET", "/v2/models/a b"), -TS_EINVAL);
  char longp[400];
  memset(longp, 'a', sizeof longp);
  memcpy(longp, "/v2/models/", 11);
  longp[sizeof longp - 1] = 0;
  assert_int_equal(parse("GET", longp), -TS_ENOTFOUND);
}

static void test_status_table(void **s) {
  (void)s;
  assert_int_equal(http_status_of(TS_OK), 200);
  assert_int_equal(http_status_of(-TS_EINVAL), 400);
  assert_int_equal(http_status_of(TS_EAUTH), 401);
  assert_int_equal(http_status_of(TS_EFORBIDDEN), 403);
  assert_int_equal(http_status_of(TS_ENOTFOUND), 404);
  assert_int_equal(http_status_of(TS_EMETHOD), 405);
  assert_int_equal(http_status_of(TS_ECONFLICT), 409);
  assert_int_equal(http_status_of(TS_ETOOBIG), 413);
  assert_int_equal(http_status_of(TS_EBUSY), 429);
  assert_int_equal(http_status_of(TS_EINTERNAL), 500);
  assert_int_equal(http_status_of(TS_EUNAVAIL), 503);
  assert_int_equal(http_status_of(TS_ETIMEOUT), 504);
  assert_int_equal(http_status_of(TS_ENOMEM), 503);
  assert_int_equal(http_status_of(999), 500);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_routes), cmocka_unit_test(test_not_found_and_methods),
      cmocka_unit_test(test_bad_names_and_versions), cmocka_unit_test(test_status_table)};
  return cmocka_run_group_tests(tests, NULL, NULL);
}
