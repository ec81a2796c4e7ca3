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
 * The lifecycle's sweep timer (10 ms, lifecycle.c) calls transport_sweep,
 * which answers 504 for jobs past their deadline and cancels the jobs of
 * clients that hung up.
 *
 * This file is the transport: libmicrohttpd, connections, bodies, framing,
 * the job round trip. lifecycle.c owns what lives around it (start and stop,
 * signals, reload, watchdog, drain, memory trim).
 *
 * Operation (docs/operations.md): ambiguous body framing (request smuggling)
 * and paths with control characters are refused on the first call, from the
 * raw headers and the raw target; credentials are checked on the first
 * call, from the route alone, and a refusal is answered before the body is
 * read; CORS preflights (OPTIONS, when --cors-origin is set) are answered
 * once the request is complete; every answered request feeds metrics.c; TLS
 * and the connection limits are libmicrohttpd options. */
#include <arpa/inet.h>
#include <errno.h>
#include <microhttpd.h>
#include <netdb.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "../base/fsutil.h"
#include "../base/log.h"
#include "../base/mem.h"
#include "../base/randid.h"
#include "../base/zcodec.h"
#include "../models/model.h"
#include "metrics.h"
#include "server.h"
#include "sched.h"
#include "stream.h"
#include "trace.h"
#include "transport.h"

enum { H_NEW, H_BODY, H_WAITING, H_DONE };

/* GnuTLS priority string (libmicrohttpd's TLS): its defaults, less every
 * protocol version below TLS 1.2. */
#define TLS_PRIORITIES "NORMAL:-VERS-ALL:+VERS-TLS1.3:+VERS-TLS1.2"

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
  int suspend_next;            /* suspend at the next call (see on_access) */
  int fd;                      /* the connection's socket (hang-up checks) */
  int tls, http11;             /* how a hang-up can be told from a half-close */
  double rdhup_at;             /* when the peer's FIN was first seen; 0 never */
  int probed;                  /* the 102 probe was sent */
  int must_close;              /* answer with "Connection: close" */
  int bad_target;              /* the raw request target holds NUL or a control */
  int preflight;               /* a CORS preflight (OPTIONS) */
  int req_coding, resp_coding; /* zc_coding of the body; the one the answer may use */
  int64_t served_version;      /* the version a job ran on (metrics) */
  char cors_origin[256];       /* Access-Control-Allow-Origin to send; "" none */
  struct hreq *wprev, *wnext;  /* list of hreqs waiting on jobs */

  /* tracing (trace.h) */
  trace_req *tr;                      /* a sampled request's spans; NULL */
  double t_answer;                    /* the answer was queued (the send span) */
  char traceparent[TRACE_HEADER_LEN]; /* to answer with; "" when tracing is off */
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

/* 1 when the peer has shut down its sending side (a FIN is queued). */
static int peer_half_closed(int fd) {
  if (fd < 0) return 0;
  struct pollfd p = {.fd = fd, .events = POLLRDHUP};
  return poll(&p, 1, 0) == 1 && (p.revents & (POLLRDHUP | POLLHUP | POLLERR));
}

/* RFC 9110 5.1: a field name is a token. */
static int is_token(const char *k) {
  if (!*k) return 0;
  for (; *k; k++) {
    unsigned char c = (unsigned char)*k;
    if (c <= 32 || c >= 127 || strchr("\"(),/:;<=>?@[\\]{}", c)) return 0;
  }
  return 1;
}

typedef struct framing {
  int n_cl, n_te, bad_name, bad_te, bad_cl;
  char name[64];
} framing;

