/* handlers.c - routes and endpoint logic of the OIP v2 server.
 *
 * Cheap endpoints (health, server and model metadata, readiness, index,
 * metrics) answer on the loop thread from the repository's table and the
 * metrics' counters. Everything that
 * decodes tensors, computes, loads or writes runs in handle_job on a worker. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../base/fsutil.h"
#include "../base/jtext.h"
#include "../base/log.h"
#include "../base/mem.h"
#include "../models/model.h"
#include "metrics.h"
#include "oip.h"
#include "server.h"
#include "sessions.h"

/* ---- statuses ----------------------------------------------------------- */

int http_status_of(int st) {
  static const int map[TS_STATUS_COUNT] = {
      [TS_OK] = 200,        [TS_EINVAL] = 400,    [TS_EAUTH] = 401,   [TS_EFORBIDDEN] = 403,
      [TS_ENOTFOUND] = 404, [TS_EMETHOD] = 405,   [TS_ECONFLICT] = 409, [TS_ETOOBIG] = 413,
      [TS_EBUSY] = 429,     [TS_EINTERNAL] = 500, [TS_EUNAVAIL] = 503, [TS_ETIMEOUT] = 504,
      [TS_ENOMEM] = 503,    [TS_EIO] = 500};
  if (st < 0) st = -st;
  return st < TS_STATUS_COUNT ? map[st] : 500;
}

void resp_free(resp *r) {
  tl_free(r->body);
  memset(r, 0, sizeof *r);
}

void resp_json(resp *r, int status, const json_t *j) {
  resp_free(r);
  r->status = status;
  r->body = jtext_dumps(j, JT_COMPACT, NULL);
  if (!r->body) {
    r->status = 503;
    r->body = tl_strdup("{\"error\":\"out of memory\"}");
  }
  r->len = r->body ? strlen(r->body) : 0;
}

static int resp_text(resp *r, int status, const char *json) {
  resp_free(r);
  r->body = tl_strdup(json);
  r->status = r->body ? status : 503;
  r->len = r->body ? strlen(r->body) : 0;
  return 1;
}

void resp_error(resp *r, const ts_err *err) {
  resp_free(r);
  sbuf b;
  sbuf_init(&b);
  sbuf_adds(&b, "{\"error\":");
  /* the message may quote user input: keep it valid UTF-8 JSON */
  char clean[TS_ERR_MSG];
  size_t k = 0;
  for (const unsigned char *p = (const unsigned char *)err->msg; *p && k + 1 < sizeof clean; p++)
    clean[k++] = *p < 0x80 ? (char)*p : '?';
  clean[k] = 0;
  sbuf_json_str(&b, clean[0] ? clean : ts_status_name(err->status));
  sbuf_adds(&b, "}");
  r->status = http_status_of(err->status ? err->status : TS_EINTERNAL);
  r->body = sbuf_take(&b, &r->len);
  if (!r->body) r->len = 0;
}

/* ---- routing ------------------------------------------------------------ */

static const char *route_names[R_COUNT] = {
    "none", "health_live", "health_ready", "server_metadata", "model_metadata", "model_ready",
    "infer", "fit", "evaluate", "calibrate", "session_create", "session", "session_infer",
    "repository_index", "repository_load", "repository_unload", "metrics"};

const char *route_name(int id) { return id >= 0 && id < R_COUNT ? route_names[id] : "none"; }

static int split(const char *path, char seg[][256], int max) {
  int n = 0;
  const char *p = path;
  while (*p == '/') p++;
  while (*p) {
    const char *e = strchr(p, '/');
    size_t len = e ? (size_t)(e - p) : strlen(p);
    if (n == max) return -1;
    if (len >= 256) return -2;
    memcpy(seg[n], p, len);
    seg[n][len] = 0;
    n++;
    p += len;
    while (*p == '/') p++;
  }
  return n;
}

