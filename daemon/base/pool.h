/* pool.h - the worker pool: request jobs and parallel-for.
 *
 * N worker threads (libuv threads) take jobs from a bounded FIFO queue.
 * pool_submit refuses with -TS_EBUSY when the queue is full (the HTTP layer
 * answers 429). pool_parallel_for splits a range into chunks that idle
 * workers pick up before new jobs; the calling thread works on the chunks
 * too, so a job that calls parallel_for while every other worker is busy
 * still finishes (it just runs alone). Nested parallel_for is allowed.
 *
 * Ownership: the pool never frees job arguments; a job function owns what
 * it is given. */
#ifndef TALLYD_POOL_H
#define TALLYD_POOL_H

#include <stdint.h>

typedef struct pool pool_t;

typedef void (*pool_job_fn)(void *arg);
/* Runs [begin, end) of a range; called concurrently from several threads. */
typedef void (*pool_range_fn)(void *arg, int64_t begin, int64_t end);

/* nthreads <= 0: the number of cores. queue_depth <= 0: 1024. */
int pool_create(pool_t **out, int nthreads, int queue_depth);
/* Stops accepting, waits for queued and running jobs, frees. */
void pool_destroy(pool_t *p);

/* 0, or -TS_EBUSY when queue_depth jobs are already waiting. */
int pool_submit(pool_t *p, pool_job_fn fn, void *arg);

/* Runs fn over [0, n) in chunks of at least `grain` items. p may be NULL
 * (runs serially in the caller). Returns when every chunk is done. */
void pool_parallel_for(pool_t *p, int64_t n, int64_t grain, pool_range_fn fn, void *arg);

int pool_threads(const pool_t *p);
int pool_queued(pool_t *p);  /* jobs waiting */
int pool_running(pool_t *p); /* jobs running */

/* The process-wide pool that kernels use when a caller passes none
 * (set by the daemon at start; NULL means serial). */
void pool_set_default(pool_t *p);
pool_t *pool_default(void);

#endif
