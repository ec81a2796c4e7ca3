/* metrics.h - the daemon's Prometheus metrics (GET /metrics).
 *
 * Process-wide: one set of counters and histograms for the process, so that
 * modules that hold no server pointer (the session endpoints) can feed it. Every
 * update takes one mutex for a few hundred nanoseconds (a hash lookup and a
 * few additions); gauges that other modules set are atomics. Rendering takes
 * the same mutex while it copies the text out, on the loop thread.
 *
 * Label values are bounded by the caller: model names come only from
 * requests that named a served model (never from 401/403/404 answers), and
 * past METRICS_MAX_SERIES label sets new ones are folded into one series
 * with empty labels, so that no client can grow the table without bound.
 *
 * Names and meanings are listed in docs/operations.md. */
#ifndef TALLYD_METRICS_H
#define TALLYD_METRICS_H

#include <stdint.h>

#include "../base/sbuf.h"
#include "../repo/repo.h"

#define METRICS_MAX_SERIES 4096

/* A finished HTTP request: status code and seconds from its first byte to
 * its answer. model may be "" (none), version 0 (none). */
void metrics_request(const char *model, int64_t version, const char *endpoint, int code,
                     double seconds);
/* A job that ran on a worker: seconds waiting in the queue and computing. */
void metrics_job(const char *model, const char *endpoint, double queue_wait, double compute);
/* A fit or calibration finished (ok: it made a new version). */
void metrics_fit(const char *model, int ok);
/* The dynamic batcher ran one joint call of `requests` requests, `rows` rows. */
void metrics_batch(const char *model, int requests, int64_t rows);
/* HTTP requests being read, computed or answered right now. */
void metrics_inflight_add(int delta);
/* Open KV-cache sessions and the bytes counted for them: the session store
 * (session_store.c) calls this, through the change hook sessions.c gives it,
 * whenever either changes. */
void metrics_set_sessions(int64_t n, int64_t bytes);
/* Bytes counted for sessions now (the generation budget shares the cap). */
uint64_t metrics_session_bytes(void);
/* Generation (completions.c): KV-cache bytes reserved by running
 * generations; tokens (prompt, completion); sequences started (+1) and
 * finished (-1); time to first token and between tokens. */
void metrics_set_generate_kv(int64_t bytes);
void metrics_generate_tokens(const char *model, int64_t prompt, int64_t completion);
void metrics_generate_active(const char *model, int delta);
void metrics_generate_first_token(const char *model, double seconds);
void metrics_generate_inter_token(const char *model, double seconds);
/* The whole exposition (text format 0.0.4) into b. repo may be NULL. */
void metrics_render(sbuf *b, repo_t *repo, int queued, int jobs_inflight);
/* Forgets every series (tests). */
void metrics_reset(void);

#endif
