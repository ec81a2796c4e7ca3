/* test_session_store.c - the session store alone (session_store.h): ids and
 * lookups, idle expiry on a fake clock and by the reaper, LRU eviction under
 * the byte and the count limit, refusal of a new session that cannot fit
 * (never evicting it, never freeing its payload), busy sessions, deletion
 * while busy, the change hook that feeds the gauges, 20,000 sessions, and
 * several threads at once. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <uv.h>

#include <cmocka.h>

#include "../../daemon/server/session_store.h"

typedef struct pl {
  int tag;
} pl;

static double fake_now;
static double fake_clock(void) {
  return fake_now;
}

static uv_mutex_t freed_mu;
static int freed, freed_tags[64];
static void free_pl(void *p) {
  uv_mutex_lock(&freed_mu);
  if (freed < 64) freed_tags[freed] = ((pl *)p)->tag;
  freed++;
  uv_mutex_unlock(&freed_mu);
}

static int64_t gauge_n = -1;
static uint64_t gauge_bytes;
static int changes;
static void on_change(int64_t n, uint64_t bytes, void *arg) {
  (void)arg;
  gauge_n = n;
  gauge_bytes = bytes;
  changes++;
}

static ss_store *open_store(double ttl, uint64_t max_bytes, int64_t max_sessions, int reaper,
                            int fake) {
  ss_config c = {.limits = {ttl, max_bytes, max_sessions},
                 .payload_size = sizeof(pl),
                 .free_payload = free_pl,
                 .on_change = on_change,
                 .clock = fake ? fake_clock : NULL,
                 .reaper = reaper};
  ss_store *s = NULL;
  ts_err err = {0};
  if (ss_open(&s, &c, &err)) fail_msg("ss_open: %s", err.msg);
  freed = 0;
  changes = 0;
  fake_now = 1000;
  return s;
}

static void create(ss_store *s, const char *owner, int tag, uint64_t bytes, ss_info *in) {
  pl p = {tag};
  ss_full full = 0;
  ts_err err = {0};
  if (ss_create(s, owner, &p, bytes, in, &full, &err)) fail_msg("ss_create: %s", err.msg);
}

/* With a prefix (the replica id) ids read "<prefix>.<32 hex>" and are
 * looked up whole; the bare random part is not the session. */
static void test_prefixed_ids(void **st) {
  (void)st;
  ss_config c = {.limits = {60, 1 << 20, 100}, .payload_size = sizeof(pl), .free_payload = free_pl};
  snprintf(c.id_prefix, sizeof c.id_prefix, "replica-7");
  ss_store *s = NULL;
  ts_err err = {0};
  assert_int_equal(ss_open(&s, &c, &err), 0);
  ss_info a, g;
  create(s, "m", 1, 100, &a);
  assert_int_equal(strlen(a.id), strlen("replica-7.") + SS_ID_LEN);
  assert_memory_equal(a.id, "replica-7.", 10);
  assert_int_equal(strspn(a.id + 10, "0123456789abcdef"), SS_ID_LEN);
  ss_gone gone;
  assert_int_equal(ss_get(s, "m", a.id, &g, NULL, &gone), 0);
  assert_string_equal(g.id, a.id);
  assert_int_equal(ss_get(s, "m", a.id + 10, &g, NULL, &gone), -TS_ENOTFOUND);
  ss_close(s);
}

