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

/* ---- scheduling (docs/scheduling.md) -------------------------------------
 *
 * Jobs wait in named queues (the server makes one per model), each with a
 * limit on how many of its jobs run at once and how many may wait, at a
 * priority level (0 is taken first, then 1, ...; first in, first out within
 * a level, across queues too) and in a lane. A lane may have a cap on the
 * threads working in it, counting the helpers of its parallel-for chunks:
 * fits run in POOL_LANE_FIT under a cap so that inference always has
 * workers. A worker takes, among queues under their running limit and lanes
 * under their cap, the job of the best level submitted first. pool_submit
 * is pool_submit_q on the pool's own unnamed queue at level 0. */
#define POOL_LEVELS 10 /* levels 0..9 */
enum { POOL_LANE_INFER = 0, POOL_LANE_FIT = 1, POOL_LANES = 2 };
#define POOL_QFULL 1

typedef struct pool_q pool_q;

/* The queue called `name` (made on first use; it lives as long as the
 * pool). NULL only when out of memory. */
pool_q *pool_queue(pool_t *p, const char *name);
/* 0 means no limit (max_queued: only the pool's depth). Takes effect for
 * the next job taken or submitted. */
void pool_queue_limits(pool_t *p, pool_q *q, int max_running, int max_queued);
/* q NULL: the pool's unnamed queue (work of no model).
 * 0; -TS_EBUSY when the pool's depth is reached; POOL_QFULL when q
 * already holds its max_queued waiting jobs; -TS_EUNAVAIL when stopping. Jobs at level 0 are the
 * daemon's own follow-up work and pass both limits. */
int pool_submit_q(pool_t *p, pool_q *q, int lane, int level, pool_job_fn fn, void *arg);
/* The same, keeping a job's place: with *seq 0 it is given a new place in
 * the order (written to *seq); with the *seq of an earlier submission it
 * takes that place again, at the level given, past both limits (it was
 * admitted already: a job that goes back to its queue once it knows its
 * priority). */
int pool_submit_at(pool_t *p, pool_q *q, int lane, int level, uint64_t *seq, pool_job_fn fn,
                   void *arg);
/* At most `cap` threads work in the lane at once (0: no cap). */
void pool_lane_cap(pool_t *p, int lane, int cap);
int pool_lane_cap_get(pool_t *p, int lane);
/* The lane the calling thread works in (POOL_LANE_INFER outside jobs). */
int pool_current_lane(void);
/* Calls fn for every named queue with its waiting and running jobs (under
 * the pool's lock: fn must not call into the pool). */
void pool_queue_foreach(pool_t *p, void (*fn)(void *arg, const char *name, int queued, int running),
                        void *arg);
int pool_queue_queued(pool_t *p, pool_q *q);

int pool_threads(const pool_t *p);
int pool_queued(pool_t *p);  /* jobs waiting */
int pool_running(pool_t *p); /* jobs running */

/* The process-wide pool that kernels use when a caller passes none
 * (set by the daemon at start; NULL means serial). */
void pool_set_default(pool_t *p);
pool_t *pool_default(void);

#endif
