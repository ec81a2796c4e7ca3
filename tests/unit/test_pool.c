/* test_pool.c - the worker pool (base/pool.c): the parallel-for runs each
 * index exactly once, also nested and without a pool, and the bounded queue
 * refuses work with -TS_EBUSY beyond its depth. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cmocka.h>

#include "../../daemon/base/err.h"
#include "../../daemon/base/pool.h"

typedef struct {
  int *hits;
  pool_t *pool;
} pf_arg;

static void mark(void *a, int64_t b, int64_t e) {
  pf_arg *p = a;
  for (int64_t i = b; i < e; i++) __atomic_fetch_add(&p->hits[i], 1, __ATOMIC_RELAXED);
}

static void nested(void *a, int64_t b, int64_t e) {
  pf_arg *p = a;
  for (int64_t i = b; i < e; i++) {
    pf_arg inner = {p->hits + i * 100, p->pool};
    pool_parallel_for(p->pool, 100, 7, mark, &inner);
  }
}

static void test_parallel_for(void **s) {
  (void)s;
  pool_t *p;
  assert_int_equal(pool_create(&p, 3, 4), 0);
  int *hits = calloc(100000, sizeof(int));
  pf_arg a = {hits, p};
  pool_parallel_for(p, 100000, 1, mark, &a);
  for (int i = 0; i < 100000; i++) assert_int_equal(hits[i], 1);
  memset(hits, 0, 100000 * sizeof(int));
  pool_parallel_for(p, 1000, 3, nested, &a);
  for (int i = 0; i < 100000; i++) assert_int_equal(hits[i], 1);
  memset(hits, 0, 100000 * sizeof(int));
  pool_parallel_for(NULL, 100000, 1, mark, &a);
  for (int i = 0; i < 100000; i++) assert_int_equal(hits[i], 1);
  free(hits);
  pool_destroy(p);
}

static void slow(void *arg) {
  (void)arg;
  struct timespec ts = {0, 20000000};
  nanosleep(&ts, NULL);
}

static void test_queue_bound(void **s) {
  (void)s;
  pool_t *p;
  assert_int_equal(pool_create(&p, 1, 2), 0);
  int busy = 0;
  for (int i = 0; i < 10; i++)
    if (pool_submit(p, slow, NULL) == -TS_EBUSY) busy++;
  assert_true(busy >= 7); /* one running, two waiting */
  pool_destroy(p);
}

/* ---- scheduling: levels, queue limits, lanes ------------------------------ */

#include <pthread.h>

typedef struct gate {
  pthread_mutex_t mu;
  pthread_cond_t cv;
  int open;
  int order[64], n; /* tags of the jobs in the order they ran */
  int now, peak;    /* jobs inside `counted` at once, and the most */
  pthread_t threads[64];
  int n_threads;
} gate;

static gate G = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, {0}, 0, 0, 0, {0}, 0};

static void gate_reset(void) {
  pthread_mutex_lock(&G.mu);
  G.open = 0;
  G.n = G.now = G.peak = G.n_threads = 0;
  pthread_mutex_unlock(&G.mu);
}

static void gate_open(void) {
  pthread_mutex_lock(&G.mu);
  G.open = 1;
  pthread_cond_broadcast(&G.cv);
  pthread_mutex_unlock(&G.mu);
}

static void wait_gate(void *arg) {
  (void)arg;
  pthread_mutex_lock(&G.mu);
  while (!G.open) pthread_cond_wait(&G.cv, &G.mu);
  pthread_mutex_unlock(&G.mu);
}

static void record(void *arg) {
  pthread_mutex_lock(&G.mu);
  G.order[G.n++] = (int)(intptr_t)arg;
  pthread_mutex_unlock(&G.mu);
}

/* Counts how many of these run at once. */
static void counted(void *arg) {
  (void)arg;
  pthread_mutex_lock(&G.mu);
  if (++G.now > G.peak) G.peak = G.now;
  pthread_mutex_unlock(&G.mu);
  struct timespec ts = {0, 15000000};
  nanosleep(&ts, NULL);
  pthread_mutex_lock(&G.mu);
  G.now--;
  pthread_mutex_unlock(&G.mu);
}

