/* pool.c - worker threads, a bounded job queue and a helping parallel-for.
 *
 * Invariants (kept under p->mu):
 * - `jobs` holds at most `depth` waiting jobs; `running` counts jobs taken.
 * - A parallel-for task is on the `tasks` list while it still has chunks to
 *   hand out; its `pending` counter reaches 0 only when every chunk is done,
 *   and only then does its owner return (the task lives on its stack).
 * - A job waits in its queue's list for its lane and level; `queued` counts
 *   the waiting jobs of the pool and of each queue, `running` the running.
 * - lane_running[l] counts the threads working in lane l: jobs, and helpers
 *   on chunks of a task started in that lane (a task's owner is counted
 *   once, by its job).
 * Workers prefer task chunks over new jobs, so a large request spreads over
 * idle workers before more requests start; a chunk of a task in a capped
 * lane is taken only while the lane is under its cap. */
#include "pool.h"

#include <stdlib.h>
#include <string.h>
#include <uv.h>

#include "err.h"
#include "mem.h"

typedef struct job {
  pool_job_fn fn;
  void *arg;
  uint64_t seq; /* submission order */
  struct job *next;
} job;

struct pool_q {
  char *name;
  int max_running, max_queued; /* 0: no limit */
  int running, queued;
  job *head[POOL_LANES][POOL_LEVELS], *tail[POOL_LANES][POOL_LEVELS];
  struct pool_q *next_all;
};

typedef struct task {
  pool_range_fn fn;
  void *arg;
  int64_t n, chunk, next; /* next unclaimed index */
  int64_t pending;        /* chunks not yet finished */
  int lane;               /* the lane of the thread that started it */
  uv_cond_t done;
  struct task *prev, *nextt;
} task;

struct pool {
  uv_mutex_t mu;
  uv_cond_t wake;
  uv_thread_t *threads;
  int nthreads, depth, queued, running, stopping;
  uint64_t seq;
  pool_q *queues; /* every queue, the unnamed one first */
  int lane_running[POOL_LANES], lane_cap[POOL_LANES];
  task *tasks; /* doubly linked list of tasks with unclaimed chunks */
};

static pool_t *g_default;
static _Thread_local int tl_lane = POOL_LANE_INFER;

int pool_current_lane(void) {
  return tl_lane;
}

static int lane_open(const pool_t *p, int lane) {
  return p->lane_cap[lane] <= 0 || p->lane_running[lane] < p->lane_cap[lane];
}

void pool_set_default(pool_t *p) {
  g_default = p;
}
pool_t *pool_default(void) {
  return g_default;
}

static void task_unlink(pool_t *p, task *t) {
  if (t->prev)
    t->prev->nextt = t->nextt;
  else if (p->tasks == t)
    p->tasks = t->nextt;
  if (t->nextt) t->nextt->prev = t->prev;
  t->prev = t->nextt = NULL;
}

/* Claims one chunk of t; called with p->mu held. Returns 0 if none left. */
static int task_claim(pool_t *p, task *t, int64_t *b, int64_t *e) {
  if (t->next >= t->n) return 0;
  *b = t->next;
  *e = t->next + t->chunk < t->n ? t->next + t->chunk : t->n;
  t->next = *e;
  if (t->next >= t->n) task_unlink(p, t);
  return 1;
}

static void task_finish_chunk(task *t) {
  if (--t->pending == 0) uv_cond_broadcast(&t->done);
}

/* The first task with chunks left whose lane is open; called with p->mu held. */
static task *pick_task(pool_t *p) {
  for (task *t = p->tasks; t; t = t->nextt)
    if (lane_open(p, t->lane)) return t;
  return NULL;
}

/* The job to run next: among queues under their running limit and lanes
 * under their cap, the best level, then the earliest submitted. Unlinks it;
 * called with p->mu held. */
static job *pick_job(pool_t *p, pool_q **qout, int *lane_out) {
  job *best = NULL;
  pool_q *bq = NULL;
  int bl = 0, blev = POOL_LEVELS;
  for (pool_q *q = p->queues; q; q = q->next_all) {
    if (!q->queued) continue;
    for (int lane = 0; lane < POOL_LANES; lane++) {
      for (int lev = 0; lev < POOL_LEVELS && lev <= blev; lev++) {
        job *j = q->head[lane][lev];
        if (!j) continue;
        /* level 0 is the daemon's follow-up of work already admitted */
        if (lev > 0 &&
            ((q->max_running > 0 && q->running >= q->max_running) || !lane_open(p, lane)))
          break;
        if (lev < blev || j->seq < best->seq) {
          best = j;
          bq = q;
          bl = lane;
          blev = lev;
        }
        break;
      }
    }
  }
  if (!best) return NULL;
  bq->head[bl][blev] = best->next;
  if (!best->next) bq->tail[bl][blev] = NULL;
  bq->queued--;
  p->queued--;
  *qout = bq;
  *lane_out = bl;
  return best;
}