static enum MHD_Result framing_seen(void *cls, enum MHD_ValueKind kind, const char *key,
                                    const char *value) {
  (void)kind;
  framing *f = cls;
  /* libmicrohttpd 0.9.x appends an obs-fold continuation line to the field
   * NAME ("Content-Length: 0" + " 156" becomes "Content-Length156: 0"), so a
   * folded framing header shows as a longer name that starts with one */
  static const char *const framing_names[] = {MHD_HTTP_HEADER_CONTENT_LENGTH,
                                              MHD_HTTP_HEADER_TRANSFER_ENCODING};
  int folded = 0;
  for (size_t i = 0; i < 2; i++) {
    size_t n = strlen(framing_names[i]);
    if (strncasecmp(key, framing_names[i], n) == 0 && key[n]) folded = 1;
  }
  if (folded || !is_token(key)) {
    if (!f->bad_name) snprintf(f->name, sizeof f->name, "%s", key);
    f->bad_name = 1;
  } else if (strcasecmp(key, MHD_HTTP_HEADER_CONTENT_LENGTH) == 0) {
    f->n_cl++;
    /* 1*DIGIT only: libmicrohttpd joins an obs-fold continuation with
     * spaces ("0" + " 156" -> "0 156") and reads the leading number */
    size_t n = value ? strlen(value) : 0;
    while (n && (value[n - 1] == ' ' || value[n - 1] == '\t')) n--;
    if (!n || strspn(value, "0123456789") != n) f->bad_cl = 1;
  } else if (strcasecmp(key, MHD_HTTP_HEADER_TRANSFER_ENCODING) == 0) {
    f->n_te++;
    if (!value || strcasecmp(value, "chunked") != 0) f->bad_te = 1;
  }
  return MHD_YES;
}

/* Request smuggling (RFC 9112 5.1, 6.1, 6.3): a body framed two ways, or by
 * a header this daemon and a proxy in front of it could read differently,
 * is refused and the connection closed. libmicrohttpd keeps the first
 * Content-Length, takes "Content-Length : N" as some other header, applies
 * chunked over Content-Length and glues an obs-fold line to the header
 * name; only the header list as parsed shows it.
 * 0 when the framing is unambiguous, else fills err. */
static int check_framing(struct MHD_Connection *conn, ts_err *err) {
  framing f = {0};
  MHD_get_connection_values(conn, MHD_HEADER_KIND, framing_seen, &f);
  if (f.bad_name)
    return ts_errf(err, TS_EINVAL,
                   "header name '%.40s' is not a token, or a folded framing "
                   "header (whitespace before the colon? obs-fold?)",
                   f.name);
  if (f.n_cl > 1) return ts_errf(err, TS_EINVAL, "more than one Content-Length header");
  if (f.bad_cl)
    return ts_errf(err, TS_EINVAL, "Content-Length is not a decimal number (a folded line?)");
  if (f.n_te && f.n_cl) return ts_errf(err, TS_EINVAL, "both Transfer-Encoding and Content-Length");
  if (f.n_te > 1 || f.bad_te)
    return ts_errf(err, TS_EINVAL, "Transfer-Encoding other than a single 'chunked'");
  return 0;
}

/* 1 when the raw request path (before any %-decoding) holds a NUL or a
 * control character, raw or %-encoded: libmicrohttpd decodes the URL before
 * on_access, where "m1%00" has become "m1". The query is not looked at. */
static int target_has_control(const char *uri) {
  for (const char *p = uri; *p && *p != '?' && *p != '#'; p++) {
    unsigned char c = (unsigned char)*p;
    if (c < 32 || c == 127) return 1;
    if (c == '%' && p[1] && p[2]) {
      int hi = p[1] >= '0' && p[1] <= '9' ? p[1] - '0' : -1;
      char lo = (char)(p[2] | 32);
      if ((hi == 0 || hi == 1) && ((lo >= '0' && lo <= '9') || (lo >= 'a' && lo <= 'f'))) return 1;
      if (hi == 7 && (lo == 'f')) return 1;
    }
  }
  return 0;
}

static void waiting_add(server *s, hreq *h) {
  hreq *head = s->waiting;
  h->wprev = NULL;
  h->wnext = head;
  if (head) head->wprev = h;
  s->waiting = h;
}