static void test_ids_lookup_delete(void **st) {
  (void)st;
  ss_store *s = open_store(60, 1 << 20, 100, 0, 1);
  ss_info a, b, g;
  create(s, "m1", 1, 100, &a);
  create(s, "m1", 2, 100, &b);
  assert_int_equal(strlen(a.id), SS_ID_LEN);
  assert_int_equal(strspn(a.id, "0123456789abcdef"), SS_ID_LEN);
  assert_string_not_equal(a.id, b.id);
  assert_int_equal(a.position, 0);
  assert_int_equal(a.bytes, 100 + ss_overhead(s, "m1"));
  assert_int_equal(a.payload_bytes, 100);
  assert_true(ss_overhead(s, "m1") >= sizeof(pl) + 3);
  pl p = {0};
  ss_gone gone = SS_UNKNOWN;
  assert_int_equal(ss_get(s, "m1", a.id, &g, &p, &gone), 0);
  assert_int_equal(p.tag, 1);
  assert_string_equal(g.id, a.id);
  assert_int_equal(ss_get(s, "m2", a.id, &g, NULL, &gone), -TS_ENOTFOUND);
  assert_int_equal(gone, SS_OTHER_OWNER);
  assert_int_equal(ss_get(s, "m1", "0123456789abcdef0123456789abcdef", &g, NULL, &gone),
                   -TS_ENOTFOUND);
  assert_int_equal(gone, SS_UNKNOWN);
  assert_int_equal(gauge_n, 2);
  assert_int_equal(gauge_bytes, 2 * a.bytes);
  assert_int_equal(ss_delete(s, "m1", a.id, &gone), 0);
  assert_int_equal(freed, 1);
  assert_int_equal(freed_tags[0], 1);
  assert_int_equal(gauge_n, 1);
  assert_int_equal(gauge_bytes, b.bytes);
  assert_int_equal(ss_get(s, "m1", a.id, &g, NULL, &gone), -TS_ENOTFOUND);
  assert_int_equal(gone, SS_DELETED);
  assert_int_equal(ss_delete(s, "m1", a.id, &gone), -TS_ENOTFOUND);
  int64_t n;
  uint64_t bytes;
  ss_stats(s, &n, &bytes);
  assert_int_equal(n, 1);
  assert_int_equal(bytes, b.bytes);
  ss_close(s);
  assert_int_equal(freed, 2);
  assert_int_equal(gauge_n, 0);
  assert_int_equal(gauge_bytes, 0);
}

static void test_ttl_on_a_fake_clock(void **st) {
  (void)st;
  ss_store *s = open_store(10, 1 << 20, 100, 0, 1);
  ss_info a, b, g;
  create(s, "m", 1, 10, &a);
  fake_now += 6;
  create(s, "m", 2, 10, &b);
  ss_gone gone;
  assert_int_equal(ss_get(s, "m", a.id, &g, NULL, &gone), 0);
  assert_true(g.expires_in > 3.9 && g.expires_in < 4.1);
  fake_now += 5; /* a is 11 s idle, b 5 s */
  assert_int_equal(ss_get(s, "m", a.id, &g, NULL, &gone), -TS_ENOTFOUND);
  assert_int_equal(gone, SS_EXPIRED);
  assert_int_equal(freed, 0); /* a lookup never frees (the loop thread calls it) */
  ss_entry *e;
  void *p;
  assert_int_equal(ss_acquire(s, "m", a.id, &e, &p, &g, &gone), -TS_ENOTFOUND);
  assert_int_equal(gone, SS_EXPIRED);
  assert_int_equal(freed, 1);
  /* a busy session never expires; released, its idle time starts again */
  assert_int_equal(ss_acquire(s, "m", b.id, &e, &p, &g, &gone), 0);
  fake_now += 100;
  assert_int_equal(ss_get(s, "m", b.id, &g, NULL, &gone), 0);
  assert_true(g.busy);
  ss_release(s, e, 7, 10);
  fake_now += 9;
  assert_int_equal(ss_get(s, "m", b.id, &g, NULL, &gone), 0);
  assert_int_equal(g.position, 7);
  fake_now += 2;
  assert_int_equal(ss_get(s, "m", b.id, &g, NULL, &gone), -TS_ENOTFOUND);
  ss_close(s);
  assert_int_equal(freed, 2);
}