static void wait_idle(pool_t *p) {
  for (int i = 0; i < 2000 && (pool_queued(p) || pool_running(p)); i++) {
    struct timespec ts = {0, 1000000};
    nanosleep(&ts, NULL);
  }
}

/* With the one worker held, jobs submitted at levels 3, 1, 2, 1 (and two
 * queues) run best level first, first in first out within a level. */
static void test_levels(void **s) {
  (void)s;
  gate_reset();
  pool_t *p;
  assert_int_equal(pool_create(&p, 1, 64), 0);
  pool_q *a = pool_queue(p, "a"), *b = pool_queue(p, "b");
  assert_non_null(a);
  assert_ptr_equal(pool_queue(p, "a"), a);
  assert_int_equal(pool_submit_q(p, a, POOL_LANE_INFER, 1, wait_gate, NULL), 0);
  wait_idle(p); /* not idle: the gate holds it; this only lets it start */
  struct timespec ts = {0, 20000000};
  nanosleep(&ts, NULL);
  int levels[] = {3, 1, 2, 1, 2, 9};
  for (int i = 0; i < 6; i++)
    assert_int_equal(
        pool_submit_q(p, i % 2 ? b : a, POOL_LANE_INFER, levels[i], record, (void *)(intptr_t)i),
        0);
  gate_open();
  wait_idle(p);
  int want[] = {1, 3, 2, 4, 0, 5};
  assert_int_equal(G.n, 6);
  for (int i = 0; i < 6; i++) assert_int_equal(G.order[i], want[i]);
  pool_destroy(p);
}

/* A job given its earlier place back (pool_submit_at) runs before the jobs
 * submitted after it at its level, whatever the order of submission. */
static void test_place_kept(void **s) {
  (void)s;
  gate_reset();
  pool_t *p;
  assert_int_equal(pool_create(&p, 1, 64), 0);
  pool_q *a = pool_queue(p, "a");
  assert_int_equal(pool_submit_q(p, a, POOL_LANE_INFER, 1, wait_gate, NULL), 0);
  for (int i = 0; i < 5000 && pool_running(p) < 1; i++)
    nanosleep(&(struct timespec){0, 1000000}, NULL);
  uint64_t place = 0;
  assert_int_equal(pool_submit_at(p, a, POOL_LANE_INFER, 3, &place, record, (void *)1), 0);
  assert_true(place > 0);
  assert_int_equal(pool_submit_q(p, a, POOL_LANE_INFER, 2, record, (void *)2), 0);
  assert_int_equal(pool_submit_q(p, a, POOL_LANE_INFER, 2, record, (void *)3), 0);
  uint64_t again = place;
  assert_int_equal(pool_submit_at(p, a, POOL_LANE_INFER, 2, &again, record, (void *)4), 0);
  assert_true(again == place);
  gate_open();
  wait_idle(p);
  int want[] = {4, 2, 3, 1};
  assert_int_equal(G.n, 4);
  for (int i = 0; i < 4; i++) assert_int_equal(G.order[i], want[i]);
  pool_destroy(p);
}

/* A queue's max_running holds however many workers are idle; another
 * queue's jobs run beside it; max_queued refuses with POOL_QFULL and level
 * 0 (follow-up work) passes it. */
