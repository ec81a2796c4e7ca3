/* test_rowlog.c - the served-row log (learn/rowlog.h): records come back in
 * order, the bound drops the oldest segments first, a torn or corrupt tail
 * is skipped and never followed by good records, labels do not count as
 * rows, and a writer killed with SIGKILL mid-stream leaves a readable store
 * whose records are a gap-free prefix of what was appended. */
#include <dirent.h>
#include <fcntl.h>
#include <limits.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>

#include "../../daemon/base/fsutil.h"
#include "../../daemon/base/mem.h"
#include "../../daemon/learn/rowlog.h"

static char root[256];

static int setup(void **state) {
  (void)state;
  snprintf(root, sizeof root, "/tmp/tallyd-rowlog-XXXXXX");
  return mkdtemp(root) ? 0 : -1;
}

static int teardown(void **state) {
  (void)state;
  return fs_rmtree(root, NULL);
}

/* Records are "r<seq>" (rows) or "l<seq>" (labels), padded to `pad` bytes. */
typedef struct seen {
  long seq[20000];
  char type[20000];
  int n, rows;
} seen;

static void replay(void *data, const void *payload, size_t len, int is_row) {
  seen *s = data;
  char buf[64];
  size_t k = len < sizeof buf - 1 ? len : sizeof buf - 1;
  memcpy(buf, payload, k);
  buf[k] = 0;
  assert_true(s->n < 20000);
  s->type[s->n] = buf[0];
  s->seq[s->n] = strtol(buf + 1, NULL, 10);
  assert_int_equal(is_row, buf[0] == 'r');
  s->rows += is_row;
  s->n++;
}

static void append_rec(rl_store *st, char type, long seq, size_t pad) {
  char buf[256];
  memset(buf, '.', sizeof buf);
  int n = snprintf(buf, sizeof buf, "%c%ld", type, seq);
  buf[n] = ' ';
  size_t len = pad > (size_t)n + 1 ? pad : (size_t)n + 1;
  ts_err err = {0};
  assert_int_equal(rl_append(st, buf, len, type == 'r', &err), 0);
}

static void dir_of(char *out, size_t n, const char *name) {
  snprintf(out, n, "%s/%s", root, name);
}

static void test_round_trip(void **state) {
  (void)state;
  char dir[512];
  dir_of(dir, sizeof dir, "rt");
  rl_opts o = {.max_rows = 1000};
  rl_store *st;
  ts_err err = {0};
  assert_int_equal(rl_open(&st, dir, &o, NULL, NULL, &err), 0);
  for (long i = 0; i < 300; i++) append_rec(st, i % 3 == 2 ? 'l' : 'r', i, 40);
  rl_flush(st);
  rl_stats ss;
  rl_get_stats(st, &ss);
  assert_int_equal(ss.written, 300);
  assert_int_equal(ss.rows, 200);
  assert_true(ss.syncs >= 1);
  rl_close(st);
  static seen s;
  memset(&s, 0, sizeof s);
  assert_int_equal(rl_open(&st, dir, &o, replay, &s, &err), 0);
  rl_close(st);
  assert_int_equal(s.n, 300);
  assert_int_equal(s.rows, 200);
  for (int i = 0; i < 300; i++) assert_int_equal(s.seq[i], i);
}

/* max_rows 100 in segments of 10: after 250 rows the store holds the newest
 * 100 (whole segments dropped, oldest first); labels ride along uncounted. */