static void waiting_del(server *s, hreq *h) {
  if (h->wprev)
    h->wprev->wnext = h->wnext;
  else if (s->waiting == h)
    s->waiting = h->wnext;
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

/* A compressed body (Content-Encoding) made plain before the handler sees
 * it, held to --max-body-bytes after inflating; 0 or an answer in j->out. */
static int inflate_body(job *j) {
  ts_err e = {0};
  char *plain;
  size_t n;
  size_t cap = (size_t)j->srv->cfg->max_body_bytes;
  if (zc_inflate((zc_coding)j->req_coding, j->body ? j->body : "", j->len, cap, &plain, &n, &e)) {
    resp_error(&j->out, &e);
    return -1;
  }
  tl_free(j->body);
  j->body = plain;
  j->len = n;
  if (j->json_len > n) {
    resp_errorf(&j->out, TS_EINVAL,
                "Inference-Header-Content-Length %zu is over the inflated "
                "body's %zu bytes",
                j->json_len, n);
    return -1;
  }
  return 0;
}

/* Compresses a successful answer the client accepts compressed (the
 * transport's Accept-Encoding choice); a failure sends it as it is. Level 1:
 * JSON numbers shrink nearly as far as at level 6 in a fraction of the time,
 * and this runs on every such answer. */
static void compress_answer(job *j) {
  resp *r = &j->out;
  if (j->resp_coding == ZC_IDENTITY || r->status < 200 || r->status >= 300 || !r->body ||
      r->len < ZC_MIN_BYTES)
    return;
  char *z;
  size_t zn;
  ts_err e = {0};
  if (zc_compress((zc_coding)j->resp_coding, r->body, r->len, 1, &z, &zn, &e)) return;
  tl_free(r->body);
  r->body = z;
  r->len = zn;
  r->content_encoding = zc_name((zc_coding)j->resp_coding);
}

/* Sends a finished job back to the loop thread. */
static void job_done(job *j) {
  j->t_end = md_now();
  server *s = j->srv;
  uv_mutex_lock(&s->done_mu);
  j->next = s->done_head;
  s->done_head = j;
  uv_mutex_unlock(&s->done_mu);
  uv_async_send(&s->done_async);
}

void job_defer(job *j) {
  atomic_fetch_add(&j->owners, 1);
}

void job_finish(job *j) {
  if (atomic_fetch_sub(&j->owners, 1) != 1) return;
  compress_answer(j);
  job_done(j);
}

static void job_run(void *arg) {
  job *j = arg;
  j->t_start = md_now();
  atomic_store(&j->owners, 1);
  double dl = atomic_load(&j->deadline);
  if (j->cancelled || (dl > 0 && j->t_start > dl)) {
    ts_err e;
    ts_errf(&e, TS_ETIMEOUT, "the request waited in the queue past its deadline");
    resp_error(&j->out, &e);
  } else if (j->req_coding == ZC_IDENTITY || inflate_body(j) == 0) {
    j->req_coding = ZC_IDENTITY;
    /* a body whose priority could only be read here (compressed, or too
     * long for the loop thread) goes back to its place at its own level */
    if (j->place && sched_requeue(j->srv, j, job_run)) return;
    handle_job(j);
  }
  job_finish(j);
}

static void job_free(job *j) {
  if (j->fit_claimed) repo_fit_end(j->srv->repo, j->rt.model);
  if (j->ver) repo_release(j->ver);
  trace_release(j->trace);
  tl_free(j->body);
  resp_free(&j->out);
  tl_free(j);
}

static void on_done(uv_async_t *a) {
  server *s = a->data;
  stream_wake_all(s);
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
    if (j->rt.id == R_INFER && j->ver && j->t_start > 0) {
      /* Triton's statistics: a request the client was answered 504 for (or
       * that lost its client) counts as failed, whatever the worker made */
      int ok = h && j->out.status == 200 && j->t_computed > 0;
      repo_infer_times t = {.ok = ok,
                            .batch = j->batch,
                            .total = j->t_end - j->t_submit,
                            .queue = j->t_start - j->t_submit,
                            .input = ok ? j->t_decoded - j->t_start : 0,
                            .infer = ok ? j->t_computed - j->t_decoded : 0,
                            .output = ok ? j->t_end - j->t_computed : 0};
      repo_ver_record(j->ver, &t);
    }
    if (h) {
      trace_job_times(h->tr, j->t_submit, j->t_start, j->t_decoded, j->t_computed, j->t_end);
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
  trace_hold(h->tr); /* the job may outlive the request (a 504) */
  j->trace = h->tr;
  memcpy(j->method, h->method, sizeof j->method);
  j->body = h->body;
  j->len = h->len;
  j->req_coding = h->req_coding;
  j->resp_coding = h->resp_coding;
  memcpy(j->request_id, h->request_id, sizeof j->request_id);
  h->body = NULL;
  h->len = h->cap = 0;
  const char *hl =
      MHD_lookup_connection_value(h->conn, MHD_HEADER_KIND, "Inference-Header-Content-Length");
  if (hl) {
    char *end;
    long long v = strtoll(hl, &end, 10);
    /* a compressed body's length is checked once inflated (job_run) */
    if (*end || v < 0 || (j->req_coding == ZC_IDENTITY && (size_t)v > j->len)) {
      error_resp(&h->out, TS_EINVAL,
                 "Inference-Header-Content-Length '%.40s' is not a length "
                 "within the body",
                 hl);
      h->phase = H_DONE;
      job_free(j);
      return;
    }
    j->json_len = (size_t)v;
  }
  j->t_submit = md_now();
  const route_def *d = route_get(j->rt.id);
  /* claims that must fail fast, on the loop thread */
  ts_err err = {0};
  int rc = 0;
  if (d->flags & RF_FIT) {
    rc = repo_fit_begin(s->repo, j->rt.model, &err);
    if (!rc) j->fit_claimed = 1;
  }
  if (!rc && (d->flags & RF_VERSION))
    rc = repo_acquire(s->repo, j->rt.model, j->rt.version, &j->ver, &err);
  /* the model's queue, lane and priority level (sched.c) */
  if (!rc) rc = sched_submit(s, j, job_run, &err);
  if (rc) {
    resp_error(&h->out, &err);
    if (err.status == TS_EBUSY) h->out.retry_after = 1;
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

static ssize_t stream_reader(void *cls, uint64_t pos, char *buf, size_t max) {
  (void)pos;
  return stream_read(cls, buf, max);
}

static void stream_freed(void *cls) {
  stream_detach(cls);
}

static enum MHD_Result queue(hreq *h) {
  resp *r = &h->out;
  struct MHD_Response *m;
  if (h->tr) h->t_answer = md_now();
  if (r->stream) {
    /* a body produced while it is sent: chunked, read from the stream */
    gstream *st = r->stream;
    m = MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 4096, stream_reader, st, stream_freed);
    if (!m) return MHD_NO;
    r->stream = NULL; /* the response holds the transport's reference now */
    st->conn = h->conn;
    st->attached = 1;
    st->live_next = h->srv->live_streams;
    if (st->live_next) st->live_next->live_prev = st;
    h->srv->live_streams = st;
    MHD_add_response_header(m, "Cache-Control", "no-cache");
    MHD_add_response_header(m, "X-Accel-Buffering", "no"); /* nginx: pass events on at once */
  } else {
    m = MHD_create_response_from_buffer(r->len, r->body, MHD_RESPMEM_MUST_FREE);
    if (!m) return MHD_NO;
    r->body = NULL; /* MHD frees it (with free(3), which tl_free wraps) */
  }
  MHD_add_response_header(m, MHD_HTTP_HEADER_CONTENT_TYPE,
                          r->content_type ? r->content_type : "application/json");
  MHD_add_response_header(m, "X-Request-Id", h->request_id);
  if (h->traceparent[0]) MHD_add_response_header(m, "traceparent", h->traceparent);
  if (r->retry_after) {
    char b[16];
    snprintf(b, sizeof b, "%d", r->retry_after);
    MHD_add_response_header(m, MHD_HTTP_HEADER_RETRY_AFTER, b);
  }
  if (r->allow) MHD_add_response_header(m, MHD_HTTP_HEADER_ALLOW, r->allow);
  if (r->status == 401)
    MHD_add_response_header(m, MHD_HTTP_HEADER_WWW_AUTHENTICATE, "Bearer realm=\"tallyd\"");
  if (r->content_encoding)
    MHD_add_response_header(m, MHD_HTTP_HEADER_CONTENT_ENCODING, r->content_encoding);
  /* caches must keep one answer per Origin (CORS) and, where a worker may
   * compress it, per Accept-Encoding */
  int may_compress = h->rt.id != R_NONE && !(route_get(h->rt.id)->flags & RF_LOOP);
  if (h->srv->cfg->cors_origin)
    MHD_add_response_header(m, MHD_HTTP_HEADER_VARY,
                            may_compress ? "Origin, Accept-Encoding" : "Origin");
  else if (may_compress)
    MHD_add_response_header(m, MHD_HTTP_HEADER_VARY, "Accept-Encoding");
  if (h->srv->cfg->cors_origin) {
    if (h->cors_origin[0]) {
      MHD_add_response_header(m, MHD_HTTP_HEADER_ACCESS_CONTROL_ALLOW_ORIGIN, h->cors_origin);
      MHD_add_response_header(m, "Access-Control-Expose-Headers",
                              "X-Request-Id, Inference-Header-Content-Length, Retry-After, "
                              "traceparent");
    }
    if (h->preflight && h->cors_origin[0]) {
      MHD_add_response_header(m, "Access-Control-Allow-Methods",
                              "GET, HEAD, POST, DELETE, OPTIONS");
      MHD_add_response_header(m, "Access-Control-Allow-Headers",
                              "Authorization, X-Api-Key, Content-Type, X-Request-Id, "
                              "Inference-Header-Content-Length, traceparent, tracestate");
      MHD_add_response_header(m, "Access-Control-Max-Age", "600");
    }
  }
  if (r->json_len) {
    char b[32];
    snprintf(b, sizeof b, "%zu", r->json_len);
    MHD_add_response_header(m, "Inference-Header-Content-Length", b);
  }
  /* A client that has half-closed sends nothing more: closing now frees the
   * descriptor (libmicrohttpd reads the FIN only on a later readiness edge,
   * which never comes when the FIN arrived with the request). Requests it
   * pipelined behind this one are not answered; RFC 9112 9.3.2 has such
   * clients retry them. */
  if (h->must_close || atomic_load(&h->srv->draining) || peer_half_closed(h->fd))
    MHD_add_response_header(m, MHD_HTTP_HEADER_CONNECTION, "close");
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
    error_resp(&h->out, TS_EAUTH,
               "credentials required: send 'Authorization: Bearer <key>' or "
               "'X-Api-Key: <key>'");
  else if (got == AUTH_NONE)
    error_resp(&h->out, TS_EAUTH, "the API key is not valid");
  else
    error_resp(&h->out, TS_EFORBIDDEN, "this key's scope (%s) does not allow %s %s (needs %s)",
               auth_scope_name(got), method, route_name(rt.id), auth_scope_name(need));
  return 0;
}

/* libmicrohttpd's URI log callback: the first sight of a request, with the
 * target as the client sent it (on_access gets it %-decoded). The hreq is
 * made here; on_access completes it on its first call. */
static void *on_uri(void *cls, const char *uri, struct MHD_Connection *conn) {
  (void)cls;
  (void)conn;
  hreq *h = tl_calloc(1, sizeof *h);
  if (h) h->bad_target = target_has_control(uri);
  return h; /* NULL: on_access makes one and skips the raw check */
}

/* Answers on the first call, before the body is read; the connection is
 * closed after it (libmicrohttpd discards the unread body). */
static enum MHD_Result refuse_early(hreq *h) {
  h->phase = H_DONE;
  h->must_close = 1;
  return queue(h);
}

static enum MHD_Result on_access(void *cls, struct MHD_Connection *conn, const char *url,
                                 const char *method, const char *version, const char *upload_data,
                                 size_t *upload_data_size, void **con_cls) {
  server *s = cls;
  hreq *h = *con_cls;
  if (!h || h->phase == H_NEW) {
    if (!h && !(h = tl_calloc(1, sizeof *h))) return MHD_NO;
    *con_cls = h;
    h->srv = s;
    h->conn = conn;
    h->t0 = md_now();
    h->phase = H_BODY;
    if (trace_on()) h->tr = trace_begin_conn(conn, h->t0, h->traceparent);
    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info(conn, MHD_CONNECTION_INFO_CONNECTION_FD);
    h->fd = ci ? ci->connect_fd : -1;
    h->tls = s->cfg->tls_cert != NULL;
    h->http11 = version && strcmp(version, MHD_HTTP_VERSION_1_1) == 0;
    snprintf(h->method, sizeof h->method, "%s", method);
    snprintf(h->path, sizeof h->path, "%s", url);
    const char *rid = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "X-Request-Id");
    if (header_ok(rid))
      snprintf(h->request_id, sizeof h->request_id, "%s", rid);
    else
      new_request_id(h->request_id, sizeof h->request_id);
    metrics_inflight_add(1);
    cors_match(s, h);
    ts_err ferr = {0};
    if (check_framing(conn, &ferr)) {
      resp_error(&h->out, &ferr);
      return refuse_early(h);
    }
    if (h->bad_target) {
      error_resp(&h->out, TS_EINVAL, "the request path holds a NUL or control character");
      return refuse_early(h);
    }
    if (s->cfg->cors_origin && strcmp(method, "OPTIONS") == 0) {
      h->preflight = 1; /* answered once complete: browsers send no credentials here */
      return MHD_YES;
    }
    if (!authorize(s, h, method, url)) return refuse_early(h);
    zc_coding coding;
    if (zc_parse_content_encoding(
            MHD_lookup_connection_value(conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_ENCODING),
            &coding, &ferr)) {
      resp_error(&h->out, &ferr);
      return refuse_early(h);
    }
    h->req_coding = coding;
    h->resp_coding = zc_choose(
        MHD_lookup_connection_value(conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_ACCEPT_ENCODING));
    const char *cl =
        MHD_lookup_connection_value(conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_LENGTH);
    if (cl) {
      char *end;
      unsigned long long n = strtoull(cl, &end, 10);
      if (*end == 0 && n > (unsigned long long)s->cfg->max_body_bytes) {
        error_resp(&h->out, TS_ETOOBIG,
                   "the body (%llu bytes) is larger than the limit of %lld bytes", n,
                   (long long)s->cfg->max_body_bytes);
        return refuse_early(h);
      }
    }
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
    if (h->tr) trace_set_phase(h->tr, TRP_RECEIVE, h->t0, md_now());
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
    /* Suspend at the next call, not this one: libmicrohttpd keeps a
     * suspended connection's event state as it was before this call
     * (reading), and on resume reads first; a client that half-closed after
     * sending then has its connection closed on the read of the FIN, before
     * its answer is queued. After this call returns without an answer the
     * state is "blocked", which is kept through the suspension and never
     * reads. The next call comes at once (libmicrohttpd runs a blocked
     * connection again on the next pass); a fast job may be done by then. */
    if (h->phase == H_WAITING) {
      h->suspend_next = 1;
      return MHD_YES;
    }
  }
  if (h->phase == H_WAITING) {
    if (h->suspend_next && !h->suspended) {
      h->suspend_next = 0;
      h->suspended = 1;
      MHD_suspend_connection(conn);
    }
    return MHD_YES;
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
  if (h->phase == H_NEW) { /* libmicrohttpd refused it before on_access */
    tl_free(h);
    return;
  }
  if (h->job) abandon(s, h);
  int status = h->out.status ? h->out.status : 500;
  double secs = md_now() - h->t0;
  /* model labels only for models that exist (bounded cardinality) */
  int named = h->rt.model[0] && status != 401 && status != 403 && status != 404;
  int64_t ver = h->served_version ? h->served_version : (status < 400 ? h->rt.version : 0);
  metrics_request(named ? h->rt.model : "", named ? ver : 0, route_name(h->rt.id), status, secs);
  metrics_inflight_add(-1);
  if (h->tr) {
    double now = md_now();
    trace_set_phase(h->tr, TRP_SEND, h->t_answer, now);
    trace_end(h->tr, h->rt.id != R_NONE ? route_get(h->rt.id)->pattern : NULL, h->method,
              named ? h->rt.model : NULL, named ? ver : 0, status, h->request_id, now);
    h->tr = NULL;
  }
  log_request(h->method, h->path, status, (unsigned long long)h->out.len, secs * 1000.0,
              h->request_id, h->rt.model[0] ? h->rt.model : NULL);
  resp_free(&h->out);
  tl_free(h->body);
  tl_free(h);
}

/* ---- driving MHD from libuv -------------------------------------------- */

static void on_mhd_timer(uv_timer_t *t) {
  run_mhd(t->data);
}

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
  if (have)
    uv_timer_start(&s->mhd_timer, on_mhd_timer, to, 0);
  else
    uv_timer_stop(&s->mhd_timer);
}

static void on_mhd_poll(uv_poll_t *p, int status, int events) {
  (void)status;
  (void)events;
  run_mhd(p->data);
}

/* A client that hangs up while its job runs (defect: work outlived its
 * client). libmicrohttpd does not watch a suspended connection, so the
 * sweep does: a reset (POLLERR/POLLHUP) is a hang-up. A FIN alone
 * (POLLRDHUP) is what close() and shutdown(SHUT_WR) both send; a client
 * that only half-closed still reads its answer. After HANGUP_GRACE seconds
 * of FIN with the job still running, a plain HTTP/1.1 connection is probed
 * with an interim "102 Processing" (RFC 9110 15.2: clients parse 1xx): a
 * closed socket answers it with a reset, a half-closed one reads it. TLS and
 * HTTP/1.0 connections cannot be probed: their FIN counts as a hang-up after
 * the grace. A job shorter than the grace is never probed. */
#define HANGUP_GRACE 0.25

static int hung_up(hreq *h, short revents, double now) {
  if (revents & (POLLERR | POLLHUP | POLLNVAL)) return 1;
  if (!(revents & POLLRDHUP)) return 0;
  if (h->rdhup_at == 0) h->rdhup_at = now;
  if (now - h->rdhup_at < HANGUP_GRACE || h->probed) return 0;
  if (h->tls || !h->http11) return 1;
  static const char probe[] = "HTTP/1.1 102 Processing\r\n\r\n";
  h->probed = 1;
  ssize_t n = send(h->fd, probe, sizeof probe - 1, MSG_NOSIGNAL | MSG_DONTWAIT);
  return n < 0 && (errno == EPIPE || errno == ECONNRESET);
}

/* Deadlines and hang-ups of the requests waiting on jobs; called by the
 * lifecycle's sweep timer every 10 ms. */
/* one poll(2) for every waiting socket a sweep; loop thread only */
static struct pollfd *sweep_pf;
static size_t pf_cap;

void transport_sweep(server *s, double now) {
  int expired = 0;
  struct pollfd *pf = sweep_pf;
  size_t n_wait = 0;
  for (hreq *h = s->waiting; h; h = h->wnext) n_wait++;
  if (n_wait > pf_cap) {
    size_t nc = n_wait < 64 ? 64 : n_wait * 2;
    struct pollfd *p = tl_realloc(pf, nc * sizeof *p);
    if (p) {
      sweep_pf = pf = p;
      pf_cap = nc;
    }
  }
  size_t k = 0;
  for (hreq *h = s->waiting; h && k < pf_cap; h = h->wnext, k++)
    pf[k] = (struct pollfd){.fd = h->fd, .events = POLLRDHUP}; /* fd -1: ignored by poll */
  if (k && poll(pf, (nfds_t)k, 0) < 0)
    for (size_t i = 0; i < k; i++) pf[i].revents = 0;
  k = 0;
  for (hreq *h = s->waiting; h; k++) {
    hreq *n = h->wnext;
    int running = 0;
    short ev = k < pf_cap ? pf[k].revents : 0;
    if (h->job && hung_up(h, ev, now) &&
        atomic_compare_exchange_strong(&h->job->claim, &running, 2)) {
      abandon(s, h); /* the job stops at its next deadline check; nothing is published */
      error_resp(&h->out, TS_EUNAVAIL, "the client closed the connection");
      h->out.status = 499; /* logged and counted as nginx does; nobody reads it */
      h->must_close = 1;
      h->phase = H_DONE;
      resume(h);
      expired = 1;
    }
    h = n;
  }
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
}

unsigned transport_connections(server *s) {
  if (!s->mhd) return 0;
  const union MHD_DaemonInfo *di = MHD_get_daemon_info(s->mhd, MHD_DAEMON_INFO_CURRENT_CONNECTIONS);
  return di ? di->num_connections : 0;
}

void transport_quiesce(server *s) {
  if (!s->mhd) return;
  MHD_socket ls = MHD_quiesce_daemon(s->mhd);
  if (ls != MHD_INVALID_SOCKET) close(ls);
}

void transport_stop(server *s) {
  if (!s->mhd) return;
  stream_stop_all(s);
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
  tl_free(sweep_pf);
  sweep_pf = NULL;
  pf_cap = 0;
}

void transport_run(server *s) {
  run_mhd(s);
}

void transport_drop_done(server *s) {
  job *list = s->done_head;
  while (list) {
    job *n = list->next;
    job_free(list);
    list = n;
  }
  s->done_head = NULL;
}

int transport_start(server *s, const struct sockaddr_storage *sa, int v6, int port, ts_err *err) {
  const srv_config *cfg = s->cfg;
  unsigned flags =
      MHD_USE_EPOLL | MHD_ALLOW_SUSPEND_RESUME | MHD_USE_ERROR_LOG | (v6 ? MHD_USE_IPv6 : 0);
  struct MHD_OptionItem ops[8];
  int no = 0;
  if (s->tls_cert_pem) {
    if (MHD_is_feature_supported(MHD_FEATURE_TLS) != MHD_YES)
      return ts_errf(err, TS_EINVAL, "--tls-cert: this libmicrohttpd was built without TLS");
    flags |= MHD_USE_TLS;
    ops[no++] = (struct MHD_OptionItem){MHD_OPTION_HTTPS_MEM_CERT, 0, s->tls_cert_pem};
    ops[no++] = (struct MHD_OptionItem){MHD_OPTION_HTTPS_MEM_KEY, 0, s->tls_key_pem};
    /* TLS 1.2 and 1.3 only: 1.0 and 1.1 are deprecated (RFC 8996) */
    ops[no++] = (struct MHD_OptionItem){MHD_OPTION_HTTPS_PRIORITIES, 0, (void *)TLS_PRIORITIES};
  }
  if (s->conn_limit > 0)
    ops[no++] = (struct MHD_OptionItem){MHD_OPTION_CONNECTION_LIMIT, (intptr_t)s->conn_limit, NULL};
  if (cfg->connection_timeout > 0)
    ops[no++] = (struct MHD_OptionItem){MHD_OPTION_CONNECTION_TIMEOUT,
                                        (intptr_t)cfg->connection_timeout, NULL};
  ops[no++] = (struct MHD_OptionItem){MHD_OPTION_END, 0, NULL};
  uv_mutex_init(&s->done_mu);
  s->done_mu_ready = 1;
  uv_async_init(s->loop, &s->done_async, on_done);
  s->done_async.data = s;
  /* No MHD_OPTION_LISTENING_ADDRESS_REUSE: with it a second daemon on the
   * same port started and the kernel split the clients between the two. */
  errno = 0;
  s->mhd = MHD_start_daemon(flags, (uint16_t)port, NULL, NULL, on_access, s, MHD_OPTION_SOCK_ADDR,
                            (struct sockaddr *)sa, MHD_OPTION_NOTIFY_COMPLETED, on_completed, s,
                            MHD_OPTION_URI_LOG_CALLBACK, on_uri, s,
                            /* libmicrohttpd zeroes the whole per-connection pool after
                             * every request: 128 KiB cost 60% of GET throughput in
                             * bench/run.sh, 32 KiB (its default) about 10%. */
                            MHD_OPTION_CONNECTION_MEMORY_LIMIT, (size_t)(32 * 1024),
                            /* 0 is libmicrohttpd's own "no limit" */
                            MHD_OPTION_PER_IP_CONNECTION_LIMIT, (unsigned)cfg->per_ip_connections,
                            MHD_OPTION_ARRAY, ops, MHD_OPTION_END);
  if (!s->mhd) {
    int e = errno;
    if (e == EADDRINUSE)
      return ts_errf(err, TS_EINVAL,
                     "cannot listen on %s: address in use (is another tallyd "
                     "running there?)",
                     cfg->listen);
    if (s->tls_cert_pem && (e == 0 || e == EINVAL))
      return ts_errf(err, TS_EINVAL,
                     "cannot start TLS on %s: --tls-cert/--tls-key are not a "
                     "usable PEM certificate and key",
                     cfg->listen);
    return ts_errf(err, TS_EINVAL, "cannot listen on %s: %s", cfg->listen,
                   e ? strerror(e) : "libmicrohttpd refused to start");
  }
  const union MHD_DaemonInfo *di = MHD_get_daemon_info(s->mhd, MHD_DAEMON_INFO_BIND_PORT);
  s->port = di ? di->port : port;
  di = MHD_get_daemon_info(s->mhd, MHD_DAEMON_INFO_EPOLL_FD);
  if (!di) {
    MHD_stop_daemon(s->mhd);
    s->mhd = NULL;
    return ts_errf(err, TS_EINTERNAL, "libmicrohttpd has no epoll descriptor");
  }
  uv_poll_init(s->loop, &s->mhd_poll, di->epoll_fd);
  s->mhd_poll.data = s;
  uv_poll_start(&s->mhd_poll, UV_READABLE, on_mhd_poll);
  uv_timer_init(s->loop, &s->mhd_timer);
  s->mhd_timer.data = s;
  return 0;
}
