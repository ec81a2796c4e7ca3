/* test_routes.c - the route table (routes.h): every route with its path,
 * methods (405 and Allow for the others), scope and flags, written out here
 * independently of the table so that a changed row fails; path parsing,
 * names and versions; dispatch; and the one status list (err.h) with its
 * HTTP codes. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "../../daemon/server/auth.h"
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
  struct {
    const char *m, *p;
    int id;
    const char *model;
    int64_t v;
    const char *sess;
  } ok[] = {
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
      {"POST", "/v2/models/m/feedback", R_FEEDBACK, "m", 0, ""},
      {"POST", "/v2/models/m/refit", R_REFIT, "m", 0, ""},
      {"GET", "/v2/models/m/candidates", R_CANDIDATES, "m", 0, ""},
      {"POST", "/v2/models/m/sessions", R_SESSIONS, "m", 0, ""},
      {"GET", "/v2/models/m/sessions/abc", R_SESSION, "m", 0, "abc"},
      {"HEAD", "/v2/models/m/sessions/abc", R_SESSION, "m", 0, "abc"},
      {"DELETE", "/v2/models/m/sessions/abc", R_SESSION_DELETE, "m", 0, "abc"},
      {"GET", "/v2/repository/index", R_REPO_INDEX, "", 0, ""},
      {"GET", "//v2//models//m//versions//4//ready//", R_MODEL_READY, "m", 4, ""},
      {"POST", "/v2/models/m/sessions/abc/infer", R_SESSION_INFER, "m", 0, "abc"},
      {"POST", "/v2/repository/index", R_REPO_INDEX, "", 0, ""},
      {"POST", "/v2/repository/models/m/load", R_REPO_LOAD, "m", 0, ""},
      {"POST", "/v2/repository/models/m/unload", R_REPO_UNLOAD, "m", 0, ""},
      /* Triton's calls (triton.c): the fixed path above the model pattern */
      {"GET", "/v2/models/stats", R_STATS_ALL, "", 0, ""},
      {"GET", "/v2/models/m/stats", R_MODEL_STATS, "m", 0, ""},
      {"GET", "/v2/models/m/versions/2/stats", R_MODEL_STATS, "m", 2, ""},
      {"GET", "/v2/models/m/config", R_MODEL_CONFIG, "m", 0, ""},
      {"GET", "/v2/models/m/versions/2/config", R_MODEL_CONFIG, "m", 2, ""},
      {"GET", "/v2/models/stats/ready", R_MODEL_READY, "stats", 0, ""},
      /* generation (completions.c) */
      {"POST", "/v2/models/m/generate", R_GENERATE, "m", 0, ""},
      {"POST", "/v2/models/m/versions/2/generate_stream", R_GENERATE_STREAM, "m", 2, ""},
      {"POST", "/v2/models/m/tokenize", R_TOKENIZE, "m", 0, ""},
      {"POST", "/v2/models/m/versions/5/detokenize", R_DETOKENIZE, "m", 5, ""},
      {"POST", "/v1/completions", R_V1_COMPLETIONS, "", 0, ""},
      {"GET", "/v1/models", R_V1_MODELS, "", 0, ""},
      {"GET", "/v2/systemsharedmemory/status", R_SHM_SYSTEM, "", 0, ""},
      {"GET", "/v2/systemsharedmemory/region/r%1/status", R_SHM_SYSTEM, "", 0, ""},
      {"POST", "/v2/systemsharedmemory/region/r1/register", R_SHM_SYSTEM, "", 0, ""},
      {"POST", "/v2/systemsharedmemory/unregister", R_SHM_SYSTEM, "", 0, ""},
      {"POST", "/v2/cudasharedmemory/region/r1/unregister", R_SHM_CUDA, "", 0, ""},
      {"GET", "/v2/cudasharedmemory/status", R_SHM_CUDA, "", 0, ""},
      {"GET", "/v2/trace/setting", R_TRACE, "", 0, ""},
      {"POST", "/v2/models/m/trace/setting", R_TRACE, "m", 0, ""},
      {"POST", "/v2/logging", R_LOGGING, "", 0, ""},
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
  const char *nf[] = {"/",
                      "/v3",
                      "/v2/health",
                      "/v2/health/alive",
                      "/v2/models",
                      "/v2/models/m/infer/x",
                      "/v2/models/m/versions/2/fit",
                      "/v2/models/m/versions/2/sessions",
                      "/v2/repository/models/m/reload",
                      "/metrics/x",
                      "/v2/systemsharedmemory",
                      "/v2/systemsharedmemory/region/x",
                      "/v2/logging/x",
                      "/v2/models/m/trace"};
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

