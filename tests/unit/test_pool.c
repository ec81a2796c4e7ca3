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

int main(void) {
  const struct CMUnitTest tests[] = {cmocka_unit_test(test_parallel_for),
                                     cmocka_unit_test(test_queue_bound)};
  return cmocka_run_group_tests(tests, NULL, NULL);
}
