/* pool.c - worker threads, a bounded job queue and a helping parallel-for.
 *
 * Invariants (kept under p->mu):
 * - `jobs` holds at most `depth` waiting jobs; `running` counts jobs taken.
 * - A parallel-for task is on the `tasks` list while it still has chunks to
 *   hand out; its `pending` counter reaches 0 only when every chunk is done,
 *   and only then does its owner return (the task lives on its stack).
 * Workers prefer task chunks over new jobs, so a large request spreads over
 * idle workers before more requests start. */
#include "pool.h"

#include <stdlib.h>
#include <string.h>
#include <uv.h>

#include "err.h"
#include "mem.h"

typedef struct job {
  pool_job_fn fn;
  void *arg;
  struct job *next;
} job;

typedef struct task {
  pool_range_fn fn;
  void *arg;
  int64_t n, chunk, next; /* next unclaimed index */
  int64_t pending;        /* chunks not yet finished */
  uv_cond_t done;
  struct task *prev, *nextt;
} task;

struct pool {
  uv_mutex_t mu;
  uv_cond_t wake;
  uv_thread_t *threads;
  int nthreads, depth, queued, running, stopping;
  job *head, *tail;
  task *tasks; /* doubly linked list of tasks with unclaimed chunks */
};

static pool_t *g_default;

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

static void worker(void *arg) {
  pool_t *p = arg;
  uv_mutex_lock(&p->mu);
  for (;;) {
    if (p->tasks) {
      task *t = p->tasks;
      int64_t b, e;
      if (task_claim(p, t, &b, &e)) {
        uv_mutex_unlock(&p->mu);
        t->fn(t->arg, b, e);
        uv_mutex_lock(&p->mu);
        task_finish_chunk(t);
      }
      continue;
    }
    if (p->head) {
      job *j = p->head;
      p->head = j->next;
      if (!p->head) p->tail = NULL;
      p->queued--;
      p->running++;
      uv_mutex_unlock(&p->mu);
      j->fn(j->arg);
      tl_free(j);
      uv_mutex_lock(&p->mu);
      p->running--;
      continue;
    }
    if (p->stopping) break;
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
  tl_free(p->threads);
  tl_free(p);
}

int pool_submit(pool_t *p, pool_job_fn fn, void *arg) {
  job *j = tl_malloc(sizeof *j);
  if (!j) return -TS_ENOMEM;
  j->fn = fn;
  j->arg = arg;
  j->next = NULL;
  uv_mutex_lock(&p->mu);
  if (p->stopping || p->queued >= p->depth) {
    uv_mutex_unlock(&p->mu);
    tl_free(j);
    return p->stopping ? -TS_EUNAVAIL : -TS_EBUSY;
  }
  if (p->tail)
    p->tail->next = j;
  else
    p->head = j;
  p->tail = j;
  p->queued++;
  uv_cond_signal(&p->wake);
  uv_mutex_unlock(&p->mu);
  return 0;
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