static int valid_name(const char *s) {
  if (!*s || s[0] == '.') return 0;
  for (; *s; s++)
    if (!((*s >= 'a' && *s <= 'z') || (*s >= 'A' && *s <= 'Z') || (*s >= '0' && *s <= '9') ||
          *s == '_' || *s == '-' || *s == '.'))
      return 0;
  return 1;
}


#define M_GET 1
#define M_POST 2
#define M_DELETE 4

static int method_bit(const char *m) {
  if (strcmp(m, "GET") == 0 || strcmp(m, "HEAD") == 0) return M_GET;
  if (strcmp(m, "POST") == 0) return M_POST;
  if (strcmp(m, "DELETE") == 0) return M_DELETE;
  return 0;
}

static const char *allow_of(int bits) {
  switch (bits) {
    case M_GET: return "GET, HEAD";
    case M_POST: return "POST";
    case M_GET | M_DELETE: return "GET, HEAD, DELETE";
    default: return "GET, POST";
  }
}

int route_parse(const char *method, const char *path, route *r, const char **allow, ts_err *err) {
  char seg[8][256];
  memset(r, 0, sizeof *r);
  *allow = NULL;
  int n = split(path, seg, 8);
  if (n < 0)
    return ts_errf(err, TS_ENOTFOUND, "unknown route '%.100s'", path);
  int id = R_NONE, methods = 0, mi = -1, vi = -1, si = -1;
  if (n == 1 && strcmp(seg[0], "metrics") == 0) id = R_METRICS, methods = M_GET;
  else if (n >= 1 && strcmp(seg[0], "v2") == 0) {
    if (n == 1) id = R_SERVER, methods = M_GET;
    else if (n == 3 && strcmp(seg[1], "health") == 0) {
      if (strcmp(seg[2], "live") == 0) id = R_LIVE, methods = M_GET;
      else if (strcmp(seg[2], "ready") == 0) id = R_READY, methods = M_GET;
    } else if (strcmp(seg[1], "repository") == 0) {
      if (n == 3 && strcmp(seg[2], "index") == 0) id = R_REPO_INDEX, methods = M_POST | M_GET;
      else if (n == 5 && strcmp(seg[2], "models") == 0) {
        mi = 3;
        if (strcmp(seg[4], "load") == 0) id = R_REPO_LOAD, methods = M_POST;
        else if (strcmp(seg[4], "unload") == 0) id = R_REPO_UNLOAD, methods = M_POST;
      }
    } else if (strcmp(seg[1], "models") == 0 && n >= 3) {
      mi = 2;
      int k = 3;
      if (n >= 5 && strcmp(seg[3], "versions") == 0) {
        vi = 4;
        k = 5;
      }
      int rest = n - k;
      if (rest == 0) id = R_MODEL_META, methods = M_GET;
      else if (rest == 1 && strcmp(seg[k], "ready") == 0) id = R_MODEL_READY, methods = M_GET;
      else if (rest == 1 && strcmp(seg[k], "infer") == 0) id = R_INFER, methods = M_POST;
      else if (rest == 1 && strcmp(seg[k], "evaluate") == 0) id = R_EVALUATE, methods = M_POST;
      else if (vi < 0 && rest == 1 && strcmp(seg[k], "fit") == 0) id = R_FIT, methods = M_POST;
      else if (vi < 0 && rest == 1 && strcmp(seg[k], "calibrate") == 0)
        id = R_CALIBRATE, methods = M_POST;
      else if (vi < 0 && strcmp(seg[k], "sessions") == 0) {
        if (rest == 1) id = R_SESSIONS, methods = M_POST;
        else if (rest == 2) id = R_SESSION, methods = M_GET | M_DELETE, si = k + 1;
        else if (rest == 3 && strcmp(seg[k + 2], "infer") == 0)
          id = R_SESSION_INFER, methods = M_POST, si = k + 1;
      }
    }
  }
  if (id == R_NONE) return ts_errf(err, TS_ENOTFOUND, "unknown route '%.100s'", path);
  if (!(method_bit(method) & methods)) {
    *allow = allow_of(methods);
    return ts_errf(err, TS_EMETHOD, "method %s is not allowed on %.100s (allowed: %s)", method,
                   path, *allow);
  }
  r->id = id;
  if (mi >= 0) {
    if (!valid_name(seg[mi]))
      return ts_errf(err, TS_EINVAL, "'%.100s' is not a valid model name (letters, digits, '_', "
                     "'-', '.'; not starting with '.')", seg[mi]);
    snprintf(r->model, sizeof r->model, "%s", seg[mi]);
  }
  if (vi >= 0) {
    int pv = fs_parse_version(seg[vi], &r->version);
    if (pv < 0)
      return ts_errf(err, TS_EINVAL, "version '%.40s' is over the largest version %lld", seg[vi],
                     (long long)FS_MAX_VERSION);
    if (pv == 0)
      return ts_errf(err, TS_EINVAL,
                     "version '%.40s' is not a positive integer without leading zeros", seg[vi]);
  }
  if (si >= 0) {
    if (!valid_name(seg[si]) || strlen(seg[si]) >= sizeof r->session)
      return ts_errf(err, TS_ENOTFOUND, "unknown session '%.100s'", seg[si]);
    snprintf(r->session, sizeof r->session, "%s", seg[si]);
  }
  return 0;
}

