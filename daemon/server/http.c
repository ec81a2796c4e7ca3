/* http.c - libmicrohttpd in external epoll mode under one libuv loop.
 *
 * Per connection request (hreq), loop thread only:
 *   first call      -> set up state; 413 at once when Content-Length > cap
 *   body chunks     -> append up to the cap (chunked bodies over it: 413)
 *   body complete   -> route; cheap endpoints answer now, the rest become a
 *                      job on the pool and the connection is suspended
 *   job done        -> (uv_async) resume; the next call queues the answer
 * The response to a request is never queued on the first call unless it is
 * an early 413: per libmicrohttpd, that would close keep-alive connections.
 * A sweep timer (10 ms) answers 504 for jobs past their deadline and drives
 * the drain at shutdown.
 *
 * Operation (docs/operations.md): credentials are checked on the first call,
 * from the route alone, and a refusal is answered before the body is read;
 * CORS preflights (OPTIONS, when --cors-origin is set) are answered once the
 * request is complete; every answered request feeds metrics.c; TLS and the
 * connection limits are libmicrohttpd options; rescans run on a worker, one
 * at a time; the systemd notify protocol is spoken from here and main.c. */
#include <arpa/inet.h>
#include <errno.h>
#include <malloc.h>
#include <microhttpd.h>
#include <netdb.h>
#include <openssl/crypto.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "../base/fsutil.h"
#include "../base/log.h"
#include "../base/mem.h"
#include "../base/randid.h"
#include "../models/model.h"
#include "metrics.h"
#include "notify.h"
#include "server.h"

enum { H_NEW, H_BODY, H_WAITING, H_DONE };

typedef struct hreq {
  server *srv;
  struct MHD_Connection *conn;
  int phase;
  int reject_status; /* 413 etc. decided while reading */
  char *body;
  size_t len, cap;
  route rt;
  char method[8];
  char path[512];
  char request_id[80];
  double t0;
  job *job;
  resp out;
  int suspended;
  int preflight;              /* a CORS preflight (OPTIONS) */
  int64_t served_version;     /* the version a job ran on (metrics) */
  char cors_origin[256];      /* Access-Control-Allow-Origin to send; "" none */
  struct hreq *wprev, *wnext; /* list of hreqs waiting on jobs */
} hreq;

/* ---- small helpers ------------------------------------------------------ */

/* Request ids: 12 random bytes from the loop thread's block (base/randid.h).
 * Should the generator fail, a process-unique counter still labels the log
 * line and the answer. */
static void new_request_id(char *out, size_t n) {
  static unsigned long long seq;
  if (rid_make(out, n, 12, RID_HEX, RID_POOLED, NULL)) snprintf(out, n, "local-%llu", ++seq);
}

static int header_ok(const char *v) {
  if (!v || !*v || strlen(v) > 64) return 0;
  for (; *v; v++)
    if (!((*v >= 'a' && *v <= 'z') || (*v >= 'A' && *v <= 'Z') || (*v >= '0' && *v <= '9') ||
          *v == '-' || *v == '_' || *v == '.' || *v == ':'))
      return 0;
  return 1;
}

static void waiting_add(server *s, hreq *h) {
  hreq *head = s->waiting;
  h->wprev = NULL;
  h->wnext = head;
  if (head) head->wprev = h;
  s->waiting = h;
}

static void waiting_del(server *s, hreq *h) {
  if (h->wprev) h->wprev->wnext = h->wnext;
  else if (s->waiting == h) s->waiting = h->wnext;
  if (h->wnext) h->wnext->wprev = h->wprev;
  h->wprev = h->wnext = NULL;
}

static void run_mhd(server *s);

static void resume(hreq *h) {
  if (h->suspended) {
    h->suspended = 0;
    MHD_resume_connection(h->conn);
  }
}

/* Detaches h from its job: the worker's result will be dropped. */
static void abandon(server *s, hreq *h) {
  if (!h->job) return;
  int running = 0;
  atomic_compare_exchange_strong(&h->job->claim, &running, 2);
  h->job->cancelled = 1;
  h->job->conn_req = NULL;
  h->job = NULL;
  waiting_del(s, h);
}

static void finish_with(hreq *h, resp *r) {
  resp_free(&h->out);
  h->out = *r;
  memset(r, 0, sizeof *r);
  h->phase = H_DONE;
}

