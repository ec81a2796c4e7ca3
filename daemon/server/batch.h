/* batch.h - the dynamic batcher (config.json "dynamic_batching", with
 * Triton's meaning; docs/scheduling.md).
 *
 * A decoded infer of a model whose config asks for it is offered here
 * instead of being computed at once. Requests for the same version, with
 * the same parameters (priority and timeouts aside), the same inputs (names,
 * datatypes, shapes past the batch dimension) and the same requested
 * outputs join one group; the group becomes one call of the kind, over its
 * requests' rows concatenated in arrival order, and each request gets its
 * own rows of every output back, checked and encoded as if it had run alone.
 *
 * When a group runs: once it holds max_batch_size rows, or one of the
 * preferred sizes, it is queued at once (level 0 of its model's queue: work
 * already admitted goes first); otherwise max_queue_delay_us after its first
 * request arrived (a timer thread). Until a worker starts it, later requests
 * still join it (up to max_batch_size), so a busy daemon batches more. If the
 * joint call fails, each request is run alone, so that every client gets its
 * own answer or its own error. A request that cannot be batched (BYTES
 * inputs, no batch dimension, more rows than max_batch_size) runs alone.
 *
 * Threads: batch_offer runs on workers; the timer is one thread per server;
 * a group runs on a worker. */
#ifndef TALLYD_BATCH_H
#define TALLYD_BATCH_H

#include "oip.h"
#include "server.h"

typedef struct batcher batcher;

int batch_start(server *s, ts_err *err);
/* Runs what is still waiting, then stops the timer (before the pool goes). */
void batch_stop(server *s);
/* Frees it, once the pool has drained. */
void batch_free(server *s);

/* Takes a decoded infer of j (j->ver's config has dynamic_batching): 1 when
 * the batcher took it (it owns *req and *call from here on, and finishes
 * j), 0 when it must run alone (req and call untouched). */
int batch_offer(job *j, oip_request *req, md_call *call);

#endif
