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
#include "resp.h"
#include "routes.h"

typedef struct server server;

typedef struct job {
  server *srv;
  route rt;
  char method[8];
  repo_ver *ver; /* acquired on the loop thread, released by the worker */
  char *body;
  size_t len, json_len;
  double t_submit, t_start, t_end;
  int req_coding;  /* zc_coding of the body: inflated by the worker before the handler */
  int resp_coding; /* zc_coding the client accepts: a 2xx answer is compressed by the worker */
  double t_decoded, t_computed; /* infer: decoding and computing done (statistics) */
  int64_t batch;                /* infer: rows (leading dimension of the first input) */
  _Atomic double deadline;      /* md_now() seconds; 0: none; set by the worker once known */
  volatile int cancelled;
  /* 0 running; 1 the worker is publishing a new version (no 504 may be sent
   * any more: the client gets the outcome); 2 the loop gave up on it (the
   * worker must not publish). Moved from 0 by compare-and-swap only. */
  atomic_int claim;
  int fit_claimed; /* repo_fit_begin succeeded */
  uint64_t place;  /* a compressed body's place in the pool's order, until sched_requeue */
  resp out;
  char request_id[80]; /* X-Request-Id (the learning loop's key when the body has no "id") */
  void *conn_req;      /* the hreq waiting for it (loop thread only) */
  /* Owners of the answer still to come: the worker that ran the handler,
   * plus one for a handler that finishes later on another thread
   * (job_defer, job_finish). The last to let go sends it back. */
  atomic_int owners;
  struct trace_req *trace; /* the request's spans (trace.h), held; NULL: not traced */
  struct job *next;
} job;

struct server {
  srv_config *cfg;
  uv_loop_t *loop;
  void *mhd;
  pool_t *pool;
  struct batcher *batcher; /* the dynamic batcher (batch.h) */
  repo_t *repo;
  struct learn *learn; /* the learning loop (learn/learn.h) */
  uv_poll_t mhd_poll;
  uv_timer_t mhd_timer, sweep_timer, drain_timer;
  uv_async_t done_async;
  uv_signal_t sig_term, sig_int, sig_hup;
  uv_mutex_t done_mu;
  job *done_head;
  atomic_int draining;
  int stopping;
  double drain_started;
  int inflight;  /* jobs submitted and not yet answered (loop thread) */
  void *waiting; /* list of hreqs with a job (loop thread) */
  int exit_code;
  int port;                         /* bound port (useful with --listen :0) */
  unsigned conn_peak;               /* connections at the last check (memory trim) */
  int64_t conn_limit;               /* libmicrohttpd's connection limit; 0: its own */
  int done_mu_ready, sync_mu_ready; /* made (server_init's unwinding) */
  int started;                      /* server_init succeeded: server_free has work */
  int trim_ticks;
  /* production operation (docs/operations.md) */
  auth_keys *keys; /* NULL: no credentials asked (loop thread; swapped at SIGHUP) */
  char *tls_cert_pem, *tls_key_pem; /* kept for MHD's lifetime */
  uv_timer_t poll_timer, watchdog_timer;
  /* repository change notifications (watch.h); watch_fd -1: none */
  uv_poll_t watch_poll;
  uv_timer_t watch_timer;
  int watch_fd, watch_warned;
  uv_mutex_t sync_mu; /* guards sync_busy/sync_again: one rescan at a time */
  int sync_busy, sync_again;
  atomic_int reloading; /* a SIGHUP's rescan is pending: READY=1 follows it */
  /* streamed answers (stream.h) */
  struct gstream *wake_head;    /* under done_mu: streams with new bytes */
  struct gstream *live_streams; /* loop thread: streams a response holds */
};

/* A handler that answers later (from another thread) calls job_defer
 * before handing the job on, and that thread calls job_finish once j->out
 * is complete; the job is not touched after. */
void job_defer(job *j);
void job_finish(job *j);

int server_init(server *s, srv_config *cfg, ts_err *err);
int server_run(server *s); /* until SIGTERM/SIGINT drain completes */
void server_free(server *s);

/* Schedules a repository rescan on a worker; while one runs, another is
 * run right after it instead of in parallel (SIGHUP, --repository-poll-secs). */
void server_schedule_sync(server *s, const char *why);

/* decode.c: the server-level input limits (--max-batch, largest leading
 * dimension of any input; --max-sequence-length, the last dimension of
 * input_ids and the second-to-last of query/key/value). 0 or -TS_EINVAL. */
int server_check_limits(const srv_config *cfg, const ts_list *inputs, ts_err *err);
/* routes.c: runs a route's handler on the loop thread when its row says
 * RF_LOOP (1: answered into out), else 0: it goes to a worker. */
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
/* routes.c: the worker side of a job: its route's handler */
void handle_job(job *j);

#endif