static void test_reaper(void **st) {
  (void)st;
  ss_store *s = open_store(0.05, 1 << 20, 100, 1, 0);
  ss_info a;
  create(s, "m", 1, 10, &a);
  int64_t n = 1;
  uint64_t bytes;
  for (int i = 0; i < 300 && n; i++) {
    uv_sleep(10);
    ss_stats(s, &n, &bytes);
  }
  assert_int_equal(n, 0);
  assert_int_equal(freed, 1);
  assert_int_equal(gauge_n, 0);
  ss_gone gone;
  assert_int_equal(ss_get(s, "m", a.id, NULL, NULL, &gone), -TS_ENOTFOUND);
  assert_int_equal(gone, SS_EXPIRED);
  ss_close(s);
}

static void test_lru_eviction_by_bytes(void **st) {
  (void)st;
  ss_store *tmp = open_store(60, 1, 1, 0, 1);
  uint64_t oh = ss_overhead(tmp, "m");
  ss_close(tmp);
  ss_store *s = open_store(60, 2 * (1000 + oh) + 500, 100, 0, 1);
  ss_info a, b, c, g;
  create(s, "m", 1, 1000, &a);
  create(s, "m", 2, 1000, &b);
  ss_entry *e;
  void *p;
  ss_gone gone;
  fake_now += 1;
  assert_int_equal(ss_acquire(s, "m", a.id, &e, &p, &g, &gone), 0);
  assert_int_equal(((pl *)p)->tag, 1);
  ss_release(s, e, 1, 1000);   /* a is now the most recently used */
  create(s, "m", 3, 1000, &c); /* over the cap: b, the least recently used, goes */
  assert_int_equal(freed, 1);
  assert_int_equal(freed_tags[0], 2);
  assert_int_equal(ss_get(s, "m", b.id, &g, NULL, &gone), -TS_ENOTFOUND);
  assert_int_equal(gone, SS_EVICTED_BYTES);
  assert_int_equal(ss_get(s, "m", a.id, &g, NULL, &gone), 0);
  assert_int_equal(ss_get(s, "m", c.id, &g, NULL, &gone), 0);
  /* a session that grows past the cap alone goes after its release, the
   * others first */
  assert_int_equal(ss_acquire(s, "m", c.id, &e, &p, &g, &gone), 0);
  ss_release(s, e, 5, 1500 + oh);
  assert_int_equal(freed, 2);
  assert_int_equal(freed_tags[1], 1); /* a went to make room */
  assert_int_equal(ss_get(s, "m", c.id, &g, NULL, &gone), 0);
  assert_int_equal(ss_acquire(s, "m", c.id, &e, &p, &g, &gone), 0);
  ss_release(s, e, 6, 3 * (1000 + oh));
  assert_int_equal(freed, 3);
  assert_int_equal(ss_get(s, "m", c.id, &g, NULL, &gone), -TS_ENOTFOUND);
  assert_int_equal(gone, SS_EVICTED_BYTES);
  assert_int_equal(gauge_n, 0);
  assert_int_equal(gauge_bytes, 0);
  ss_close(s);
}

static void test_count_limit(void **st) {
  (void)st;
  ss_store *s = open_store(60, 1 << 30, 3, 0, 1);
  ss_info in[5], g;
  for (int i = 0; i < 5; i++) {
    fake_now += 1;
    create(s, "m", i, 10, &in[i]);
  }
  int64_t n;
  uint64_t bytes;
  ss_stats(s, &n, &bytes);
  assert_int_equal(n, 3);
  assert_int_equal(freed, 2);
  assert_int_equal(freed_tags[0], 0);
  assert_int_equal(freed_tags[1], 1);
  ss_gone gone;
  assert_int_equal(ss_get(s, "m", in[0].id, &g, NULL, &gone), -TS_ENOTFOUND);
  assert_int_equal(gone, SS_EVICTED_COUNT);
  assert_int_equal(ss_get(s, "m", in[4].id, &g, NULL, &gone), 0);
  ss_close(s);
}

/* Issue 10, defect 1: a new session that does not fit is refused; it is
 * never inserted and evicted, its payload stays the caller's, and nothing
 * else is evicted for a refusal. */
