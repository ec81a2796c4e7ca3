/* test_fitlock.c - the lease lock across processes (base/fitlock.h), with
 * forked processes standing in for replicas on one repository: a held lock
 * refuses others and names its holder, a renewed lock outlives its lease, a
 * holder killed without releasing blocks others only until its lease runs
 * out, many takers of one stale lock produce exactly one winner, and a
 * holder whose file was replaced finds out and leaves the new file alone. */
#include <errno.h>
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
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "../../daemon/base/fitlock.h"
#include "../../daemon/base/fsutil.h"

static char root[PATH_MAX], lockp[PATH_MAX + 32];

static int setup(void **state) {
  (void)state;
  snprintf(root, sizeof root, "/tmp/tallyd-fitlock-XXXXXX");
  if (!mkdtemp(root)) return -1;
  snprintf(lockp, sizeof lockp, "%s/.fit-lock", root);
  return 0;
}

static int teardown(void **state) {
  (void)state;
  return fs_rmtree(root, NULL);
}

static void sleep_ms(int ms) {
  struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
  while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
  }
}

/* Runs fl_acquire in a child process: its exit code is 0 (acquired and
 * released), 1 (409) or 2 (another error); on 409 the message goes into
 * msg (through a pipe). */
static int try_in_child(const char *owner, int64_t lease_ms, char *msg, size_t msg_n) {
  int p[2];
  assert_int_equal(pipe(p), 0);
  pid_t k = fork();
  assert_true(k >= 0);
  if (k == 0) {
    close(p[0]);
    fl_lock *l;
    ts_err e = {0};
    int rc = fl_acquire(lockp, owner, lease_ms, &l, NULL, &e);
    if (rc && write(p[1], e.msg, strlen(e.msg)) < 0) _exit(3);
    if (!rc) fl_release(l);
    _exit(rc == 0 ? 0 : rc == -TS_ECONFLICT ? 1 : 2);
  }
  close(p[1]);
  ssize_t n = read(p[0], msg, msg_n - 1);
  msg[n > 0 ? n : 0] = 0;
  close(p[0]);
  int st;
  assert_int_equal(waitpid(k, &st, 0), k);
  assert_true(WIFEXITED(st));
  return WEXITSTATUS(st);
}

static void test_held_refuses_and_names_holder(void **state) {
  (void)state;
  fl_lock *l;
  ts_err e = {0};
  assert_int_equal(fl_acquire(lockp, "replica-a", 5000, &l, NULL, &e), 0);
  fl_holder h;
  assert_int_equal(fl_read(lockp, &h, &e), 1);
  assert_string_equal(h.owner, "replica-a");
  assert_int_equal(h.pid, getpid());
  assert_true(h.expires_ms > fl_now_ms() + 3000);
  char msg[512];
  assert_int_equal(try_in_child("replica-b", 5000, msg, sizeof msg), 1);
  assert_non_null(strstr(msg, "replica 'replica-a'"));
  char pid[32];
  snprintf(pid, sizeof pid, "pid %d", (int)getpid());
  assert_non_null(strstr(msg, pid));
  /* the same process asking again is refused too (one fit at a time) */
  fl_lock *l2;
  assert_int_equal(fl_acquire(lockp, "replica-a", 5000, &l2, NULL, &e), -TS_ECONFLICT);
  fl_release(l);
  assert_int_equal(access(lockp, F_OK), -1); /* released: gone */
  assert_int_equal(try_in_child("replica-b", 5000, msg, sizeof msg), 0);
  assert_int_equal(fl_acquire(lockp, "x", 50, &l2, NULL, &e), -TS_EINVAL); /* lease too short */
}

/* A lease of 300 ms held for 1.2 s: renewed every 100 ms, never stale. */
static void test_renewal_keeps_it(void **state) {
  (void)state;
  fl_lock *l;
  ts_err e = {0};
  assert_int_equal(fl_acquire(lockp, "holder", 300, &l, NULL, &e), 0);
  char msg[512];
  for (int i = 0; i < 4; i++) {
    sleep_ms(300);
    assert_int_equal(try_in_child("taker", 300, msg, sizeof msg), 1);
  }
  assert_int_equal(fl_lost(l), 0);
  fl_release(l);
}