static void error_resp(resp *r, int status, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void error_resp(resp *r, int status, const char *fmt, ...) {
  ts_err e;
  va_list ap;
  va_start(ap, fmt);
  ts_verrf(&e, status, fmt, ap);
  va_end(ap);
  resp_error(r, &e);
}

/* ---- the job round trip ------------------------------------------------- */

static void job_run(void *arg) {
  job *j = arg;
  j->t_start = md_now();
  double dl = atomic_load(&j->deadline);
  if (j->cancelled || (dl > 0 && j->t_start > dl)) {
    ts_err e;
    ts_errf(&e, TS_ETIMEOUT, "the request waited in the queue past its deadline");
    resp_error(&j->out, &e);
  } else {
    handle_job(j);
  }
  j->t_end = md_now();
  server *s = j->srv;
  uv_mutex_lock(&s->done_mu);
  j->next = s->done_head;
  s->done_head = j;
  uv_mutex_unlock(&s->done_mu);
  uv_async_send(&s->done_async);
}

static void job_free(job *j) {
  if (j->fit_claimed) repo_fit_end(j->srv->repo, j->rt.model);
  if (j->ver) repo_release(j->ver);
  tl_free(j->body);
  resp_free(&j->out);
  tl_free(j);
}

static void on_done(uv_async_t *a) {
  server *s = a->data;
  uv_mutex_lock(&s->done_mu);
  job *list = s->done_head;
  s->done_head = NULL;
  uv_mutex_unlock(&s->done_mu);
  while (list) {
    job *j = list;
    list = j->next;
    s->inflight--;
    const char *ep = route_name(j->rt.id);
    const char *model = j->ver ? repo_ver_model(j->ver) : j->rt.model;
    if (j->t_start > 0) metrics_job(model, ep, j->t_start - j->t_submit, j->t_end - j->t_start);
    if (route_get(j->rt.id)->flags & RF_FIT) metrics_fit(j->rt.model, j->out.status == 200);
    hreq *h = j->conn_req;
    if (h) {
      h->served_version = j->ver ? repo_ver_version(j->ver) : 0;
      h->job = NULL;
      waiting_del(s, h);
      finish_with(h, &j->out);
      resume(h);
    }
    job_free(j);
  }
  run_mhd(s);
}

/* Hands the request to the pool; on refusal answers at once. */
static void submit(server *s, hreq *h) {
  job *j = tl_calloc(1, sizeof *j);
  if (!j) {
    error_resp(&h->out, TS_ENOMEM, "out of memory");
    h->phase = H_DONE;
    return;
  }
  j->srv = s;
  j->rt = h->rt;
  memcpy(j->method, h->method, sizeof j->method);
  j->body = h->body;
  j->len = h->len;
  h->body = NULL;
  h->len = h->cap = 0;
  const char *hl =
      MHD_lookup_connection_value(h->conn, MHD_HEADER_KIND, "Inference-Header-Content-Length");
  if (hl) {
    char *end;
    long long v = strtoll(hl, &end, 10);
    if (*end || v < 0 || (size_t)v > j->len) {
      error_resp(&h->out, TS_EINVAL, "Inference-Header-Content-Length '%.40s' is not a length "
                                     "within the body", hl);
      h->phase = H_DONE;
      job_free(j);
      return;
    }
    j->json_len = (size_t)v;
  }
  j->t_submit = md_now();
  const route_def *d = route_get(j->rt.id);
  if (s->cfg->request_timeout_ms > 0 && (d->flags & RF_DEADLINE))
    atomic_store(&j->deadline, j->t_submit + (double)s->cfg->request_timeout_ms / 1000.0);
  /* claims that must fail fast, on the loop thread */
  ts_err err = {0};
  int rc = 0;
  if (d->flags & RF_FIT) {
    rc = repo_fit_begin(s->repo, j->rt.model, &err);
    if (!rc) j->fit_claimed = 1;
  }
  if (!rc && (d->flags & RF_VERSION))
    rc = repo_acquire(s->repo, j->rt.model, j->rt.version, &j->ver, &err);
  if (!rc && (rc = pool_submit(s->pool, job_run, j)) != 0) {
    if (rc == -TS_EBUSY)
      ts_errf(&err, TS_EBUSY, "the work queue is full (%d waiting); retry shortly",
              (int)s->cfg->queue_depth);
    else
      ts_errf(&err, -rc, "the daemon is shutting down");
  }
  if (rc) {
    resp_error(&h->out, &err);
    if (rc == -TS_EBUSY) h->out.retry_after = 1;
    h->phase = H_DONE;
    job_free(j);
    return;
  }
  s->inflight++;
  j->conn_req = h;
  h->job = j;
  h->phase = H_WAITING;
  waiting_add(s, h);
}

/* ---- libmicrohttpd callbacks ------------------------------------------- */

static enum MHD_Result queue(hreq *h) {
  resp *r = &h->out;
  struct MHD_Response *m = MHD_create_response_from_buffer(r->len, r->body, MHD_RESPMEM_MUST_FREE);
  if (!m) return MHD_NO;
  r->body = NULL; /* MHD frees it (with free(3), which tl_free wraps) */
  MHD_add_response_header(m, MHD_HTTP_HEADER_CONTENT_TYPE,
                          r->content_type ? r->content_type : "application/json");
  MHD_add_response_header(m, "X-Request-Id", h->request_id);
  if (r->retry_after) {
    char b[16];
    snprintf(b, sizeof b, "%d", r->retry_after);
    MHD_add_response_header(m, MHD_HTTP_HEADER_RETRY_AFTER, b);
  }
  if (r->allow) MHD_add_response_header(m, MHD_HTTP_HEADER_ALLOW, r->allow);
  if (r->status == 401)
    MHD_add_response_header(m, MHD_HTTP_HEADER_WWW_AUTHENTICATE, "Bearer realm=\"tallyd\"");
  if (h->srv->cfg->cors_origin) {
    /* the answer depends on Origin: caches must keep one per origin */
    MHD_add_response_header(m, MHD_HTTP_HEADER_VARY, "Origin");
    if (h->cors_origin[0]) {
      MHD_add_response_header(m, MHD_HTTP_HEADER_ACCESS_CONTROL_ALLOW_ORIGIN, h->cors_origin);
      MHD_add_response_header(m, "Access-Control-Expose-Headers",
                              "X-Request-Id, Inference-Header-Content-Length, Retry-After");
    }
    if (h->preflight && h->cors_origin[0]) {
      MHD_add_response_header(m, "Access-Control-Allow-Methods", "GET, HEAD, POST, DELETE, OPTIONS");
      MHD_add_response_header(m, "Access-Control-Allow-Headers",
                              "Authorization, X-Api-Key, Content-Type, X-Request-Id, "
                              "Inference-Header-Content-Length");
      MHD_add_response_header(m, "Access-Control-Max-Age", "600");
    }
  }
  if (r->json_len) {
    char b[32];
    snprintf(b, sizeof b, "%zu", r->json_len);
    MHD_add_response_header(m, "Inference-Header-Content-Length", b);
  }
  if (atomic_load(&h->srv->draining)) MHD_add_response_header(m, MHD_HTTP_HEADER_CONNECTION, "close");
  enum MHD_Result ret = MHD_queue_response(h->conn, (unsigned)r->status, m);
  MHD_destroy_response(m);
  return ret;
}

/* Sets h->cors_origin when the request's Origin is among --cors-origin. */
static void cors_match(server *s, hreq *h) {
  const char *list = s->cfg->cors_origin;
  const char *origin = MHD_lookup_connection_value(h->conn, MHD_HEADER_KIND, "Origin");
  if (!list || !origin || !*origin || strlen(origin) >= sizeof h->cors_origin) return;
  for (const char *p = list; *p;) {
    while (*p == ' ' || *p == ',') p++;
    const char *e = p;
    while (*e && *e != ',') e++;
    size_t n = (size_t)(e - p);
    while (n && p[n - 1] == ' ') n--;
    if ((n == 1 && *p == '*') || (n == strlen(origin) && strncmp(p, origin, n) == 0)) {
      /* "*" answers "*": credentials then go in headers, never cookies */
      snprintf(h->cors_origin, sizeof h->cors_origin, "%s", n == 1 && *p == '*' ? "*" : origin);
      return;
    }
    p = e;
  }
}

/* The key the client presented: "Authorization: Bearer <key>" or
 * "X-Api-Key: <key>". NULL when neither. */
static const char *presented_key(struct MHD_Connection *conn, size_t *len) {
  const char *a = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_AUTHORIZATION);
  const char *k = NULL;
  if (a && strncasecmp(a, "Bearer ", 7) == 0) {
    k = a + 7;
    while (*k == ' ') k++;
  } else {
    k = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "X-Api-Key");
  }
  if (!k) return NULL;
  size_t n = strlen(k);
  while (n && (k[n - 1] == ' ' || k[n - 1] == '\t')) n--;
  *len = n;
  return n ? k : NULL;
}