/* ---- loop-thread endpoints --------------------------------------------- */

int handle_inline(server *s, const route *rt, const char *method, resp *out) {
  (void)method;
  json_t *j = NULL;
  ts_err err = {0};
  int status = 200;
  switch (rt->id) {
    case R_LIVE: /* probes are hit often: a fixed body, no JSON building */
      return resp_text(out, 200, "{\"live\":true}");
    case R_READY: {
      int ready = !atomic_load(&s->draining) && repo_all_ready(s->repo);
      return resp_text(out, ready ? 200 : 503, ready ? "{\"ready\":true}" : "{\"ready\":false}");
    }
    case R_SERVER: {
      json_t *ext = json_pack("[s,s,s,s,s,s,s]", "model_repository", "binary_tensor_data",
                              "classification", "fit",
                              "evaluate", "calibrate", "sessions");
      j = json_pack("{s:s, s:s, s:o}", "name", "tallyd", "version", TALLYD_VERSION, "extensions", ext);
      break;
    }
    case R_MODEL_META:
      if (repo_metadata(s->repo, rt->model, rt->version, &j, &err)) {
        resp_error(out, &err);
        return 1;
      }
      break;
    case R_MODEL_READY: {
      repo_ver *v;
      int rc = repo_acquire(s->repo, rt->model, rt->version, &v, &err);
      if (rc == -TS_ENOTFOUND) {
        resp_error(out, &err);
        return 1;
      }
      if (!rc) repo_release(v);
      j = json_pack("{s:s, s:b}", "name", rt->model, "ready", rc == 0);
      status = rc == 0 ? 200 : 503;
      break;
    }
    case R_REPO_INDEX: j = repo_index(s->repo); break;
    case R_SESSION: return sessions_inline(s, rt, method, out); /* GET; DELETE: a worker */
    case R_METRICS: {
      sbuf b;
      sbuf_init(&b);
      metrics_render(&b, s->repo, pool_queued(s->pool), s->inflight);
      if (sbuf_failed(&b)) {
        sbuf_free(&b);
        ts_errf(&err, TS_ENOMEM, "out of memory");
        resp_error(out, &err);
        return 1;
      }
      resp_free(out);
      out->status = 200;
      out->content_type = "text/plain; version=0.0.4; charset=utf-8";
      out->body = sbuf_take(&b, &out->len);
      return 1;
    }
    default: return 0; /* goes to a worker */
  }
  if (!j) {
    ts_errf(&err, TS_ENOMEM, "out of memory");
    resp_error(out, &err);
    return 1;
  }
  resp_json(out, status, j);
  json_decref(j);
  return 1;
}

/* ---- worker endpoints --------------------------------------------------- */

