/* server.h - the HTTP server: libmicrohttpd driven by one libuv loop.
 *
 * Threads: the loop thread owns every MHD connection and every hreq; it
 * accumulates bodies, routes, answers cheap endpoints (health, metadata,
 * index, metrics) and hands the rest to the worker pool as a `job`. A job
 * owns its body and produces a complete response (status, headers, bytes);
 * workers never touch HTTP state. The job comes back through a uv_async,
 * the connection is resumed and answered. A job whose deadline passes is
 * answered 504 by the loop and abandoned; the worker's result is dropped.
 */
#ifndef TALLYD_SERVER_H
#define TALLYD_SERVER_H

#include <stdatomic.h>
#include <stdint.h>
#include <uv.h>

#include "../base/err.h"
#include "../base/pool.h"
#include "../base/sbuf.h"
#include "../repo/repo.h"
#include "auth.h"
#include "config.h"

enum route_id {
  R_NONE = 0,
  R_LIVE,
  R_READY,
  R_SERVER,
  R_MODEL_META,
  R_MODEL_READY,
  R_INFER,
  R_FIT,
  R_EVALUATE,
  R_CALIBRATE,
  R_SESSIONS,
  R_SESSION,
  R_SESSION_INFER,
  R_REPO_INDEX,
  R_REPO_LOAD,
  R_REPO_UNLOAD,
  R_METRICS,
  R_COUNT
};

typedef struct route {
  int id;
  char model[256];
  int64_t version; /* 0: newest */
  char session[96];
} route;

/* Parses method and path. 0, -TS_ENOTFOUND (unknown route, with message),
 * -TS_EMETHOD (known route, wrong method; *allow lists the methods) or
 * -TS_EINVAL (bad version number, bad name). */
int route_parse(const char *method, const char *path, route *r, const char **allow, ts_err *err);
const char *route_name(int id);
/* The one table from ts_status to HTTP status. */
int http_status_of(int ts_status);

typedef struct resp {
  int status;
  char *body;      /* tl_malloc'ed; owned */
  size_t len;
  size_t json_len; /* binary extension: length of the JSON part, else 0 */
  const char *content_type;
  int retry_after;
  const char *allow;
} resp;

void resp_json(resp *r, int status, const json_t *j);
void resp_error(resp *r, const ts_err *err);
void resp_free(resp *r);

typedef struct server server;

typedef struct job {
  server *srv;
  route rt;
  char method[8];
  repo_ver *ver;        /* acquired on the loop thread, released by the worker */
  char *body;
  size_t len, json_len;
  double t_submit, t_start, t_end;
  _Atomic double deadline; /* md_now() seconds; 0: none; set by the worker once known */
  volatile int cancelled;
  /* 0 running; 1 the worker is publishing a new version (no 504 may be sent
   * any more: the client gets the outcome); 2 the loop gave up on it (the
   * worker must not publish). Moved from 0 by compare-and-swap only. */
  atomic_int claim;
  int fit_claimed;      /* repo_fit_begin succeeded */
  resp out;
  void *conn_req;       /* the hreq waiting for it (loop thread only) */
  struct job *next;
} job;

struct server {
  srv_config *cfg;
  uv_loop_t *loop;
  void *mhd;
  pool_t *pool;
  repo_t *repo;
  uv_poll_t mhd_poll;
  uv_timer_t mhd_timer, sweep_timer, drain_timer;
  uv_async_t done_async;
  uv_signal_t sig_term, sig_int, sig_hup;
  uv_mutex_t done_mu;
  job *done_head;
  atomic_int draining;
  int stopping;
  double drain_started;
  int inflight;          /* jobs submitted and not yet answered (loop thread) */
  void *waiting;         /* list of hreqs with a job (loop thread) */
  int exit_code;
  int port;              /* bound port (useful with --listen :0) */
  unsigned conn_peak;    /* connections at the last check (memory trim) */
  int trim_ticks;
  /* production operation (docs/operations.md) */
  auth_keys *keys;       /* NULL: no credentials asked (loop thread; swapped at SIGHUP) */
  char *tls_cert_pem, *tls_key_pem; /* kept for MHD's lifetime */
  uv_timer_t poll_timer, watchdog_timer;
  uv_mutex_t sync_mu;    /* guards sync_busy/sync_again: one rescan at a time */
  int sync_busy, sync_again;
  atomic_int reloading;  /* a SIGHUP's rescan is pending: READY=1 follows it */
};

int server_init(server *s, srv_config *cfg, ts_err *err);
int server_run(server *s);     /* until SIGTERM/SIGINT drain completes */
void server_free(server *s);

/* Schedules a repository rescan on a worker; while one runs, another is
 * run right after it instead of in parallel (SIGHUP, --repository-poll-secs). */
void server_schedule_sync(server *s, const char *why);

/* decode.c: the server-level input limits (--max-batch, largest leading
 * dimension of any input; --max-sequence-length, the last dimension of
 * input_ids and the second-to-last of query/key/value). 0 or -TS_EINVAL. */
int server_check_limits(const srv_config *cfg, const ts_list *inputs, ts_err *err);
/* handlers.c: answers on the loop thread (cheap endpoints) */
int handle_inline(server *s, const route *rt, const char *method, resp *out);
/* decode.c: decodes a job's body under every request limit (--max-json-memory,
 * --max-inputs, --max-outputs, --max-request-memory, --max-request-elements,
 * the deadline), takes the request's "timeout_ms" or "timeout", refuses
 * parameters the model's kind does not take for the route's operation, and
 * for infer inputs outside the model's signature and batches over its
 * config.json max_batch; checks --max-batch/--max-sequence-length when
 * check_limits, and fills call's inputs and context for `ver`. The body is
 * freed; req must be freed by the caller even on failure. */
typedef struct oip_request oip_request;
int job_decode(job *j, const repo_ver *ver, int check_limits, oip_request *req, md_call *call,
               ts_err *err);
/* decode.c: encodes call's outputs as the job's answer (--max-response-bytes;
 * application/octet-stream when it has binary parts). */
int job_encode(job *j, const oip_request *req, const md_call *call, const json_t *extra,
               ts_err *err);
/* decode.c: 0, or a 400 naming the first name in `params` that is neither
 * the protocol's (oip_request_params) nor one the kind takes for `op`
 * (md_kind.params), with the accepted names. */
int server_check_params(const md_kind *k, int op, const char *model, const json_t *params,
                        ts_err *err);
/* handlers.c: the worker side of a job */
void handle_job(job *j);

#endif