/* A holder killed with SIGKILL (no release, no renewal): refused until the
 * lease runs out, then taken over. */
static void test_killed_holder_expires(void **state) {
  (void)state;
  int p[2];
  assert_int_equal(pipe(p), 0);
  pid_t k = fork();
  assert_true(k >= 0);
  if (k == 0) {
    fl_lock *l;
    ts_err e = {0};
    char c = fl_acquire(lockp, "doomed", 600, &l, NULL, &e) == 0 ? 'y' : 'n';
    if (write(p[1], &c, 1) != 1) _exit(3);
    for (;;) pause();
  }
  char c = 0;
  assert_int_equal(read(p[0], &c, 1), 1);
  assert_int_equal(c, 'y');
  kill(k, SIGKILL);
  int st;
  waitpid(k, &st, 0);
  int64_t t0 = fl_now_ms();
  char msg[512];
  assert_int_equal(try_in_child("next", 600, msg, sizeof msg), 1);
  assert_non_null(strstr(msg, "'doomed'"));
  fl_lock *l = NULL;
  ts_err e = {0};
  int rc;
  while ((rc = fl_acquire(lockp, "next", 600, &l, NULL, &e)) == -TS_ECONFLICT) sleep_ms(50);
  assert_int_equal(rc, 0);
  assert_true(fl_now_ms() - t0 < 1500); /* within the lease (plus a margin) */
  fl_holder h;
  assert_int_equal(fl_read(lockp, &h, &e), 1);
  assert_string_equal(h.owner, "next");
  fl_release(l);
  close(p[0]);
  close(p[1]);
}

/* The same replica restarted after a crash (same owner, host and pid
 * namespace, its old pid gone) takes its own lock back at once; another
 * replica would wait for the lease (above). */
static void test_own_dead_predecessor(void **state) {
  (void)state;
  int p[2];
  assert_int_equal(pipe(p), 0);
  pid_t k = fork();
  assert_true(k >= 0);
  if (k == 0) {
    fl_lock *l;
    char c = fl_acquire(lockp, "same", 60000, &l, NULL, NULL) == 0 ? 'y' : 'n';
    if (write(p[1], &c, 1) != 1) _exit(3);
    for (;;) pause();
  }
  char c = 0;
  assert_int_equal(read(p[0], &c, 1), 1);
  assert_int_equal(c, 'y');
  fl_lock *l;
  ts_err e = {0};
  /* alive: refused even to the same owner */
  assert_int_equal(fl_acquire(lockp, "same", 60000, &l, NULL, &e), -TS_ECONFLICT);
  kill(k, SIGKILL);
  waitpid(k, NULL, 0);
  char msg[512];
  assert_int_equal(try_in_child("other", 60000, msg, sizeof msg), 1); /* not its own */
  int rc = fl_acquire(lockp, "same", 60000, &l, NULL, &e);
  if (rc) print_message("%s\n", e.msg);
  assert_int_equal(rc, 0);
  fl_release(l);
  close(p[0]);
  close(p[1]);
}

/* A stale lock and sixteen takers released at once, three times over:
 * exactly one wins each time, and the winner's lock is intact. */