/* 1 when h may go on; else fills h->out with 401/403 and returns 0. Decided
 * from the route alone, before any model is looked up. */
static int authorize(server *s, hreq *h, const char *method, const char *url) {
  if (!s->keys) return 1;
  route rt;
  const char *allow;
  ts_err err = {0};
  auth_scope need = route_parse(method, url, &rt, &allow, &err) ? AUTH_INFER : auth_required(rt.id);
  if (need == AUTH_NONE) return 1;
  size_t n = 0;
  const char *key = presented_key(h->conn, &n);
  auth_scope got = key ? auth_lookup(s->keys, key, n) : AUTH_NONE;
  if (got >= need) return 1;
  h->rt.id = rt.id; /* for the request metrics; no model name before access */
  if (!key)
    error_resp(&h->out, TS_EAUTH, "credentials required: send 'Authorization: Bearer <key>' or "
                                  "'X-Api-Key: <key>'");
  else if (got == AUTH_NONE)
    error_resp(&h->out, TS_EAUTH, "the API key is not valid");
  else
    error_resp(&h->out, TS_EFORBIDDEN, "this key's scope (%s) does not allow %s %s (needs %s)",
               auth_scope_name(got), method, route_name(rt.id), auth_scope_name(need));
  return 0;
}

static enum MHD_Result on_access(void *cls, struct MHD_Connection *conn, const char *url,
                                 const char *method, const char *version,
                                 const char *upload_data, size_t *upload_data_size,
                                 void **con_cls) {
  (void)version;
  server *s = cls;
  hreq *h = *con_cls;
  if (!h) {
    h = tl_calloc(1, sizeof *h);
    if (!h) return MHD_NO;
    *con_cls = h;
    h->srv = s;
    h->conn = conn;
    h->t0 = md_now();
    snprintf(h->method, sizeof h->method, "%s", method);
    snprintf(h->path, sizeof h->path, "%s", url);
    const char *rid = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "X-Request-Id");
    if (header_ok(rid)) snprintf(h->request_id, sizeof h->request_id, "%s", rid);
    else new_request_id(h->request_id, sizeof h->request_id);
    metrics_inflight_add(1);
    cors_match(s, h);
    if (s->cfg->cors_origin && strcmp(method, "OPTIONS") == 0) {
      h->preflight = 1; /* answered once complete: browsers send no credentials here */
      h->phase = H_BODY;
      return MHD_YES;
    }
    if (!authorize(s, h, method, url)) {
      h->phase = H_DONE;
      return queue(h); /* refused before the body is read; MHD closes */
    }
    const char *cl = MHD_lookup_connection_value(conn, MHD_HEADER_KIND,
                                                 MHD_HTTP_HEADER_CONTENT_LENGTH);
    if (cl) {
      char *end;
      unsigned long long n = strtoull(cl, &end, 10);
      if (*end == 0 && n > (unsigned long long)s->cfg->max_body_bytes) {
        error_resp(&h->out, TS_ETOOBIG, "the body (%llu bytes) is larger than the limit of %lld bytes",
                   n, (long long)s->cfg->max_body_bytes);
        h->phase = H_DONE;
        return queue(h); /* answered before the body is read; MHD closes */
      }
    }
    h->phase = H_BODY;
    return MHD_YES;
  }
  if (h->phase == H_BODY && *upload_data_size) {
    size_t n = *upload_data_size;
    *upload_data_size = 0;
    if (h->reject_status) return MHD_YES; /* discard the rest */
    if (h->len + n > (size_t)s->cfg->max_body_bytes) {
      h->reject_status = 413;
      tl_free(h->body);
      h->body = NULL;
      h->len = h->cap = 0;
      return MHD_YES;
    }
    if (h->len + n + 1 > h->cap) {
      size_t nc = h->cap ? h->cap : 4096;
      while (nc < h->len + n + 1) nc *= 2;
      if (nc > (size_t)s->cfg->max_body_bytes + 1) nc = (size_t)s->cfg->max_body_bytes + 1;
      char *p = tl_realloc(h->body, nc);
      if (!p) {
        h->reject_status = 503;
        return MHD_YES;
      }
      h->body = p;
      h->cap = nc;
    }
    memcpy(h->body + h->len, upload_data, n);
    h->len += n;
    return MHD_YES;
  }
  if (h->phase == H_BODY) { /* the whole request is here */
    if (h->reject_status == 413) {
      error_resp(&h->out, TS_ETOOBIG, "the body is larger than the limit of %lld bytes",
                 (long long)s->cfg->max_body_bytes);
      h->phase = H_DONE;
    } else if (h->reject_status) {
      error_resp(&h->out, TS_ENOMEM, "out of memory reading the body");
      h->phase = H_DONE;
    } else if (h->preflight) {
      if (h->cors_origin[0]) {
        resp_free(&h->out);
        h->out.status = 204;
      } else {
        error_resp(&h->out, TS_EFORBIDDEN, "origin not allowed (see --cors-origin)");
      }
      h->phase = H_DONE;
    } else {
      const char *allow = NULL;
      ts_err err = {0};
      int rc = route_parse(method, url, &h->rt, &allow, &err);
      if (rc) {
        resp_error(&h->out, &err);
        h->out.allow = allow;
        h->phase = H_DONE;
      } else if (atomic_load(&s->draining) && !(route_get(h->rt.id)->flags & RF_DRAIN)) {
        error_resp(&h->out, TS_EUNAVAIL, "the daemon is shutting down");
        h->phase = H_DONE;
      } else if (handle_inline(s, &h->rt, method, &h->out)) {
        h->phase = H_DONE;
      } else {
        submit(s, h);
      }
    }
    if (h->phase == H_WAITING) {
      h->suspended = 1;
      MHD_suspend_connection(conn);
      return MHD_YES;
    }
  }
  if (h->phase == H_DONE) return queue(h);
  return MHD_YES;
}