static void test_bound_drops_oldest(void **state) {
  (void)state;
  char dir[512];
  dir_of(dir, sizeof dir, "bound");
  rl_opts o = {.max_rows = 100, .seg_rows = 10};
  rl_store *st;
  ts_err err = {0};
  assert_int_equal(rl_open(&st, dir, &o, NULL, NULL, &err), 0);
  for (long i = 0; i < 250; i++) {
    append_rec(st, 'r', i, 30);
    if (i % 5 == 0) append_rec(st, 'l', i, 30);
  }
  rl_flush(st);
  rl_stats ss;
  rl_get_stats(st, &ss);
  assert_true(ss.rows <= 100 && ss.rows > 90);
  assert_true(ss.segments_dropped >= 15);
  rl_close(st);
  static seen s;
  memset(&s, 0, sizeof s);
  assert_int_equal(rl_open(&st, dir, &o, replay, &s, &err), 0);
  rl_close(st);
  assert_true(s.rows <= 100 && s.rows > 90);
  long first = -1, last = -1;
  for (int i = 0; i < s.n; i++)
    if (s.type[i] == 'r') {
      if (first < 0) first = s.seq[i];
      assert_true(last < 0 || s.seq[i] == last + 1); /* no gaps */
      last = s.seq[i];
    }
  assert_int_equal(last, 249);
  assert_int_equal(first, 250 - s.rows);
}

static void newest_segment(const char *dir, char *out, size_t n) {
  DIR *d = opendir(dir);
  assert_non_null(d);
  char best[300] = "";
  struct dirent *e;
  while ((e = readdir(d)))
    if (strncmp(e->d_name, "seg-", 4) == 0 && strcmp(e->d_name, best) > 0)
      snprintf(best, sizeof best, "%s", e->d_name);
  closedir(d);
  assert_true(best[0]);
  snprintf(out, n, "%s/%s", dir, best);
}

/* A segment cut in the middle of its last record: the records before it
 * come back, the torn one is skipped, and records written after the next
 * open (into a new segment) come back after them. */
static void test_torn_tail(void **state) {
  (void)state;
  char dir[512], seg[1024];
  dir_of(dir, sizeof dir, "torn");
  rl_opts o = {.max_rows = 1000};
  rl_store *st;
  ts_err err = {0};
  assert_int_equal(rl_open(&st, dir, &o, NULL, NULL, &err), 0);
  for (long i = 0; i < 20; i++) append_rec(st, 'r', i, 50);
  rl_close(st);
  newest_segment(dir, seg, sizeof seg);
  struct stat sb;
  assert_int_equal(stat(seg, &sb), 0);
  assert_int_equal(truncate(seg, sb.st_size - 7), 0);
  static seen s;
  memset(&s, 0, sizeof s);
  assert_int_equal(rl_open(&st, dir, &o, replay, &s, &err), 0);
  assert_int_equal(s.n, 19);
  rl_stats ss;
  rl_get_stats(st, &ss);
  assert_int_equal(ss.skipped_records, 1);
  for (long i = 20; i < 30; i++) append_rec(st, 'r', i, 50);
  rl_close(st);
  memset(&s, 0, sizeof s);
  assert_int_equal(rl_open(&st, dir, &o, replay, &s, &err), 0);
  rl_close(st);
  assert_int_equal(s.n, 29);
  for (int i = 0; i < 19; i++) assert_int_equal(s.seq[i], i);
  for (int i = 19; i < 29; i++) assert_int_equal(s.seq[i], i + 1);
}

/* One flipped byte inside a record: the CRC catches it; that record and
 * the rest of its segment are skipped, other segments are read whole. */