static void test_refusal_never_evicts_the_new_session(void **st) {
  (void)st;
  ss_store *s = open_store(60, 100, 2, 0, 1);
  pl p = {9};
  ss_info in;
  ss_full full = 0;
  ts_err err = {0};
  assert_int_equal(ss_create(s, "m", &p, 1, &in, &full, &err), -TS_EUNAVAIL);
  assert_int_equal(full, SS_FULL_TOO_BIG); /* the store's own overhead alone is over 100 */
  assert_int_equal(freed, 0);
  assert_int_equal(gauge_n, 0);
  ss_close(s);

  uint64_t oh;
  s = open_store(60, 1 << 20, 2, 0, 1);
  oh = ss_overhead(s, "m");
  ss_info a, b, g;
  create(s, "m", 1, 10, &a);
  create(s, "m", 2, 10, &b);
  ss_entry *ea, *eb;
  void *pa, *pb;
  ss_gone gone;
  assert_int_equal(ss_acquire(s, "m", a.id, &ea, &pa, &g, &gone), 0);
  assert_int_equal(ss_acquire(s, "m", b.id, &eb, &pb, &g, &gone), 0);
  assert_int_equal(ss_create(s, "m", &p, 10, &in, &full, &err), -TS_EUNAVAIL);
  assert_int_equal(full, SS_FULL_COUNT); /* both busy: nothing to evict */
  assert_int_equal(freed, 0);
  ss_release(s, eb, 0, 10);
  create(s, "m", 3, 10, &in); /* b is idle now: it makes room */
  assert_int_equal(freed, 1);
  assert_int_equal(freed_tags[0], 2);
  ss_release(s, ea, 0, 10);
  ss_close(s);

  /* bytes: the busy session holds most of the cap; the idle one is not
   * evicted for a newcomer that would not fit anyway */
  s = open_store(60, 3 * (100 + oh), 10, 0, 1);
  create(s, "m", 1, 100, &a);
  create(s, "m", 2, 2 * (100 + oh) - oh, &b);
  assert_int_equal(ss_acquire(s, "m", b.id, &eb, &pb, &g, &gone), 0);
  assert_int_equal(ss_create(s, "m", &p, 100 + oh, &in, &full, &err), -TS_EUNAVAIL);
  assert_int_equal(full, SS_FULL_BYTES);
  assert_int_equal(freed, 0);
  assert_int_equal(ss_get(s, "m", a.id, &g, NULL, &gone), 0);
  create(s, "m", 3, 100, &in); /* fits once a goes */
  assert_int_equal(freed, 1);
  assert_int_equal(freed_tags[0], 1);
  ss_release(s, eb, 0, 2 * (100 + oh) - oh);
  ss_close(s);
}

static void test_busy_and_delete_while_busy(void **st) {
  (void)st;
  ss_store *s = open_store(60, 1 << 20, 10, 0, 1);
  ss_info a, g;
  create(s, "m", 1, 10, &a);
  ss_entry *e, *e2;
  void *p, *p2;
  ss_gone gone;
  assert_int_equal(ss_acquire(s, "m", a.id, &e, &p, &g, &gone), 0);
  assert_int_equal(ss_acquire(s, "m", a.id, &e2, &p2, &g, &gone), -TS_ECONFLICT);
  assert_int_equal(ss_delete(s, "m", a.id, &gone), 0);
  assert_int_equal(freed, 0); /* its taker still uses it */
  assert_int_equal(gauge_n, 0);
  assert_int_equal(ss_get(s, "m", a.id, &g, NULL, &gone), -TS_ENOTFOUND);
  assert_int_equal(gone, SS_DELETED);
  ((pl *)p)->tag = 5;
  ss_release(s, e, 3, 20);
  assert_int_equal(freed, 1);
  assert_int_equal(freed_tags[0], 5);
  assert_int_equal(gauge_n, 0);
  assert_int_equal(gauge_bytes, 0);
  ss_close(s);
  assert_int_equal(freed, 1);
}

