/* routes.c - the route table, path matching and dispatch (see routes.h). */
#include "routes.h"

#include <stdio.h>
#include <string.h>

#include "../base/fsutil.h"
#include "server.h"

static const route_def table[R_COUNT] = {
    [R_NONE] = {R_NONE, "none", "", 0, AUTH_INFER, 0, OP_NONE, NULL},
#define ROUTE_ROW(id, name, pattern, methods, scope, flags, op, run) \
  [id] = {id, name, pattern, methods, scope, flags, op, run},
    ROUTE_TABLE(ROUTE_ROW)
#undef ROUTE_ROW
};

const route_def *route_get(int id) {
  return &table[id > R_NONE && id < R_COUNT ? id : R_NONE];
}

const char *route_name(int id) {
  return route_get(id)->name;
}

const char *route_allow(unsigned methods) {
  static const char *const allow[8] = {
      "",       "GET, HEAD",         "POST",         "GET, HEAD, POST",
      "DELETE", "GET, HEAD, DELETE", "POST, DELETE", "GET, HEAD, POST, DELETE"};
  return allow[methods & 7u];
}

/* ---- matching ------------------------------------------------------------ */

#define MAX_SEG 8
#define SEG_LEN 256

enum { CAP_MODEL, CAP_VERSION, CAP_SESSION, CAP_NAME, CAP_COUNT };

/* Path segments; repeated slashes count as one. -1 too many, -2 one too long. */
static int split(const char *path, char seg[][SEG_LEN], int max) {
  int n = 0;
  const char *p = path;
  while (*p == '/') p++;
  while (*p) {
    const char *e = strchr(p, '/');
    size_t len = e ? (size_t)(e - p) : strlen(p);
    if (n == max) return -1;
    if (len >= SEG_LEN) return -2;
    memcpy(seg[n], p, len);
    seg[n][len] = 0;
    n++;
    p += len;
    while (*p == '/') p++;
  }
  return n;
}

static int capture_of(const char *name, size_t len) {
  if (len == 7 && memcmp(name, "{model}", 7) == 0) return CAP_MODEL;
  if (len == 9 && memcmp(name, "{version}", 9) == 0) return CAP_VERSION;
  if (len == 9 && memcmp(name, "{session}", 9) == 0) return CAP_SESSION;
  if (len == 6 && memcmp(name, "{name}", 6) == 0) return CAP_NAME;
  return -1;
}

/* 1 when seg[i..n) matches the pattern text p; captured segment indices go
 * to cap. A "[...]" group is tried with its text first, then without. */
static int match(const char *p, char seg[][SEG_LEN], int n, int i, int cap[CAP_COUNT]) {
  for (;;) {
    while (*p == '/') p++;
    if (!*p) return i == n;
    if (*p == '[') {
      const char *close = strchr(p, ']');
      if (!close) return 0;
      char with[128];
      int w = snprintf(with, sizeof with, "%.*s%s", (int)(close - p - 1), p + 1, close + 1);
      if (w > 0 && (size_t)w < sizeof with) {
        int saved[CAP_COUNT];
        memcpy(saved, cap, sizeof saved);
        if (match(with, seg, n, i, cap)) return 1;
        memcpy(cap, saved, sizeof saved);
      }
      p = close + 1;
      continue;
    }
    const char *e = p;
    while (*e && *e != '/' && *e != '[') e++;
    size_t len = (size_t)(e - p);
    if (i >= n) return 0;
    if (*p == '{') {
      int c = capture_of(p, len);
      if (c < 0) return 0;
      cap[c] = i;
    } else if (strlen(seg[i]) != len || memcmp(seg[i], p, len) != 0) {
      return 0;
    }
    i++;
    p = e;
  }
}

static unsigned method_bit(const char *m) {
  if (strcmp(m, "GET") == 0 || strcmp(m, "HEAD") == 0) return M_GET;
  if (strcmp(m, "POST") == 0) return M_POST;
  if (strcmp(m, "DELETE") == 0) return M_DELETE;
  return 0;
}

int route_parse(const char *method, const char *path, route *r, const char **allow, ts_err *err) {
  char seg[MAX_SEG][SEG_LEN];
  memset(r, 0, sizeof *r);
  *allow = NULL;
  int n = split(path, seg, MAX_SEG);
  if (n < 0) return ts_errf(err, TS_ENOTFOUND, "unknown route '%.100s'", path);
  unsigned want = method_bit(method), seen = 0;
  const route_def *hit = NULL;
  int cap[CAP_COUNT] = {-1, -1, -1, -1};
  for (int id = R_NONE + 1; id < R_COUNT; id++) {
    int c[CAP_COUNT] = {-1, -1, -1, -1};
    if (!match(table[id].pattern, seg, n, 0, c)) continue;
    seen |= table[id].methods;
    if (!hit && (table[id].methods & want)) {
      hit = &table[id];
      memcpy(cap, c, sizeof cap);
    }
  }
  if (!seen) return ts_errf(err, TS_ENOTFOUND, "unknown route '%.100s'", path);
  if (!hit) {
    *allow = route_allow(seen);
    return ts_errf(err, TS_EMETHOD, "method %s is not allowed on %.100s (allowed: %s)", method,
                   path, *allow);
  }
  r->id = hit->id;
  if (cap[CAP_MODEL] >= 0) {
    const char *m = seg[cap[CAP_MODEL]];
    if (!fs_name_valid(m))
      return ts_errf(err, TS_EINVAL,
                     "'%.100s' is not a valid model name (1 to %d letters, "
                     "digits, '_', '-', '.'; not starting with '.')",
                     m, FS_NAME_MAX);
    snprintf(r->model, sizeof r->model, "%s", m);
  }
  if (cap[CAP_VERSION] >= 0) {
    const char *v = seg[cap[CAP_VERSION]];
    int pv = fs_parse_version(v, &r->version);
    if (pv < 0)
      return ts_errf(err, TS_EINVAL, "version '%.40s' is over the largest version %lld", v,
                     (long long)FS_MAX_VERSION);
    if (pv == 0)
      return ts_errf(err, TS_EINVAL,
                     "version '%.40s' is not a positive integer without leading zeros", v);
  }
  if (cap[CAP_SESSION] >= 0) {
    const char *s = seg[cap[CAP_SESSION]];
    if (!fs_name_valid(s) || strlen(s) >= sizeof r->session)
      return ts_errf(err, TS_ENOTFOUND, "unknown session '%.100s'", s);
    snprintf(r->session, sizeof r->session, "%s", s);
  }
  return 0;
}

/* ---- dispatch -------------------------------------------------------------- */

int handle_inline(server *s, const route *rt, const char *method, resp *out) {
  const route_def *d = route_get(rt->id);
  if (!(d->flags & RF_LOOP) || !d->run) return 0;
  /* A loop-thread handler gets the same job view a worker does, without a
   * body or a version: one handler signature for every row. */
  job j;
  memset(&j, 0, sizeof j);
  j.srv = s;
  j.rt = *rt;
  snprintf(j.method, sizeof j.method, "%s", method);
  d->run(&j);
  resp_free(out);
  *out = j.out;
  return 1;
}

void handle_job(job *j) {
  const route_def *d = route_get(j->rt.id);
  if (d->run && !(d->flags & RF_LOOP)) {
    d->run(j);
    return;
  }
  ts_err err;
  ts_errf(&err, TS_EINTERNAL, "route %s is not served on a worker", d->name);
  resp_error(&j->out, &err);
}