/* Every route, independently of routes.h: a path, the methods it takes (as
 * the Allow header lists them), the scope, the flags. */
static const struct {
  int id;
  const char *path;
  const char *allow;
  auth_scope scope;
  unsigned flags;
  int op;
} want[] = {
    {R_LIVE, "/v2/health/live", "GET, HEAD", AUTH_NONE, RF_LOOP | RF_DRAIN, OP_NONE},
    {R_READY, "/v2/health/ready", "GET, HEAD", AUTH_NONE, RF_LOOP | RF_DRAIN, OP_NONE},
    {R_SERVER, "/v2", "GET, HEAD", AUTH_INFER, RF_LOOP, OP_NONE},
    {R_MODEL_META, "/v2/models/m/versions/3", "GET, HEAD", AUTH_INFER, RF_LOOP, OP_NONE},
    {R_MODEL_READY, "/v2/models/m/ready", "GET, HEAD", AUTH_INFER, RF_LOOP, OP_NONE},
    {R_INFER, "/v2/models/m/versions/3/infer", "POST", AUTH_INFER,
     RF_VERSION | RF_DEADLINE | RF_LIMITS, MD_OP_INFER},
    {R_FIT, "/v2/models/m/fit", "POST", AUTH_ADMIN, RF_VERSION | RF_FIT, MD_OP_FIT},
    {R_EVALUATE, "/v2/models/m/evaluate", "POST", AUTH_INFER, RF_VERSION, MD_OP_EVALUATE},
    {R_CALIBRATE, "/v2/models/m/calibrate", "POST", AUTH_ADMIN, RF_VERSION | RF_FIT,
     MD_OP_CALIBRATE},
    {R_FEEDBACK, "/v2/models/m/feedback", "POST", AUTH_INFER, RF_VERSION, OP_NONE},
    {R_REFIT, "/v2/models/m/refit", "POST", AUTH_ADMIN, RF_VERSION | RF_FIT, MD_OP_FIT},
    {R_CANDIDATES, "/v2/models/m/candidates", "GET, HEAD", AUTH_INFER, RF_VERSION, OP_NONE},
    {R_SESSIONS, "/v2/models/m/sessions", "POST", AUTH_INFER, RF_VERSION, MD_OP_SESSION_OPEN},
    {R_SESSION, "/v2/models/m/sessions/abc", "GET, HEAD, DELETE", AUTH_INFER, RF_LOOP, OP_NONE},
    {R_SESSION_DELETE, "/v2/models/m/sessions/abc", "GET, HEAD, DELETE", AUTH_INFER, 0, OP_NONE},
    {R_SESSION_INFER, "/v2/models/m/sessions/abc/infer", "POST", AUTH_INFER,
     RF_DEADLINE | RF_LIMITS, MD_OP_SESSION_INFER},
    {R_REPO_INDEX, "/v2/repository/index", "GET, HEAD, POST", AUTH_INFER, RF_LOOP, OP_NONE},
    {R_REPO_LOAD, "/v2/repository/models/m/load", "POST", AUTH_ADMIN, 0, OP_NONE},
    {R_REPO_UNLOAD, "/v2/repository/models/m/unload", "POST", AUTH_ADMIN, 0, OP_NONE},
    {R_METRICS, "/metrics", "GET, HEAD", AUTH_INFER, RF_LOOP | RF_DRAIN, OP_NONE},
    {R_STATS_ALL, "/v2/models/stats", "GET, HEAD", AUTH_INFER, RF_LOOP, OP_NONE},
    {R_MODEL_STATS, "/v2/models/m/versions/3/stats", "GET, HEAD", AUTH_INFER, RF_LOOP, OP_NONE},
    {R_MODEL_CONFIG, "/v2/models/m/config", "GET, HEAD", AUTH_INFER, RF_LOOP, OP_NONE},
    {R_SHM_SYSTEM, "/v2/systemsharedmemory/region/x/register", "GET, HEAD, POST", AUTH_INFER,
     RF_LOOP, OP_NONE},
    {R_SHM_CUDA, "/v2/cudasharedmemory/status", "GET, HEAD, POST", AUTH_INFER, RF_LOOP, OP_NONE},
    {R_TRACE, "/v2/trace/setting", "GET, HEAD, POST", AUTH_INFER, RF_LOOP, OP_NONE},
    {R_LOGGING, "/v2/logging", "GET, HEAD, POST", AUTH_INFER, RF_LOOP, OP_NONE},
    {R_GENERATE, "/v2/models/m/generate", "POST", AUTH_INFER, RF_DEADLINE, OP_NONE},
    {R_GENERATE_STREAM, "/v2/models/m/generate_stream", "POST", AUTH_INFER, RF_DEADLINE, OP_NONE},
    {R_TOKENIZE, "/v2/models/m/tokenize", "POST", AUTH_INFER, 0, OP_NONE},
    {R_DETOKENIZE, "/v2/models/m/detokenize", "POST", AUTH_INFER, 0, OP_NONE},
    {R_V1_COMPLETIONS, "/v1/completions", "POST", AUTH_INFER, RF_DEADLINE, OP_NONE},
    {R_V1_MODELS, "/v1/models", "GET, HEAD", AUTH_INFER, 0, OP_NONE},
};