static void on_completed(void *cls, struct MHD_Connection *conn, void **con_cls,
                         enum MHD_RequestTerminationCode toe) {
  (void)conn;
  (void)toe;
  server *s = cls;
  hreq *h = *con_cls;
  if (!h) return;
  *con_cls = NULL;
  if (h->job) abandon(s, h);
  int status = h->out.status ? h->out.status : 500;
  double secs = md_now() - h->t0;
  /* model labels only for models that exist (bounded cardinality) */
  int named = h->rt.model[0] && status != 401 && status != 403 && status != 404;
  int64_t ver = h->served_version ? h->served_version : (status < 400 ? h->rt.version : 0);
  metrics_request(named ? h->rt.model : "", named ? ver : 0, route_name(h->rt.id), status, secs);
  metrics_inflight_add(-1);
  log_request(h->method, h->path, status, (unsigned long long)h->out.len, secs * 1000.0, h->request_id, h->rt.model[0] ? h->rt.model : NULL);
  resp_free(&h->out);
  tl_free(h->body);
  tl_free(h);
}

/* ---- driving MHD from libuv -------------------------------------------- */

static void on_mhd_timer(uv_timer_t *t) { run_mhd(t->data); }

static void run_mhd(server *s) {
  if (!s->mhd) return;
  MHD_run(s->mhd);
  MHD_UNSIGNED_LONG_LONG to;
  int have = MHD_get_timeout(s->mhd, &to) == MHD_YES;
  /* At its connection limit (--max-connections, or its own one derived
   * from the descriptor limit) libmicrohttpd takes the listening socket out
   * of its epoll set and puts it back only inside a later MHD_run, which no
   * event would cause once the connections are gone: run at least every
   * 100 ms (one epoll_wait(0) each, nothing measurable). */
  if (!have || to > 100) {
    have = 1;
    to = 100;
  }
  if (have) uv_timer_start(&s->mhd_timer, on_mhd_timer, to, 0);
  else uv_timer_stop(&s->mhd_timer);
}

