/* sched.h - per-model scheduling on the server side (docs/scheduling.md).
 *
 * The pool (base/pool.h) has the mechanism: named queues with limits,
 * priority levels and lanes. This file has the policy: every request of a
 * model goes into the model's queue, with config.json's "scheduling"
 * limits, at the priority the request names (read from its body on the loop
 * thread by oip_scan_priority, before anything is decoded), in the fit lane
 * when it is a fit, evaluation or calibration; and it renders the per-model
 * gauges that autoscalers read. The dynamic batcher is batch.h. */
#ifndef TALLYD_SCHED_H
#define TALLYD_SCHED_H

#include <stdatomic.h>

#include "../base/sbuf.h"
#include "server.h"

/* Sets the fit lane's cap from --fit-workers (server start). */
void sched_init(server *s);

/* Queues j (its route, model and version are set; j->ver acquired when the
 * route takes one): sets its deadline from the model's default_timeout_ms
 * or --request-timeout-ms, and submits it to its model's queue. 0, or an
 * error to answer at once: 429 when the pool or the model's queue is full
 * (the message says which), 503 while stopping. */
int sched_submit(server *s, job *j, void (*run)(void *), ts_err *err);

/* A compressed request, or one whose JSON text is too long to read on the
 * loop thread, waits at the best level until a worker reads it (inflating
 * it first); then this puts it back in its
 * model's queue, in its first place, at its own level (once; 1: the caller
 * returns without finishing j), or answers 0 when that level is the best
 * (run it now). Its own timeout applies from here either way. */
int sched_requeue(server *s, job *j, void (*run)(void *));

/* The worker side of a request's "priority" parameter: 400 when it is over
 * the model's scheduling.priority_levels. */
int sched_check_priority(const repo_ver *ver, const json_t *params, ts_err *err);

/* A per-model counter of KV-cache bytes held by generations (its address
 * is stable for the life of the process). NULL when out of memory. */
atomic_llong *sched_kv_slot(const char *model);

/* The per-model gauges (queued, running, KV-cache use) into b. */
void sched_render(sbuf *b, server *s);

#endif