static void test_one_taker_wins(void **state) {
  (void)state;
  enum { N = 16 };
  for (int round = 0; round < 3; round++) {
    char stale[256];
    snprintf(stale, sizeof stale,
             "{\"owner\":\"dead\",\"host\":\"h\",\"pid\":1,\"token\":\"t\",\"lease_ms\":300,"
             "\"expires_ms\":%lld}",
             (long long)(fl_now_ms() - 1000));
    assert_int_equal(fs_write_file_sync(lockp, stale, strlen(stale), NULL), 0);
    int go[2], res[2];
    assert_int_equal(pipe(go), 0);
    assert_int_equal(pipe(res), 0);
    pid_t kids[N];
    for (int i = 0; i < N; i++) {
      kids[i] = fork();
      assert_true(kids[i] >= 0);
      if (kids[i] == 0) {
        close(go[1]);
        char c;
        if (read(go[0], &c, 1) < 0) _exit(3); /* EOF: everyone starts */
        fl_lock *l;
        ts_err e = {0};
        char owner[16];
        snprintf(owner, sizeof owner, "t%d", i);
        int rc = fl_acquire(lockp, owner, 5000, &l, NULL, &e);
        char r = rc == 0 ? 'W' : rc == -TS_ECONFLICT ? 'L' : 'E';
        if (write(res[1], &r, 1) != 1) _exit(3);
        if (rc == 0) {
          sleep_ms(1000); /* hold while the others try */
          r = fl_lost(l) ? 'X' : 'K';
          fl_holder h;
          if (fl_read(lockp, &h, NULL) != 1 || strcmp(h.owner, owner) != 0) r = 'X';
          if (write(res[1], &r, 1) != 1) _exit(3);
          fl_release(l);
        }
        _exit(0);
      }
    }
    close(go[0]);
    close(go[1]);
    close(res[1]);
    int won = 0, lost = 0, kept = 0;
    char r;
    while (read(res[0], &r, 1) == 1) {
      assert_true(r != 'E' && r != 'X');
      won += r == 'W', lost += r == 'L', kept += r == 'K';
    }
    close(res[0]);
    for (int i = 0; i < N; i++) waitpid(kids[i], NULL, 0);
    assert_int_equal(won, 1);
    assert_int_equal(kept, 1);
    assert_int_equal(lost, N - 1);
    assert_int_equal(access(lockp, F_OK), -1);
  }
}

/* A lock file whose contents cannot be read (being written, or damaged)
 * counts from its mtime: live while recent, taken over once a lease old. */
static void test_unreadable_lock_uses_mtime(void **state) {
  (void)state;
  assert_int_equal(fs_write_file_sync(lockp, "", 0, NULL), 0);
  fl_lock *l;
  ts_err e = {0};
  assert_int_equal(fl_acquire(lockp, "me", 1000, &l, NULL, &e), -TS_ECONFLICT);
  assert_non_null(strstr(e.msg, "cannot be read"));
  struct timespec old[2] = {{time(NULL) - 5, 0}, {time(NULL) - 5, 0}};
  assert_int_equal(utimensat(AT_FDCWD, lockp, old, 0), 0);
  assert_int_equal(fl_acquire(lockp, "me", 1000, &l, NULL, &e), 0);
  fl_release(l);
}

/* A holder whose file was replaced (it stalled, another took over) learns
 * at its next renewal that the lock is lost, and leaves the new file. */
static void test_lost_lock_left_alone(void **state) {
  (void)state;
  fl_lock *l;
  ts_err e = {0};
  assert_int_equal(fl_acquire(lockp, "slow", 300, &l, NULL, &e), 0);
  assert_int_equal(unlink(lockp), 0);
  const char *other = "{\"owner\":\"other\",\"expires_ms\":99999999999999}";
  assert_int_equal(fs_write_file_sync(lockp, other, strlen(other), NULL), 0);
  for (int i = 0; i < 40 && !fl_lost(l); i++) sleep_ms(25);
  assert_int_equal(fl_lost(l), 1);
  fl_release(l);
  fl_holder h;
  assert_int_equal(fl_read(lockp, &h, &e), 1);
  assert_string_equal(h.owner, "other");
  unlink(lockp);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test_setup_teardown(test_held_refuses_and_names_holder, setup, teardown),
      cmocka_unit_test_setup_teardown(test_renewal_keeps_it, setup, teardown),
      cmocka_unit_test_setup_teardown(test_killed_holder_expires, setup, teardown),
      cmocka_unit_test_setup_teardown(test_own_dead_predecessor, setup, teardown),
      cmocka_unit_test_setup_teardown(test_one_taker_wins, setup, teardown),
      cmocka_unit_test_setup_teardown(test_unreadable_lock_uses_mtime, setup, teardown),
      cmocka_unit_test_setup_teardown(test_lost_lock_left_alone, setup, teardown),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