static void on_mhd_poll(uv_poll_t *p, int status, int events) {
  (void)status;
  (void)events;
  run_mhd(p->data);
}

static void shutdown_now(server *s) {
  if (s->stopping) return;
  s->stopping = 1;
  /* every suspended connection must be resumed before MHD_stop_daemon */
  for (hreq *h = s->waiting; h;) {
    hreq *n = h->wnext;
    abandon(s, h);
    error_resp(&h->out, TS_EUNAVAIL, "the daemon stopped before the request finished");
    h->phase = H_DONE;
    resume(h);
    h = n;
  }
  run_mhd(s);
  uv_poll_stop(&s->mhd_poll);
  MHD_stop_daemon(s->mhd);
  s->mhd = NULL;
  uv_stop(s->loop);
}

/* After a burst of connections closes, the memory of their buffers sits in
 * malloc's free lists; hand it back to the system so resident memory returns
 * to where it was (checked once a second, trimmed only after a real drop). */
static void trim_after_burst(server *s) {
  if (!s->mhd) return;
  const union MHD_DaemonInfo *di = MHD_get_daemon_info(s->mhd, MHD_DAEMON_INFO_CURRENT_CONNECTIONS);
  unsigned now = di ? di->num_connections : 0;
  if (now > s->conn_peak) s->conn_peak = now; /* sampled every tick (10 ms) */
  if (++s->trim_ticks < 100) return;
  s->trim_ticks = 0;
  if (s->conn_peak - now >= 256) malloc_trim(0);
  s->conn_peak = now;
}

static void on_sweep(uv_timer_t *t) {
  server *s = t->data;
  double now = md_now();
  int expired = 0;
  trim_after_burst(s);
  for (hreq *h = s->waiting; h;) {
    hreq *n = h->wnext;
    double dl = h->job ? atomic_load(&h->job->deadline) : 0;
    int running = 0;
    if (dl > 0 && now > dl && atomic_compare_exchange_strong(&h->job->claim, &running, 2)) {
      abandon(s, h);
      error_resp(&h->out, TS_ETIMEOUT, "the request's deadline passed before its result was ready");
      h->phase = H_DONE;
      resume(h);
      expired = 1;
    }
    h = n;
  }
  if (expired) run_mhd(s);
  if (atomic_load(&s->draining)) {
    double limit = (double)s->cfg->drain_timeout_ms / 1000.0;
    if (s->inflight == 0 || now - s->drain_started > limit) {
      if (s->inflight) log_warn("drain timeout: %d requests still running", s->inflight);
      shutdown_now(s);
    }
  }
}