static void run_model(job *j) {
  server *s = j->srv;
  ts_err err = {0};
  oip_request req;
  md_call call;
  md_call_init(&call);
  /* fit, evaluate and calibrate take many labelled rows by design: their
   * size is bounded by --max-body-bytes and --max-request-elements */
  int rc = job_decode(j, j->ver, j->rt.id == R_INFER, &req, &call, &err);
  if (rc) goto fail;
  const md_kind *k = repo_ver_kind(j->ver);
  int (*fn)(void *, md_call *, ts_err *) = NULL;
  const char *what = route_name(j->rt.id);
  switch (j->rt.id) {
    case R_INFER: fn = k->infer; break;
    case R_FIT: fn = k->fit; break;
    case R_EVALUATE: fn = k->evaluate; break;
    case R_CALIBRATE: fn = k->calibrate; break;
    default: break;
  }
  if (!fn) {
    rc = ts_errf(&err, TS_EINVAL, "model '%s' (kind %s) does not support %s", call.model_name,
                 k->name, what);
    goto fail;
  }
  if ((rc = fn(repo_ver_state(j->ver), &call, &err))) goto fail;
  if (j->rt.id == R_INFER) {
    if ((rc = md_check_finite_outputs(&call, &err))) goto fail;
    if ((rc = job_encode(j, &req, &call, NULL, &err))) goto fail;
    goto done;
  }
  json_t *ans = call.result ? json_incref(call.result) : json_object();
  json_object_set_new(ans, "model_name", json_string(call.model_name));
  if (j->rt.id == R_FIT || j->rt.id == R_CALIBRATE) {
    int64_t nv;
    /* a client already answered 504 (or gone) must not find a new version */
    int running = 0;
    if (!atomic_compare_exchange_strong(&j->claim, &running, 1)) {
      json_decref(ans);
      rc = ts_errf(&err, TS_ETIMEOUT, "the deadline passed before the new version was saved; "
                                      "nothing was saved");
      goto fail;
    }
    if ((rc = repo_commit_version(s->repo, j->ver, &call, &nv, &err))) {
      json_decref(ans);
      goto fail;
    }
    char b[32];
    snprintf(b, sizeof b, "%lld", (long long)nv);
    json_object_set_new(ans, "model_version", json_string(b));
    json_object_set_new(ans, "parent_version", json_integer(call.version));
  } else {
    char b[32];
    snprintf(b, sizeof b, "%lld", (long long)call.version);
    json_object_set_new(ans, "model_version", json_string(b));
  }
  if (req.id) json_object_set_new(ans, "id", json_string(req.id));
  resp_json(&j->out, 200, ans);
  json_decref(ans);
  goto done;
fail:
  if (err.status == TS_EINTERNAL) log_error("%s %s: %s", route_name(j->rt.id), j->rt.model, err.msg);
  resp_error(&j->out, &err);
done:
  md_call_free(&call);
  oip_request_free(&req);
}

static void run_repo(job *j) {
  ts_err err = {0};
  int rc = j->rt.id == R_REPO_LOAD ? repo_load_model(j->srv->repo, j->rt.model, &err)
                                   : repo_unload_model(j->srv->repo, j->rt.model, &err);
  if (rc) {
    resp_error(&j->out, &err);
    return;
  }
  json_t *o = json_object();
  resp_json(&j->out, 200, o);
  json_decref(o);
}

void handle_job(job *j) {
  switch (j->rt.id) {
    case R_INFER:
    case R_FIT:
    case R_EVALUATE:
    case R_CALIBRATE: run_model(j); break;
    case R_REPO_LOAD:
    case R_REPO_UNLOAD: run_repo(j); break;
    case R_SESSIONS:
    case R_SESSION:
    case R_SESSION_INFER: sessions_job(j); break;
    default: {
      ts_err err;
      ts_errf(&err, TS_ENOTFOUND, "route %s is not served by this build", route_name(j->rt.id));
      resp_error(&j->out, &err);
    }
  }
}