static void test_corrupt_record(void **state) {
  (void)state;
  char dir[512], seg[1024];
  dir_of(dir, sizeof dir, "corrupt");
  rl_opts o = {.max_rows = 1000, .seg_rows = 10};
  rl_store *st;
  ts_err err = {0};
  assert_int_equal(rl_open(&st, dir, &o, NULL, NULL, &err), 0);
  for (long i = 0; i < 10; i++) append_rec(st, 'r', i, 20);  /* segment 1 */
  for (long i = 10; i < 15; i++) append_rec(st, 'r', i, 20); /* segment 2 */
  rl_close(st);
  snprintf(seg, sizeof seg, "%s/seg-%016d.log", dir, 1);
  int fd = open(seg, O_RDWR);
  assert_true(fd >= 0);
  /* record 3 of segment 1 starts at 8 + 3 * (8 + 20): flip a payload byte */
  off_t at = 8 + 3 * 28 + 8 + 5;
  unsigned char c;
  assert_int_equal(pread(fd, &c, 1, at), 1);
  c ^= 0x40;
  assert_int_equal(pwrite(fd, &c, 1, at), 1);
  close(fd);
  static seen s;
  memset(&s, 0, sizeof s);
  assert_int_equal(rl_open(&st, dir, &o, replay, &s, &err), 0);
  rl_close(st);
  assert_int_equal(s.n, 3 + 5);
  assert_int_equal(s.seq[2], 2);
  assert_int_equal(s.seq[3], 10);
  /* a length field that claims more than the file holds is a torn tail too */
  int skipped = 0;
  seen s2;
  memset(&s2, 0, sizeof s2);
  fd = open(seg, O_RDWR);
  unsigned char big[4] = {0xff, 0xff, 0xff, 0x00};
  assert_int_equal(pwrite(fd, big, 4, 8), 4);
  close(fd);
  assert_int_equal(rl_read_segment(seg, replay, &s2, &skipped, &err), 0);
  assert_int_equal(s2.n, 0);
  assert_int_equal(skipped, 1);
}

static void test_refusals(void **state) {
  (void)state;
  char dir[512];
  dir_of(dir, sizeof dir, "refuse");
  rl_opts o = {.max_rows = 0};
  rl_store *st;
  ts_err err = {0};
  assert_int_equal(rl_open(&st, dir, &o, NULL, NULL, &err), -TS_EINVAL);
  o.max_rows = 10;
  o.max_queue_bytes = 100;
  assert_int_equal(rl_open(&st, dir, &o, NULL, NULL, &err), 0);
  assert_int_equal(rl_append(st, "x", 0, 1, &err), -TS_EINVAL);
  char big[200] = {0};
  assert_int_equal(rl_append(st, big, sizeof big, 1, &err), -TS_EBUSY);
  rl_stats ss;
  rl_get_stats(st, &ss);
  assert_int_equal(ss.dropped_queue, 1);
  rl_close(st);
}

/* Checks that row records are r<next>, r<next+1>, ... */
typedef struct chk {
  long next;
  int bad;
} chk;

static void check_seq(void *data, const void *payload, size_t len, int is_row) {
  chk *c = data;
  char buf[64];
  size_t k = len < 63 ? len : 63;
  memcpy(buf, payload, k);
  buf[k] = 0;
  if (!is_row || buf[0] != 'r' || strtol(buf + 1, NULL, 10) != c->next) c->bad++;
  c->next++;
}

/* A child appends numbered rows as fast as it can (syncing once a second);
 * the parent kills it with SIGKILL 0.7 s after the child flushed its first
 * 2000. The store opens, and the rows read back are 0, 1, 2, ... without a
 * gap or a bad record, at least the 2000 flushed. */
static void test_kill9_during_logging(void **state) {
  (void)state;
  char dir[512];
  dir_of(dir, sizeof dir, "kill");
  rl_opts o = {.max_rows = 1000000};
  int pfd[2];
  assert_int_equal(pipe(pfd), 0);
  pid_t pid = fork();
  assert_true(pid >= 0);
  if (pid == 0) {
    close(pfd[0]);
    rl_store *st;
    ts_err err = {0};
    if (rl_open(&st, dir, &o, NULL, NULL, &err)) _exit(2);
    for (long i = 0;; i++) {
      char buf[64];
      int n = snprintf(buf, sizeof buf, "r%ld payload-payload-payload", i);
      while (rl_append(st, buf, (size_t)n, 1, &err) == -TS_EBUSY) usleep(100);
      if (i == 1999) { /* the first 2000 are on disk: tell the parent */
        rl_flush(st);
        if (write(pfd[1], "x", 1) != 1) _exit(3);
      }
      if (i % 1000 == 0) usleep(1000);
    }
  }
  close(pfd[1]);
  char x;
  assert_int_equal(read(pfd[0], &x, 1), 1);
  close(pfd[0]);
  usleep(700 * 1000); /* killed mid-stream, between two fsyncs */
  kill(pid, SIGKILL);
  int status;
  waitpid(pid, &status, 0);
  assert_true(WIFSIGNALED(status));
  rl_store *st;
  ts_err err = {0};
  assert_int_equal(rl_open(&st, dir, &o, NULL, NULL, &err), 0);
  rl_stats ss;
  rl_get_stats(st, &ss);
  rl_close(st);
  assert_true(ss.rows >= 2000); /* at least what was flushed before the kill */
  DIR *d = opendir(dir);
  struct dirent *e;
  long expect = 0;
  char names[64][300];
  int nn = 0;
  while ((e = readdir(d)) && nn < 64)
    if (strncmp(e->d_name, "seg-", 4) == 0) snprintf(names[nn++], 300, "%s", e->d_name);
  closedir(d);
  qsort(names, (size_t)nn, 300, (int (*)(const void *, const void *))strcmp);
  for (int i = 0; i < nn; i++) {
    char p[PATH_MAX];
    snprintf(p, sizeof p, "%s/%.299s", dir, names[i]);
    int skipped;
    chk c = {expect, 0};
    assert_int_equal(rl_read_segment(p, check_seq, &c, &skipped, &err), 0);
    assert_int_equal(c.bad, 0);
    expect = c.next;
  }
  assert_int_equal(expect, ss.rows);
}