/* ---- rescans, key reloads, systemd ------------------------------------- */

static void sync_job(void *arg) {
  server *s = arg;
  for (;;) {
    repo_sync(s->repo);
    uv_mutex_lock(&s->sync_mu);
    int again = s->sync_again;
    s->sync_again = 0;
    if (!again) s->sync_busy = 0;
    uv_mutex_unlock(&s->sync_mu);
    if (!again) break;
  }
  int ready, n = repo_count_models(s->repo, &ready);
  if (atomic_exchange(&s->reloading, 0))
    notify_sendf("READY=1\nSTATUS=serving %d of %d models (reloaded)", ready, n);
  else
    notify_sendf("STATUS=serving %d of %d models", ready, n);
}

void server_schedule_sync(server *s, const char *why) {
  uv_mutex_lock(&s->sync_mu);
  int busy = s->sync_busy;
  if (busy) s->sync_again = 1; /* the running rescan goes round once more */
  else s->sync_busy = 1;
  uv_mutex_unlock(&s->sync_mu);
  if (busy) return;
  log_debug("%s: rescanning the model repository", why);
  /* loading is slow: it runs on a worker, never on the loop thread */
  if (pool_submit(s->pool, sync_job, s) != 0) {
    uv_mutex_lock(&s->sync_mu);
    s->sync_busy = 0;
    uv_mutex_unlock(&s->sync_mu);
    log_warn("%s: the work queue is full; rescan skipped", why);
    if (atomic_exchange(&s->reloading, 0)) notify_send("READY=1\nSTATUS=reload skipped (queue full)");
  }
}

static void on_poll_timer(uv_timer_t *t) { server_schedule_sync(t->data, "repository poll"); }

static void on_watchdog(uv_timer_t *t) {
  (void)t;
  notify_send("WATCHDOG=1"); /* sent by the loop thread: proves it is not stuck */
}

static void reload_keys(server *s) {
  if (!s->cfg->api_key_file) return;
  auth_keys *k = NULL;
  ts_err err = {0};
  if (auth_load(s->cfg->api_key_file, &k, &err)) {
    log_error("SIGHUP: %s; keeping the %d keys in force", err.msg, auth_count(s->keys));
    return;
  }
  auth_free(s->keys);
  s->keys = k;
  log_info("SIGHUP: %d API keys from %s", auth_count(k), s->cfg->api_key_file);
}

static unsigned long long monotonic_usec(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (unsigned long long)ts.tv_sec * 1000000ull + (unsigned long long)ts.tv_nsec / 1000u;
}

static void on_signal(uv_signal_t *sig, int signum) {
  server *s = sig->data;
  if (signum == SIGHUP) {
    if (atomic_load(&s->draining)) return;
    log_info("SIGHUP: rescanning the model repository");
    notify_sendf("RELOADING=1\nMONOTONIC_USEC=%llu\nSTATUS=reloading", monotonic_usec());
    atomic_store(&s->reloading, 1);
    reload_keys(s);
    server_schedule_sync(s, "SIGHUP");
    return;
  }
  if (atomic_load(&s->draining)) return;
  notify_sendf("STOPPING=1\nSTATUS=draining %d requests", s->inflight);
  uv_timer_stop(&s->poll_timer);
  log_info("%s: draining (%d requests in flight, up to %lld ms)",
           signum == SIGTERM ? "SIGTERM" : "SIGINT", s->inflight,
           (long long)s->cfg->drain_timeout_ms);
  atomic_store(&s->draining, 1);
  s->drain_started = md_now();
  MHD_socket ls = MHD_quiesce_daemon(s->mhd);
  if (ls != MHD_INVALID_SOCKET) close(ls);
}

static int is_loopback(const struct sockaddr_storage *sa) {
  if (sa->ss_family == AF_INET)
    return (ntohl(((const struct sockaddr_in *)sa)->sin_addr.s_addr) >> 24) == 127;
  if (sa->ss_family == AF_INET6) {
    const struct in6_addr *a = &((const struct sockaddr_in6 *)sa)->sin6_addr;
    if (IN6_IS_ADDR_LOOPBACK(a)) return 1;
    if (IN6_IS_ADDR_V4MAPPED(a)) return a->s6_addr[12] == 127;
  }
  return 0;
}