static int allows(const char *allow, const char *method) {
  size_t n = strlen(method);
  for (const char *p = allow; (p = strstr(p, method)) != NULL; p += n)
    if ((p == allow || p[-2] == ',') && (p[n] == 0 || p[n] == ',')) return 1;
  return 0;
}

static void test_every_route_method_and_scope(void **s) {
  (void)s;
  int seen[R_COUNT] = {0};
  const char *methods[] = {"GET", "HEAD", "POST", "DELETE", "PUT", "PATCH", "OPTIONS", "TRACE"};
  for (size_t i = 0; i < sizeof want / sizeof *want; i++) {
    int id = want[i].id;
    seen[id]++;
    const route_def *d = route_get(id);
    assert_int_equal(d->id, id);
    assert_non_null(d->run);
    assert_true(d->name && *d->name);
    assert_string_equal(route_name(id), d->name);
    if (d->flags != want[i].flags)
      fail_msg("%s: flags %#x, expected %#x", d->name, d->flags, want[i].flags);
    assert_int_equal(d->scope, want[i].scope);
    assert_int_equal(d->op, want[i].op);
    assert_int_equal(auth_required(id), want[i].scope);
    for (size_t m = 0; m < sizeof methods / sizeof *methods; m++) {
      int rc = parse(methods[m], want[i].path);
      if (allows(want[i].allow, methods[m])) {
        if (rc) fail_msg("%s %s: %s", methods[m], want[i].path, err.msg);
        /* the row answering: this one when it takes the method, else the
         * other row of the same path that does */
        unsigned bit = methods[m][0] == 'G' || methods[m][0] == 'H' ? M_GET
                       : methods[m][0] == 'P'                       ? M_POST
                                                                    : M_DELETE;
        assert_true(route_get(rt.id)->methods & bit);
        assert_string_equal(route_get(rt.id)->pattern, d->pattern);
        if (d->methods & bit) assert_int_equal(rt.id, id);
        assert_string_equal(rt.model, strstr(want[i].path, "models/m") ? "m" : "");
      } else {
        if (rc != -TS_EMETHOD) fail_msg("%s %s: %d (%s)", methods[m], want[i].path, rc, err.msg);
        assert_string_equal(allow, want[i].allow);
        assert_int_equal(http_status_of(rc), 405);
        assert_non_null(strstr(err.msg, want[i].allow));
      }
    }
  }
  for (int id = R_NONE + 1; id < R_COUNT; id++)
    if (seen[id] != 1) fail_msg("route %s is listed %d times here", route_name(id), seen[id]);
  /* what is not a route: scope infer (an anonymous client cannot map the
   * server), no handler */
  assert_int_equal(auth_required(R_NONE), AUTH_INFER);
  assert_int_equal(auth_required(R_COUNT + 7), AUTH_INFER);
  assert_null(route_get(-1)->run);
  assert_string_equal(route_name(R_COUNT), "none");
}