static void test_queue_limits(void **s) {
  (void)s;
  gate_reset();
  pool_t *p;
  assert_int_equal(pool_create(&p, 4, 64), 0);
  pool_q *a = pool_queue(p, "a");
  pool_queue_limits(p, a, 1, 0);
  for (int i = 0; i < 6; i++) assert_int_equal(pool_submit_q(p, a, 0, 2, counted, NULL), 0);
  wait_idle(p);
  assert_int_equal(G.peak, 1);
  pool_queue_limits(p, a, 3, 0);
  G.peak = 0;
  for (int i = 0; i < 9; i++) assert_int_equal(pool_submit_q(p, a, 0, 2, counted, NULL), 0);
  wait_idle(p);
  assert_int_equal(G.peak, 3);

  pool_queue_limits(p, a, 1, 2);
  assert_int_equal(pool_submit_q(p, a, 0, 2, wait_gate, NULL), 0);
  for (int i = 0; i < 5000 && pool_running(p) < 1; i++)
    nanosleep(&(struct timespec){0, 1000000}, NULL);
  assert_int_equal(pool_submit_q(p, a, 0, 2, record, (void *)1), 0);
  assert_int_equal(pool_submit_q(p, a, 0, 2, record, (void *)2), 0);
  assert_int_equal(pool_queue_queued(p, a), 2);
  assert_int_equal(pool_submit_q(p, a, 0, 2, record, (void *)3), POOL_QFULL);
  assert_int_equal(pool_submit_q(p, a, 0, 0, record, (void *)4), 0);
  /* another queue is not held by a's limit */
  pool_q *b = pool_queue(p, "b");
  assert_int_equal(pool_submit_q(p, b, 0, 2, record, (void *)5), 0);
  for (int i = 0; i < 200 && G.n < 2; i++) nanosleep(&(struct timespec){0, 1000000}, NULL);
  pthread_mutex_lock(&G.mu);
  int n = G.n;
  int first = G.order[0];
  pthread_mutex_unlock(&G.mu);
  /* level 0 passes a's running limit; b's job runs too; a's others wait */
  assert_int_equal(n, 2);
  assert_true(first == 4 || first == 5);
  gate_open();
  wait_idle(p);
  assert_int_equal(G.n, 4);
  pool_destroy(p);
}

static void thread_id(void *arg, int64_t b, int64_t e) {
  (void)arg;
  (void)b;
  (void)e;
  struct timespec ts = {0, 2000000};
  nanosleep(&ts, NULL);
  pthread_mutex_lock(&G.mu);
  pthread_t me = pthread_self();
  int seen = 0;
  for (int i = 0; i < G.n_threads; i++) seen |= pthread_equal(G.threads[i], me);
  if (!seen && G.n_threads < 64) G.threads[G.n_threads++] = me;
  pthread_mutex_unlock(&G.mu);
}

static pool_t *lane_pool;

static void fit_job(void *arg) {
  (void)arg;
  assert_int_equal(pool_current_lane(), POOL_LANE_FIT);
  pool_parallel_for(lane_pool, 64, 1, thread_id, NULL);
}

/* The fit lane's cap counts the helpers of its parallel loops: with a cap
 * of 1 a fit's loop runs on its own thread only, and a second fit waits
 * while inference jobs run on the other workers. Without the cap the loop
 * spreads. */
static void test_lane_cap(void **s) {
  (void)s;
  gate_reset();
  pool_t *p;
  assert_int_equal(pool_create(&p, 4, 64), 0);
  lane_pool = p;
  pool_q *a = pool_queue(p, "a");
  pool_lane_cap(p, POOL_LANE_FIT, 1);
  assert_int_equal(pool_lane_cap_get(p, POOL_LANE_FIT), 1);
  assert_int_equal(pool_submit_q(p, a, POOL_LANE_FIT, 2, fit_job, NULL), 0);
  wait_idle(p);
  assert_int_equal(G.n_threads, 1);
  for (int i = 0; i < 4; i++)
    assert_int_equal(pool_submit_q(p, a, POOL_LANE_FIT, 2, counted, NULL), 0);
  wait_idle(p);
  assert_int_equal(G.peak, 1);
  G.peak = 0;
  for (int i = 0; i < 6; i++)
    assert_int_equal(pool_submit_q(p, a, POOL_LANE_INFER, 2, counted, NULL), 0);
  wait_idle(p);
  assert_true(G.peak >= 2); /* inference is not held by the fit lane's cap */
  pool_lane_cap(p, POOL_LANE_FIT, 0);
  G.n_threads = 0;
  assert_int_equal(pool_submit_q(p, a, POOL_LANE_FIT, 2, fit_job, NULL), 0);
  wait_idle(p);
  assert_true(G.n_threads >= 2);
  pool_destroy(p);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_parallel_for), cmocka_unit_test(test_queue_bound),
      cmocka_unit_test(test_levels),       cmocka_unit_test(test_place_kept),
      cmocka_unit_test(test_queue_limits), cmocka_unit_test(test_lane_cap)};
  return cmocka_run_group_tests(tests, NULL, NULL);
}