int server_init(server *s, srv_config *cfg, ts_err *err) {
  memset(s, 0, sizeof *s);
  s->cfg = cfg;
  s->loop = uv_default_loop();
  uv_mutex_init(&s->sync_mu);
  char host[256];
  int port;
  int rc = cfg_listen(cfg, host, sizeof host, &port, err);
  if (rc) return rc;
  struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM,
                           .ai_flags = AI_NUMERICHOST | AI_PASSIVE};
  struct addrinfo *ai = NULL;
  if (strcmp(host, "localhost") == 0) snprintf(host, sizeof host, "127.0.0.1");
  if (getaddrinfo(host, NULL, &hints, &ai) != 0 || !ai)
    return ts_errf(err, TS_EINVAL, "--listen: '%s' is not a numeric IP address", host);
  struct sockaddr_storage sa;
  memcpy(&sa, ai->ai_addr, ai->ai_addrlen);
  int v6 = ai->ai_family == AF_INET6;
  freeaddrinfo(ai);
  if (v6) ((struct sockaddr_in6 *)&sa)->sin6_port = htons((uint16_t)port);
  else ((struct sockaddr_in *)&sa)->sin_port = htons((uint16_t)port);

  if ((rc = pool_create(&s->pool, (int)cfg->threads, (int)cfg->queue_depth)))
    return ts_errf(err, TS_EINTERNAL, "cannot start the worker pool");
  pool_set_default(s->pool);
  if ((rc = repo_open(&s->repo, cfg->model_repository, (const char *const *)cfg->models, s->pool,
                      err)))
    return rc;
  repo_set_weights_load(s->repo, cfg->weights_load && strcmp(cfg->weights_load, "read") == 0
                                     ? ST_READ
                                     : ST_MMAP);

  if (cfg->api_key_file) {
    if ((rc = auth_load(cfg->api_key_file, &s->keys, err))) return rc;
    log_info("%d API keys from %s", auth_count(s->keys), cfg->api_key_file);
  } else if (!is_loopback(&sa)) {
    log_warn("*** serving %s WITHOUT credentials: anyone who can reach this address may infer, "
             "fit, load and unload models. Set --api-key-file (keys from tallyd --keygen). ***",
             cfg->listen);
  }

  unsigned flags = MHD_USE_EPOLL | MHD_ALLOW_SUSPEND_RESUME | MHD_USE_ERROR_LOG |
                   (v6 ? MHD_USE_IPv6 : 0);
  struct MHD_OptionItem ops[8];
  int no = 0;
  if (cfg->tls_cert) {
    if (MHD_is_feature_supported(MHD_FEATURE_TLS) != MHD_YES)
      return ts_errf(err, TS_EINVAL, "--tls-cert: this libmicrohttpd was built without TLS");
    size_t n;
    if ((rc = fs_read_file(cfg->tls_cert, 1 << 20, &s->tls_cert_pem, &n, err)) ||
        (rc = fs_read_file(cfg->tls_key, 1 << 20, &s->tls_key_pem, &n, err)))
      return rc;
    flags |= MHD_USE_TLS;
    ops[no++] = (struct MHD_OptionItem){MHD_OPTION_HTTPS_MEM_CERT, 0, s->tls_cert_pem};
    ops[no++] = (struct MHD_OptionItem){MHD_OPTION_HTTPS_MEM_KEY, 0, s->tls_key_pem};
  }
  /* Without --max-connections libmicrohttpd stops near FD_SETSIZE (1020),
   * which epoll does not need: raise the soft descriptor limit to the hard
   * one and allow connections up to it, keeping room for weights, logs and
   * the repository scan. */
  int64_t conn_limit = cfg->max_connections;
  if (conn_limit <= 0) {
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
      rlim_t want = rl.rlim_max == RLIM_INFINITY || rl.rlim_max > (1u << 20) ? (1u << 20) : rl.rlim_max;
      if (rl.rlim_cur < want) {
        rl.rlim_cur = want;
        setrlimit(RLIMIT_NOFILE, &rl);
        getrlimit(RLIMIT_NOFILE, &rl);
      }
      if (rl.rlim_cur != RLIM_INFINITY && rl.rlim_cur > 1024 + 256)
        conn_limit = (int64_t)rl.rlim_cur - 256;
    }
  }
  if (conn_limit > 0)
    ops[no++] = (struct MHD_OptionItem){MHD_OPTION_CONNECTION_LIMIT, (intptr_t)conn_limit, NULL};
  if (cfg->connection_timeout > 0)
    ops[no++] = (struct MHD_OptionItem){MHD_OPTION_CONNECTION_TIMEOUT,
                                        (intptr_t)cfg->connection_timeout, NULL};
  ops[no++] = (struct MHD_OptionItem){MHD_OPTION_END, 0, NULL};
  s->mhd = MHD_start_daemon(flags, (uint16_t)port, NULL, NULL, on_access, s,
                            MHD_OPTION_SOCK_ADDR, (struct sockaddr *)&sa,
                            MHD_OPTION_NOTIFY_COMPLETED, on_completed, s,
                            /* libmicrohttpd zeroes the whole per-connection pool after
                             * every request: 128 KiB cost 60% of GET throughput in
                             * bench/run.sh, 32 KiB (its default) about 10%. */
                            MHD_OPTION_CONNECTION_MEMORY_LIMIT, (size_t)(32 * 1024),
                            MHD_OPTION_LISTENING_ADDRESS_REUSE, (unsigned)1,
                            /* 0 is libmicrohttpd's own "no limit" */
                            MHD_OPTION_PER_IP_CONNECTION_LIMIT, (unsigned)cfg->per_ip_connections,
                            MHD_OPTION_ARRAY, ops,
                            MHD_OPTION_END);
  if (!s->mhd)
    return ts_errf(err, TS_EINVAL, "cannot listen on %s: %s", cfg->listen, strerror(errno));
  const union MHD_DaemonInfo *di = MHD_get_daemon_info(s->mhd, MHD_DAEMON_INFO_BIND_PORT);
  s->port = di ? di->port : port;
  di = MHD_get_daemon_info(s->mhd, MHD_DAEMON_INFO_EPOLL_FD);
  if (!di) return ts_errf(err, TS_EINTERNAL, "libmicrohttpd has no epoll descriptor");
  uv_poll_init(s->loop, &s->mhd_poll, di->epoll_fd);
  s->mhd_poll.data = s;
  uv_poll_start(&s->mhd_poll, UV_READABLE, on_mhd_poll);
  uv_timer_init(s->loop, &s->mhd_timer);
  s->mhd_timer.data = s;
  uv_timer_init(s->loop, &s->sweep_timer);
  s->sweep_timer.data = s;
  uv_timer_start(&s->sweep_timer, on_sweep, 10, 10);
  uv_mutex_init(&s->done_mu);
  uv_async_init(s->loop, &s->done_async, on_done);
  s->done_async.data = s;
  uv_signal_init(s->loop, &s->sig_term);
  uv_signal_init(s->loop, &s->sig_int);
  uv_signal_init(s->loop, &s->sig_hup);
  s->sig_term.data = s->sig_int.data = s->sig_hup.data = s;
  uv_signal_start(&s->sig_term, on_signal, SIGTERM);
  uv_signal_start(&s->sig_int, on_signal, SIGINT);
  uv_signal_start(&s->sig_hup, on_signal, SIGHUP);
  uv_timer_init(s->loop, &s->poll_timer);
  s->poll_timer.data = s;
  if (cfg->repository_poll_secs > 0) {
    uint64_t ms = (uint64_t)cfg->repository_poll_secs * 1000;
    uv_timer_start(&s->poll_timer, on_poll_timer, ms, ms);
  }
  uv_timer_init(s->loop, &s->watchdog_timer);
  s->watchdog_timer.data = s;
  uint64_t wd = notify_watchdog_usec();
  if (wd) {
    uint64_t ms = wd / 2000 ? wd / 2000 : 1;
    uv_timer_start(&s->watchdog_timer, on_watchdog, ms, ms);
    log_info("systemd watchdog: WATCHDOG=1 every %llu ms", (unsigned long long)ms);
  }
  return 0;
}