static void worker(void *arg) {
  pool_t *p = arg;
  uv_mutex_lock(&p->mu);
  for (;;) {
    task *t = pick_task(p);
    if (t) {
      int64_t b, e;
      if (task_claim(p, t, &b, &e)) {
        p->lane_running[t->lane]++;
        tl_lane = t->lane;
        uv_mutex_unlock(&p->mu);
        t->fn(t->arg, b, e);
        uv_mutex_lock(&p->mu);
        p->lane_running[t->lane]--;
        task_finish_chunk(t);
      }
      continue;
    }
    pool_q *q;
    int lane;
    job *j = pick_job(p, &q, &lane);
    if (j) {
      q->running++;
      p->running++;
      p->lane_running[lane]++;
      tl_lane = lane;
      uv_mutex_unlock(&p->mu);
      j->fn(j->arg);
      tl_free(j);
      tl_lane = POOL_LANE_INFER;
      uv_mutex_lock(&p->mu);
      q->running--;
      p->running--;
      p->lane_running[lane]--;
      /* a limit this job held may have kept a waiting job from others */
      if (p->queued > 1) uv_cond_signal(&p->wake);
      continue;
    }
    if (p->stopping && p->queued == 0) break;
    uv_cond_wait(&p->wake, &p->mu);
  }
  uv_mutex_unlock(&p->mu);
}

int pool_create(pool_t **out, int nthreads, int queue_depth) {
  pool_t *p = tl_calloc(1, sizeof *p);
  if (!p) return -TS_ENOMEM;
  if (nthreads <= 0) {
    uv_cpu_info_t *ci;
    int n;
    nthreads = uv_cpu_info(&ci, &n) == 0 ? n : 2;
    if (nthreads > 0) uv_free_cpu_info(ci, n);
    if (nthreads <= 0) nthreads = 2;
  }
  p->nthreads = nthreads;
  p->depth = queue_depth > 0 ? queue_depth : 1024;
  p->threads = tl_calloc((size_t)nthreads, sizeof(uv_thread_t));
  if (!p->threads) {
    tl_free(p);
    return -TS_ENOMEM;
  }
  p->queues = tl_calloc(1, sizeof *p->queues);
  if (!p->queues) {
    tl_free(p->threads);
    tl_free(p);
    return -TS_ENOMEM;
  }
  uv_mutex_init(&p->mu);
  uv_cond_init(&p->wake);
  for (int i = 0; i < nthreads; i++) {
    uv_thread_options_t opt = {UV_THREAD_HAS_STACK_SIZE, 8u << 20};
    if (uv_thread_create_ex(&p->threads[i], &opt, worker, p) != 0) {
      p->nthreads = i;
      pool_destroy(p);
      return -TS_EINTERNAL;
    }
  }
  *out = p;
  return 0;
}

void pool_destroy(pool_t *p) {
  if (!p) return;
  uv_mutex_lock(&p->mu);
  p->stopping = 1;
  uv_cond_broadcast(&p->wake);
  uv_mutex_unlock(&p->mu);
  for (int i = 0; i < p->nthreads; i++) uv_thread_join(&p->threads[i]);
  if (g_default == p) g_default = NULL;
  uv_cond_destroy(&p->wake);
  uv_mutex_destroy(&p->mu);
  while (p->queues) {
    pool_q *q = p->queues;
    p->queues = q->next_all;
    tl_free(q->name);
    tl_free(q);
  }
  tl_free(p->threads);
  tl_free(p);
}

int pool_submit_q(pool_t *p, pool_q *q, int lane, int level, pool_job_fn fn, void *arg) {
  return pool_submit_at(p, q, lane, level, NULL, fn, arg);
}

int pool_submit_at(pool_t *p, pool_q *q, int lane, int level, uint64_t *seq, pool_job_fn fn,
                   void *arg) {
  if (lane < 0 || lane >= POOL_LANES) lane = POOL_LANE_INFER;
  if (!q) q = p->queues; /* the unnamed one */
  if (level < 0) level = 0;
  if (level >= POOL_LEVELS) level = POOL_LEVELS - 1;
  job *j = tl_malloc(sizeof *j);
  if (!j) return -TS_ENOMEM;
  j->fn = fn;
  j->arg = arg;
  j->next = NULL;
  uv_mutex_lock(&p->mu);
  int rc = 0;
  int admitted = level == 0 || (seq && *seq); /* follow-up work passes the limits */
  if (p->stopping)
    rc = -TS_EUNAVAIL;
  else if (!admitted && p->queued >= p->depth)
    rc = -TS_EBUSY;
  else if (!admitted && q->max_queued > 0 && q->queued >= q->max_queued)
    rc = POOL_QFULL;
  if (rc) {
    uv_mutex_unlock(&p->mu);
    tl_free(j);
    return rc;
  }
  if (seq && *seq)
    j->seq = *seq;
  else
    j->seq = ++p->seq;
  if (seq) *seq = j->seq;
  /* the list stays in submission order: a job given its earlier place goes
   * before every job submitted after it */
  job **at = &q->head[lane][level];
  if (!q->tail[lane][level] || q->tail[lane][level]->seq < j->seq)
    at = q->tail[lane][level] ? &q->tail[lane][level]->next : at;
  else
    while (*at && (*at)->seq < j->seq) at = &(*at)->next;
  j->next = *at;
  *at = j;
  if (!j->next) q->tail[lane][level] = j;
  q->queued++;
  p->queued++;
  uv_cond_signal(&p->wake);
  uv_mutex_unlock(&p->mu);
  return 0;
}