/* Every allocation of opening (with a replay), appending and closing may
 * fail: each run until one succeeds comes back with an error value or
 * drops the record, never crashes, and (SAN) never leaks. */
static void test_alloc_failures(void **state) {
  (void)state;
  char dir[512];
  dir_of(dir, sizeof dir, "faults");
  rl_opts o = {.max_rows = 50, .seg_rows = 5};
  rl_store *st;
  ts_err err = {0};
  assert_int_equal(rl_open(&st, dir, &o, NULL, NULL, &err), 0);
  for (long i = 0; i < 30; i++) append_rec(st, i % 4 ? 'r' : 'l', i, 24);
  rl_close(st);
  int done = 0;
  for (long n = 0; n < 2000 && !done; n++) {
    static seen s;
    memset(&s, 0, sizeof s);
    tl_mem_fail_after(n);
    int rc = rl_open(&st, dir, &o, replay, &s, &err);
    if (rc == 0) {
      char buf[32] = "r999 payload";
      int a = rl_append(st, buf, strlen(buf), 1, &err);
      assert_true(a == 0 || a == -TS_ENOMEM);
      rl_close(st);
      done = a == 0;
    } else {
      assert_true(rc == -TS_ENOMEM || rc == -TS_EIO);
    }
    tl_mem_fail_reset();
  }
  assert_true(done);
}

/* One process at a time: a second open of the directory is refused while
 * the first holds it, and succeeds once it is closed. */
static void test_one_writer(void **state) {
  (void)state;
  char dir[512];
  dir_of(dir, sizeof dir, "lock");
  rl_opts o = {.max_rows = 10};
  rl_store *a, *b;
  ts_err err = {0};
  assert_int_equal(rl_open(&a, dir, &o, NULL, NULL, &err), 0);
  assert_int_equal(rl_open(&b, dir, &o, NULL, NULL, &err), -TS_ECONFLICT);
  assert_non_null(strstr(err.msg, "in use by another process"));
  rl_close(a);
  assert_int_equal(rl_open(&b, dir, &o, NULL, NULL, &err), 0);
  rl_close(b);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test_setup_teardown(test_round_trip, setup, teardown),
      cmocka_unit_test_setup_teardown(test_bound_drops_oldest, setup, teardown),
      cmocka_unit_test_setup_teardown(test_torn_tail, setup, teardown),
      cmocka_unit_test_setup_teardown(test_corrupt_record, setup, teardown),
      cmocka_unit_test_setup_teardown(test_refusals, setup, teardown),
      cmocka_unit_test_setup_teardown(test_kill9_during_logging, setup, teardown),
      cmocka_unit_test_setup_teardown(test_alloc_failures, setup, teardown),
      cmocka_unit_test_setup_teardown(test_one_writer, setup, teardown),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