int server_run(server *s) {
  run_mhd(s);
  uv_run(s->loop, UV_RUN_DEFAULT);
  return s->exit_code;
}

static void close_cb(uv_handle_t *h) { (void)h; }

void server_free(server *s) {
  if (s->mhd) {
    shutdown_now(s);
  }
  uv_handle_t *hs[] = {(uv_handle_t *)&s->mhd_poll,  (uv_handle_t *)&s->mhd_timer,
                       (uv_handle_t *)&s->sweep_timer, (uv_handle_t *)&s->done_async,
                       (uv_handle_t *)&s->sig_term,   (uv_handle_t *)&s->sig_int,
                       (uv_handle_t *)&s->sig_hup,    (uv_handle_t *)&s->poll_timer,
                       (uv_handle_t *)&s->watchdog_timer};
  for (size_t i = 0; i < sizeof hs / sizeof *hs; i++)
    if (hs[i]->loop && !uv_is_closing(hs[i])) uv_close(hs[i], close_cb);
  uv_run(s->loop, UV_RUN_NOWAIT);
  /* workers finish what they hold; their results are dropped */
  pool_destroy(s->pool);
  s->pool = NULL;
  job *list = s->done_head;
  while (list) {
    job *n = list->next;
    job_free(list);
    list = n;
  }
  s->done_head = NULL;
  repo_close(s->repo);
  s->repo = NULL;
  auth_free(s->keys);
  s->keys = NULL;
  if (s->tls_key_pem) OPENSSL_cleanse(s->tls_key_pem, strlen(s->tls_key_pem));
  tl_free(s->tls_key_pem);
  tl_free(s->tls_cert_pem);
  s->tls_key_pem = s->tls_cert_pem = NULL;
  uv_mutex_destroy(&s->sync_mu);
  uv_mutex_destroy(&s->done_mu);
  uv_loop_close(s->loop);
}