static void test_allow_strings(void **s) {
  (void)s;
  assert_string_equal(route_allow(M_GET), "GET, HEAD");
  assert_string_equal(route_allow(M_POST), "POST");
  assert_string_equal(route_allow(M_DELETE | M_GET), "GET, HEAD, DELETE");
  assert_string_equal(route_allow(M_GET | M_POST | M_DELETE), "GET, HEAD, POST, DELETE");
}

static void test_dispatch(void **s) {
  (void)s;
  route r = {.id = R_LIVE};
  resp out = {0};
  /* a loop-thread row runs inline; a worker row does not */
  assert_int_equal(handle_inline(NULL, &r, "GET", &out), 1);
  assert_int_equal(out.status, 200);
  assert_string_equal(out.body, "{\"live\":true}");
  resp_free(&out);
  r.id = R_INFER;
  assert_int_equal(handle_inline(NULL, &r, "POST", &out), 0);
  r.id = R_NONE;
  assert_int_equal(handle_inline(NULL, &r, "GET", &out), 0);
  /* and a loop-thread row never runs on a worker */
  job j;
  memset(&j, 0, sizeof j);
  j.rt.id = R_LIVE;
  handle_job(&j);
  assert_int_equal(j.out.status, 500);
  resp_free(&j.out);
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
  assert_int_equal(http_status_of(TS_EIO), 500);
  assert_int_equal(http_status_of(999), 500);
  assert_int_equal(http_status_of(TS_STATUS_COUNT), 500);
  assert_string_equal(ts_status_name(-TS_ENOTFOUND), "not found");
  assert_string_equal(ts_status_name(TS_ETIMEOUT), "timeout");
  assert_string_equal(ts_status_name(TS_STATUS_COUNT), "unknown");
  for (int st = 0; st < TS_STATUS_COUNT; st++) {
    assert_true(http_status_of(st) >= 200 && http_status_of(st) < 600);
    assert_true(ts_status_name(st)[0]);
  }
  /* an error answer carries the status's code and its message as JSON */
  resp r = {0};
  resp_errorf(&r, TS_ECONFLICT, "fit of '%s' already running \xc3\xa9", "m");
  assert_int_equal(r.status, 409);
  assert_string_equal(r.body, "{\"error\":\"fit of 'm' already running ??\"}");
  resp_free(&r);
}

int main(void) {
  const struct CMUnitTest tests[] = {cmocka_unit_test(test_routes),
                                     cmocka_unit_test(test_not_found_and_methods),
                                     cmocka_unit_test(test_bad_names_and_versions),
                                     cmocka_unit_test(test_status_table),
                                     cmocka_unit_test(test_every_route_method_and_scope),
                                     cmocka_unit_test(test_allow_strings),
                                     cmocka_unit_test(test_dispatch)};
  return cmocka_run_group_tests(tests, NULL, NULL);
}