int pool_submit(pool_t *p, pool_job_fn fn, void *arg) {
  return pool_submit_q(p, p->queues, POOL_LANE_INFER, 1, fn, arg);
}

pool_q *pool_queue(pool_t *p, const char *name) {
  uv_mutex_lock(&p->mu);
  pool_q *q = p->queues->next_all;
  while (q && strcmp(q->name, name) != 0) q = q->next_all;
  if (!q && (q = tl_calloc(1, sizeof *q))) {
    size_t n = strlen(name) + 1;
    if (!(q->name = tl_malloc(n))) {
      tl_free(q);
      q = NULL;
    } else {
      memcpy(q->name, name, n);
      /* after the unnamed queue, so that it stays first */
      q->next_all = p->queues->next_all;
      p->queues->next_all = q;
    }
  }
  uv_mutex_unlock(&p->mu);
  return q;
}

void pool_queue_limits(pool_t *p, pool_q *q, int max_running, int max_queued) {
  uv_mutex_lock(&p->mu);
  int wider = (max_running <= 0 && q->max_running > 0) || max_running > q->max_running;
  q->max_running = max_running > 0 ? max_running : 0;
  q->max_queued = max_queued > 0 ? max_queued : 0;
  if (wider && q->queued) uv_cond_broadcast(&p->wake);
  uv_mutex_unlock(&p->mu);
}

void pool_lane_cap(pool_t *p, int lane, int cap) {
  if (lane < 0 || lane >= POOL_LANES) return;
  uv_mutex_lock(&p->mu);
  p->lane_cap[lane] = cap > 0 ? cap : 0;
  uv_cond_broadcast(&p->wake);
  uv_mutex_unlock(&p->mu);
}

int pool_lane_cap_get(pool_t *p, int lane) {
  if (lane < 0 || lane >= POOL_LANES) return 0;
  uv_mutex_lock(&p->mu);
  int c = p->lane_cap[lane];
  uv_mutex_unlock(&p->mu);
  return c;
}

void pool_queue_foreach(pool_t *p, void (*fn)(void *arg, const char *name, int queued, int running),
                        void *arg) {
  uv_mutex_lock(&p->mu);
  for (pool_q *q = p->queues->next_all; q; q = q->next_all) fn(arg, q->name, q->queued, q->running);
  uv_mutex_unlock(&p->mu);
}

int pool_queue_queued(pool_t *p, pool_q *q) {
  uv_mutex_lock(&p->mu);
  int n = q->queued;
  uv_mutex_unlock(&p->mu);
  return n;
}

void pool_parallel_for(pool_t *p, int64_t n, int64_t grain, pool_range_fn fn, void *arg) {
  if (n <= 0) return;
  if (grain < 1) grain = 1;
  if (!p || p->nthreads <= 1 || n <= grain) {
    fn(arg, 0, n);
    return;
  }
  /* Around 4 chunks per thread balances uneven chunks (causal attention). */
  int64_t want = (int64_t)(p->nthreads + 1) * 4;
  int64_t chunk = (n + want - 1) / want;
  if (chunk < grain) chunk = grain;
  task t;
  memset(&t, 0, sizeof t);
  t.fn = fn;
  t.arg = arg;
  t.n = n;
  t.chunk = chunk;
  t.pending = (n + chunk - 1) / chunk;
  t.lane = tl_lane;
  uv_cond_init(&t.done);
  uv_mutex_lock(&p->mu);
  t.nextt = p->tasks;
  if (p->tasks) p->tasks->prev = &t;
  p->tasks = &t;
  uv_cond_broadcast(&p->wake);
  int64_t b, e;
  while (task_claim(p, &t, &b, &e)) {
    uv_mutex_unlock(&p->mu);
    fn(arg, b, e);
    uv_mutex_lock(&p->mu);
    task_finish_chunk(&t);
  }
  while (t.pending > 0) uv_cond_wait(&t.done, &p->mu);
  uv_mutex_unlock(&p->mu);
  uv_cond_destroy(&t.done);
}

int pool_threads(const pool_t *p) {
  return p ? p->nthreads : 1;
}

int pool_queued(pool_t *p) {
  uv_mutex_lock(&p->mu);
  int n = p->queued;
  uv_mutex_unlock(&p->mu);
  return n;
}

int pool_running(pool_t *p) {
  uv_mutex_lock(&p->mu);
  int n = p->running;
  uv_mutex_unlock(&p->mu);
  return n;
}
