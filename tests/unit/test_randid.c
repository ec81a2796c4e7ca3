/* test_randid.c - the one random-id maker (base/randid.h): lengths and
 * alphabets of both encodings, base64url of known bytes' lengths, refusal of
 * short buffers, and no id handed out twice from the pooled block, within a
 * thread and across threads, nor shared by a forked child with its parent. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>
#include <uv.h>

#include <cmocka.h>

#include "../../daemon/base/randid.h"

static void test_lengths_and_alphabets(void **s) {
  (void)s;
  char out[RID_MAX_BYTES * 2 + 1];
  ts_err err = {0};
  for (size_t n = 1; n <= RID_MAX_BYTES; n++) {
    assert_int_equal(rid_make(out, sizeof out, n, RID_HEX, 0, &err), 0);
    assert_int_equal(strlen(out), 2 * n);
    assert_int_equal(strspn(out, "0123456789abcdef"), 2 * n);
    assert_int_equal(rid_make(out, sizeof out, n, RID_B64URL, RID_POOLED, &err), 0);
    assert_int_equal(strlen(out), rid_len(n, RID_B64URL));
    assert_int_equal(
        strspn(out, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"),
        strlen(out));
  }
  /* RFC 4648 without padding: 1 byte 2 characters, 2 bytes 3, 3 bytes 4, 32 bytes 43 */
  assert_int_equal(rid_len(1, RID_B64URL), 2);
  assert_int_equal(rid_len(2, RID_B64URL), 3);
  assert_int_equal(rid_len(3, RID_B64URL), 4);
  assert_int_equal(rid_len(32, RID_B64URL), 43);
  assert_int_equal(rid_len(16, RID_HEX), 32);
}

static void test_refusals(void **s) {
  (void)s;
  char out[8];
  ts_err err = {0};
  assert_int_equal(rid_make(out, sizeof out, 4, RID_HEX, 0, &err), -TS_EINVAL);
  assert_int_equal(rid_make(out, sizeof out, 0, RID_HEX, 0, &err), -TS_EINVAL);
  assert_int_equal(rid_make(out, sizeof out, RID_MAX_BYTES + 1, RID_HEX, 0, &err), -TS_EINVAL);
  assert_int_equal(rid_make(out, sizeof out, 3, RID_HEX, 0, &err), 0);
  assert_int_equal(strlen(out), 6);
}

#define PER 4000
static char ids[3][PER][25];

static void fill(void *arg) {
  char(*mine)[25] = arg;
  for (int i = 0; i < PER; i++)
    if (rid_make(mine[i], sizeof mine[i], 12, RID_HEX, RID_POOLED, NULL)) mine[i][0] = 0;
}

static int cmp(const void *a, const void *b) {
  return strcmp(a, b);
}

static void test_pooled_ids_never_repeat(void **s) {
  (void)s;
  uv_thread_t t[2];
  uv_thread_create(&t[0], fill, ids[1]);
  uv_thread_create(&t[1], fill, ids[2]);
  fill(ids[0]);
  uv_thread_join(&t[0]);
  uv_thread_join(&t[1]);
  char(*all)[25] = (char(*)[25])ids; /* the three threads' ids as one array */
  qsort(all, 3 * PER, sizeof all[0], cmp);
  for (int i = 0; i < 3 * PER; i++) assert_int_equal(strlen(all[i]), 24);
  for (int i = 1; i < 3 * PER; i++)
    if (strcmp(all[i - 1], all[i]) == 0) fail_msg("id %s handed out twice", all[i]);
}

/* A forked child must not hand out the ids its parent hands out next: the
 * pooled block is refilled in the child, and direct draws differ too. */
static void test_forked_processes_differ(void **s) {
  (void)s;
  char a[33], b[33], c[33], d[33];
  ts_err err = {0};
  assert_int_equal(rid_make(a, sizeof a, 16, RID_HEX, RID_POOLED, &err), 0); /* block filled */
  int p[2];
  assert_int_equal(pipe(p), 0);
  pid_t k = fork();
  assert_true(k >= 0);
  if (k == 0) {
    char x[66];
    if (rid_make(x, 33, 16, RID_HEX, RID_POOLED, NULL) ||
        rid_make(x + 33, 33, 16, RID_HEX, 0, NULL) || write(p[1], x, 66) != 66)
      _exit(1);
    _exit(0);
  }
  char got[66];
  assert_int_equal(read(p[0], got, 66), 66);
  int st;
  assert_int_equal(waitpid(k, &st, 0), k);
  assert_true(WIFEXITED(st) && WEXITSTATUS(st) == 0);
  assert_int_equal(rid_make(b, sizeof b, 16, RID_HEX, RID_POOLED, &err), 0);
  assert_int_equal(rid_make(d, sizeof d, 16, RID_HEX, 0, &err), 0);
  memcpy(c, got, 33);
  assert_string_not_equal(c, b); /* the parent's next pooled id */
  assert_string_not_equal(got + 33, d);
  close(p[0]);
  close(p[1]);
}

int main(void) {
  const struct CMUnitTest tests[] = {cmocka_unit_test(test_lengths_and_alphabets),
                                     cmocka_unit_test(test_refusals),
                                     cmocka_unit_test(test_pooled_ids_never_repeat),
                                     cmocka_unit_test(test_forked_processes_differ)};
  return cmocka_run_group_tests(tests, NULL, NULL);
}