static void test_many_sessions(void **st) {
  (void)st;
  enum { N = 20000 };
  ss_store *s = open_store(600, UINT64_MAX / 2, N, 0, 1);
  static char ids[N][SS_ID_LEN + 1];
  for (int i = 0; i < N; i++) {
    ss_info in;
    create(s, "m", i, 100, &in);
    memcpy(ids[i], in.id, sizeof ids[i]);
  }
  assert_int_equal(gauge_n, N);
  assert_int_equal(gauge_bytes, (uint64_t)N * (100 + ss_overhead(s, "m")));
  ss_gone gone;
  for (int i = 0; i < N; i++) {
    pl p;
    ss_info g;
    if (ss_get(s, "m", ids[i], &g, &p, &gone) || p.tag != i) fail_msg("session %d lost", i);
  }
  char unknown[SS_ID_LEN + 1];
  memcpy(unknown, ids[0], sizeof unknown);
  unknown[0] = unknown[0] == 'a' ? 'b' : 'a';
  assert_int_equal(ss_get(s, "m", unknown, NULL, NULL, &gone), -TS_ENOTFOUND);
  /* one more: the least recently used goes (the count limit) */
  ss_info in;
  create(s, "m", N, 100, &in);
  assert_int_equal(ss_get(s, "m", ids[0], NULL, NULL, &gone), -TS_ENOTFOUND);
  assert_int_equal(gone, SS_EVICTED_COUNT);
  ss_close(s);
  assert_int_equal(freed, N + 1);
}

/* ---- several threads ---------------------------------------------------- */

static ss_store *shared;
static _Atomic int created_total, refused_total;

static void worker(void *arg) {
  unsigned seed = (unsigned)(uintptr_t)arg * 2654435761u;
  char mine[8][SS_ID_LEN + 1] = {{0}};
  for (int it = 0; it < 3000; it++) {
    seed = seed * 1103515245u + 12345u;
    int k = (int)(seed >> 16) % 8, op = (int)(seed >> 8) % 4;
    ss_gone gone;
    ss_info in;
    if (op == 0 || !mine[k][0]) {
      pl p = {1};
      ss_full full;
      ts_err err;
      if (ss_create(shared, "m", &p, (seed >> 4) % 3000, &in, &full, &err) == 0) {
        memcpy(mine[k], in.id, sizeof mine[k]);
        created_total++;
      } else {
        refused_total++;
      }
    } else if (op == 1) {
      ss_entry *e;
      void *p;
      if (ss_acquire(shared, "m", mine[k], &e, &p, &in, &gone) == 0)
        ss_release(shared, e, in.position + 1, (seed >> 3) % 6000);
    } else if (op == 2) {
      ss_delete(shared, "m", mine[k], &gone);
    } else {
      ss_get(shared, "m", mine[k], &in, NULL, &gone);
    }
  }
}

static void test_threads(void **st) {
  (void)st;
  shared = open_store(60, 20000, 12, 1, 0);
  uv_thread_t t[6];
  for (uintptr_t i = 0; i < 6; i++) uv_thread_create(&t[i], worker, (void *)(i + 1));
  for (int i = 0; i < 6; i++) uv_thread_join(&t[i]);
  int64_t n;
  uint64_t bytes;
  ss_stats(shared, &n, &bytes);
  assert_true(n >= 0 && n <= 12);
  assert_true(bytes <= 20000 || n == 0);
  assert_int_equal(gauge_n, n);
  assert_int_equal(gauge_bytes, bytes);
  assert_int_equal(freed + n, created_total);
  ss_close(shared);
  assert_int_equal(freed, created_total);
  assert_true(created_total > 0);
}

int main(void) {
  uv_mutex_init(&freed_mu);
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_ids_lookup_delete),
      cmocka_unit_test(test_prefixed_ids),
      cmocka_unit_test(test_ttl_on_a_fake_clock),
      cmocka_unit_test(test_reaper),
      cmocka_unit_test(test_lru_eviction_by_bytes),
      cmocka_unit_test(test_count_limit),
      cmocka_unit_test(test_refusal_never_evicts_the_new_session),
      cmocka_unit_test(test_busy_and_delete_while_busy),
      cmocka_unit_test(test_many_sessions),
      cmocka_unit_test(test_threads),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
