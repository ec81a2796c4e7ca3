/* test_fsutil.c - the model repository's file-system steps (fsutil.h) and
 * SHA-256 hashing (hash.h), in a fresh mkdtemp directory under /tmp.
 *
 * Digests are checked against the FIPS 180-2 test vectors. */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <sys/un.h>
#include <unistd.h>

#include <cmocka.h>

#include "../../daemon/base/fsutil.h"
#include "../../daemon/base/hash.h"
#include "../../daemon/base/mem.h"

static char root[PATH_MAX];

static int setup(void **state) {
  (void)state;
  snprintf(root, sizeof root, "/tmp/tallyd-fs-XXXXXX");
  return mkdtemp(root) ? 0 : -1;
}

static int teardown(void **state) {
  (void)state;
  return fs_rmtree(root, NULL);
}

/* root/<rel>, in one of a few rotating buffers. */
static const char *at(const char *rel) {
  static char bufs[4][PATH_MAX + 256];
  static int k;
  char *b = bufs[k++ % 4];
  snprintf(b, sizeof bufs[0], "%s/%s", root, rel);
  return b;
}

static void mkdir_ok(const char *rel) {
  assert_int_equal(mkdir(at(rel), 0755), 0);
}

static void put(const char *rel, const char *text) {
  assert_int_equal(fs_write_file_sync(at(rel), text, strlen(text), NULL), 0);
}

static int exists(const char *p) {
  struct stat st;
  return lstat(p, &st) == 0;
}

static void test_list_versions(void **state) {
  (void)state;
  mkdir_ok("m");
  const char *dirs[] = {"m/1",   "m/10",     "m/2",  "m/01", "m/0",
                        "m/abc", "m/.tmp-x", "m/3a", "m/+4", "m/9007199254740991"};
  for (size_t i = 0; i < sizeof dirs / sizeof *dirs; i++) mkdir_ok(dirs[i]);
  put("m/5", "a file, not a version");
  put("m/config.json", "{}");
  assert_int_equal(symlink("2", at("m/7")), 0);           /* a link to a version dir counts */
  assert_int_equal(symlink("config.json", at("m/8")), 0); /* a link to a file does not */
  int64_t *v;
  int n;
  ts_err err = {0};
  assert_int_equal(fs_list_versions(at("m"), &v, &n, &err), 0);
  assert_int_equal(n, 5);
  int64_t want[] = {1, 2, 7, 10, FS_MAX_VERSION};
  for (int i = 0; i < 5; i++) assert_true(v[i] == want[i]);
  tl_free(v);

  /* a directory named like a version past FS_MAX_VERSION is an error naming
   * it: skipped silently it would hide a model's newest version, wrapped it
   * would be nonsense, and version + 1 must never overflow */
  const char *over[] = {"9007199254740992", "9223372036854775807", "9223372036854775808",
                        "99999999999999999999"};
  for (size_t i = 0; i < sizeof over / sizeof *over; i++) {
    mkdir_ok("big");
    char rel[64];
    snprintf(rel, sizeof rel, "big/%s", over[i]);
    mkdir_ok("big/1");
    mkdir_ok(rel);
    assert_int_equal(fs_list_versions(at("big"), &v, &n, &err), -TS_EINVAL);
    assert_non_null(strstr(err.msg, over[i]));
    assert_non_null(strstr(err.msg, "largest version"));
    assert_null(v);
    assert_int_equal(fs_rmtree(at("big"), NULL), 0);
  }
  int64_t pv = 0;
  assert_int_equal(fs_parse_version("9007199254740991", &pv), 1);
  assert_true(pv == FS_MAX_VERSION);
  assert_int_equal(fs_parse_version("9007199254740992", &pv), -1);
  assert_int_equal(fs_parse_version("184467440737095516160", &pv), -1);
  assert_int_equal(fs_parse_version("12x", &pv), 0);
  assert_int_equal(fs_parse_version("0", &pv), 0);

  mkdir_ok("empty");
  assert_int_equal(fs_list_versions(at("empty"), &v, &n, &err), 0);
  assert_int_equal(n, 0);
  assert_null(v);
  assert_int_equal(fs_list_versions(at("nope"), &v, &n, &err), -TS_ENOTFOUND);
  assert_non_null(strstr(err.msg, "nope"));

  for (long k = 0; k < 100; k++) { /* the array grows past its first 8 slots */
    char name[32];
    snprintf(name, sizeof name, "m/%ld", 100 + k);
    mkdir_ok(name);
  }
  assert_int_equal(fs_list_versions(at("m"), &v, &n, &err), 0);
  assert_int_equal(n, 105);
  for (int i = 1; i < n; i++) assert_true(v[i - 1] < v[i]);
  tl_free(v);
  tl_mem_fail_after(0);
  assert_int_equal(fs_list_versions(at("m"), &v, &n, &err), -TS_ENOMEM);
  tl_mem_fail_reset();
  assert_int_equal(fs_rmtree(at("m"), NULL), 0);
  assert_int_equal(fs_rmtree(at("empty"), NULL), 0);
}

static void test_rmtree(void **state) {
  (void)state;
  mkdir_ok("outside");
  put("outside/keep.txt", "precious");
  mkdir_ok("t");
  mkdir_ok("t/a");
  mkdir_ok("t/a/b");
  mkdir_ok("t/empty");
  put("t/f", "x");
  put("t/a/g", "y");
  put("t/a/b/h", "z");
  assert_int_equal(symlink(at("outside"), at("t/a/link")), 0);
  assert_int_equal(symlink(at("outside/keep.txt"), at("t/filelink")), 0);
  assert_int_equal(symlink("/nonexistent/dangling", at("t/dangling")), 0);
  ts_err err = {0};
  assert_int_equal(fs_rmtree(at("t"), &err), 0);
  assert_false(exists(at("t")));
  assert_true(exists(at("outside/keep.txt"))); /* links were removed, not followed */

  /* a link at the top is removed itself */
  assert_int_equal(symlink(at("outside"), at("toplink")), 0);
  assert_int_equal(fs_rmtree(at("toplink"), &err), 0);
  assert_false(exists(at("toplink")));
  assert_true(exists(at("outside/keep.txt")));

  /* a plain file, and a path that is not there */
  put("lone", "1");
  assert_int_equal(fs_rmtree(at("lone"), &err), 0);
  assert_false(exists(at("lone")));
  assert_int_equal(fs_rmtree(at("never-was"), &err), 0);
  assert_int_equal(fs_rmtree(at("outside"), &err), 0);
  assert_false(exists(at("outside")));
}

static void test_rmtree_unremovable(void **state) {
  (void)state;
  ts_err err = {0};
  put("plain", "x"); /* a path through a file cannot even be inspected */
  assert_int_equal(fs_rmtree(at("plain/sub"), &err), -TS_EIO);
  assert_non_null(strstr(err.msg, "removing"));
  assert_non_null(strstr(err.msg, "plain/sub"));
  assert_int_equal(fs_rmtree(at("plain"), &err), 0);
  if (geteuid() == 0) return; /* root ignores directory permissions */
  mkdir_ok("locked");
  mkdir_ok("locked/sub");
  put("locked/sub/f", "x");
  assert_int_equal(chmod(at("locked/sub"), 0500), 0);
  assert_int_equal(fs_rmtree(at("locked"), &err), -TS_EIO);
  assert_non_null(strstr(err.msg, "removing"));
  assert_non_null(strstr(err.msg, "locked"));
  assert_int_equal(chmod(at("locked/sub"), 0755), 0);
  assert_int_equal(fs_rmtree(at("locked"), &err), 0);
}

/* fs_claim_version's prepare step: a file naming the writer and the number. */
static int write_who(const char *tmp, int64_t version, void *ctx, ts_err *err) {
  char path[PATH_MAX + 16], text[64];
  snprintf(path, sizeof path, "%s/who", tmp);
  int n = snprintf(text, sizeof text, "%d %lld", *(int *)ctx, (long long)version);
  return fs_write_file_sync(path, text, (size_t)n, err);
}

/* Eight processes (replicas on one repository) publish at once, each
 * starting from the same next number: eight distinct complete versions,
 * each naming its own number, none lost, no temporary left. */
static void test_claim_version_race(void **state) {
  (void)state;
  mkdir_ok("race");
  enum { N = 8 };
  pid_t kids[N];
  for (int i = 0; i < N; i++) {
    kids[i] = fork();
    assert_true(kids[i] >= 0);
    if (kids[i] == 0) {
      ts_err e = {0};
      char *tmp;
      int me = i, rc = fs_mkdtemp_in(at("race"), FS_TMP_PREFIX, &tmp, &e);
      int64_t v = 1;
      if (!rc) rc = fs_claim_version(at("race"), tmp, &v, write_who, &me, &e);
      _exit(rc ? 1 : 0);
    }
  }
  for (int i = 0; i < N; i++) {
    int st;
    assert_int_equal(waitpid(kids[i], &st, 0), kids[i]);
    assert_true(WIFEXITED(st) && WEXITSTATUS(st) == 0);
  }
  ts_err err = {0};
  int64_t *v;
  int n;
  assert_int_equal(fs_list_versions(at("race"), &v, &n, &err), 0);
  assert_int_equal(n, N);
  int seen[N] = {0};
  for (int i = 0; i < n; i++) {
    assert_true(v[i] == i + 1);
    char p[64], *txt;
    size_t len;
    snprintf(p, sizeof p, "race/%lld/who", (long long)v[i]);
    assert_int_equal(fs_read_file(at(p), 64, &txt, &len, &err), 0);
    int who;
    long long num;
    assert_int_equal(sscanf(txt, "%d %lld", &who, &num), 2);
    assert_true(num == v[i]); /* the file was written for the number it got */
    assert_true(who >= 0 && who < N && !seen[who]);
    seen[who] = 1;
    tl_free(txt);
  }
  tl_free(v);
  int removed = 0;
  assert_int_equal(fs_clean_tmp(at("race"), &removed, &err), 0);
  assert_int_equal(removed, 0);
}

static void test_publish_version(void **state) {
  (void)state;
  mkdir_ok("model");
  char *tmp;
  ts_err err = {0};
  assert_int_equal(fs_mkdtemp_in(at("model"), FS_TMP_PREFIX, &tmp, &err), 0);
  assert_non_null(strstr(tmp, "/model/.tmp-"));
  char file[PATH_MAX + 64];
  snprintf(file, sizeof file, "%s/weights", tmp);
  assert_int_equal(fs_write_file_sync(file, "v1", 2, &err), 0);
  assert_int_equal(fs_fsync_dir(tmp, &err), 0);
  int64_t *v;
  int n;
  assert_int_equal(fs_list_versions(at("model"), &v, &n, &err), 0);
  assert_int_equal(n, 0); /* not visible before the rename */
  assert_int_equal(fs_rename_atomic(tmp, at("model/1"), &err), 0);
  assert_false(exists(tmp));
  tl_free(tmp);
  assert_int_equal(fs_list_versions(at("model"), &v, &n, &err), 0);
  assert_int_equal(n, 1);
  assert_true(v[0] == 1);
  tl_free(v);
  char *txt;
  size_t len;
  assert_int_equal(fs_read_file(at("model/1/weights"), 100, &txt, &len, &err), 0);
  assert_string_equal(txt, "v1");
  tl_free(txt);

  /* a second write of version 1 cannot replace the published one */
  assert_int_equal(fs_mkdtemp_in(at("model"), FS_TMP_PREFIX, &tmp, &err), 0);
  snprintf(file, sizeof file, "%s/weights", tmp);
  assert_int_equal(fs_write_file_sync(file, "v2", 2, &err), 0);
  assert_int_equal(fs_rename_atomic(tmp, at("model/1"), &err), -TS_ECONFLICT);
  assert_non_null(strstr(err.msg, "model/1"));
  assert_int_equal(fs_read_file(at("model/1/weights"), 100, &txt, &len, &err), 0);
  assert_string_equal(txt, "v1");
  tl_free(txt);
  assert_int_equal(fs_rename_atomic(tmp, at("model/2/"), &err), 0); /* trailing slash */
  tl_free(tmp);

  assert_int_equal(fs_rename_atomic(at("model/none"), at("model/3"), &err), -TS_ENOTFOUND);
  assert_int_equal(fs_mkdtemp_in(at("nodir"), FS_TMP_PREFIX, &tmp, &err), -TS_ENOTFOUND);
  assert_non_null(strstr(err.msg, "nodir"));
  assert_int_equal(fs_fsync_dir(at("nodir"), &err), -TS_ENOTFOUND);
  assert_int_equal(fs_write_file_sync(at("nodir/f"), "x", 1, &err), -TS_ENOTFOUND);
  tl_mem_fail_after(0);
  assert_int_equal(fs_mkdtemp_in(at("model"), FS_TMP_PREFIX, &tmp, &err), -TS_ENOMEM);
  assert_int_equal(fs_rename_atomic(at("model/2"), at("model/3"), &err), -TS_ENOMEM);
  tl_mem_fail_reset();
  assert_true(exists(at("model/2"))); /* nothing was renamed without its fsync */

  /* relative names: the parent is the current directory */
  char cwd[PATH_MAX];
  assert_non_null(getcwd(cwd, sizeof cwd));
  assert_int_equal(chdir(at("model")), 0);
  assert_int_equal(fs_rename_atomic("2", "3", &err), 0);
  assert_int_equal(chdir(cwd), 0);
  assert_true(exists(at("model/3/weights")));
  assert_int_equal(fs_rmtree(at("model"), &err), 0);
}

static void test_clean_tmp(void **state) {
  (void)state;
  mkdir_ok("c");
  mkdir_ok("c/.tmp-a");
  mkdir_ok("c/.tmp-a/deep");
  put("c/.tmp-a/deep/w", "partial");
  put("c/.tmp-b", "a stray file");
  mkdir_ok("c/1");
  put("c/1/w", "kept");
  mkdir_ok("c/.tmpx");
  put("c/config.json", "{}");
  int removed = -1;
  ts_err err = {0};
  assert_int_equal(fs_clean_tmp(at("c"), &removed, &err), 0);
  assert_int_equal(removed, 2);
  assert_false(exists(at("c/.tmp-a")));
  assert_false(exists(at("c/.tmp-b")));
  assert_true(exists(at("c/1/w")));
  assert_true(exists(at("c/.tmpx")));
  assert_true(exists(at("c/config.json")));
  assert_int_equal(fs_clean_tmp(at("c"), &removed, &err), 0);
  assert_int_equal(removed, 0);
  assert_int_equal(fs_clean_tmp(at("c"), NULL, &err), 0);
  assert_int_equal(fs_clean_tmp(at("gone"), &removed, &err), -TS_ENOTFOUND);
  assert_int_equal(fs_rmtree(at("c"), &err), 0);
}

static void test_read_file(void **state) {
  (void)state;
  ts_err err = {0};
  char *s = (char *)1;
  size_t len = 99;
  put("ten", "0123456789");
  assert_int_equal(fs_read_file(at("ten"), 10, &s, &len, &err), 0);
  assert_int_equal(len, 10);
  assert_string_equal(s, "0123456789");
  tl_free(s);
  assert_int_equal(fs_read_file(at("ten"), 9, &s, &len, &err), -TS_ETOOBIG);
  assert_null(s);
  assert_int_equal(len, 0);
  assert_non_null(strstr(err.msg, "larger than the limit of 9 bytes"));
  assert_int_equal(fs_read_file(at("ten"), 0, &s, &len, &err), -TS_ETOOBIG);

  put("empty", "");
  assert_int_equal(fs_read_file(at("empty"), 0, &s, &len, &err), 0);
  assert_int_equal(len, 0);
  assert_string_equal(s, "");
  tl_free(s);

  /* 5 MB: beyond the size hint, read by growing the buffer */
  size_t big = 5u << 20;
  char *b = malloc(big);
  for (size_t i = 0; i < big; i++) b[i] = (char)('a' + i % 26);
  assert_int_equal(fs_write_file_sync(at("big"), b, big, &err), 0);
  assert_int_equal(fs_read_file(at("big"), SIZE_MAX, &s, &len, &err), 0);
  assert_int_equal(len, big);
  assert_memory_equal(s, b, big);
  tl_free(s);
  assert_int_equal(fs_read_file(at("big"), big - 1, &s, &len, &err), -TS_ETOOBIG);
  free(b);

  /* a file whose size stat cannot tell (proc reports 0) */
  assert_int_equal(fs_read_file("/proc/self/status", 1 << 20, &s, &len, &err), 0);
  assert_true(len > 0);
  assert_int_equal(strlen(s), len);
  assert_non_null(strstr(s, "Name:"));
  tl_free(s);
  assert_int_equal(fs_read_file("/proc/self/status", 16, &s, &len, &err), -TS_ETOOBIG);

  assert_int_equal(fs_read_file(at("missing"), 10, &s, &len, &err), -TS_ENOTFOUND);
  assert_non_null(strstr(err.msg, "missing"));
  tl_mem_fail_after(0);
  assert_int_equal(fs_read_file(at("ten"), 10, &s, &len, &err), -TS_ENOMEM);
  tl_mem_fail_reset();
}

/* ------------------------------------------------------------ hashing */

static const char *H_EMPTY = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
static const char *H_ABC = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
static const char *H_448 = "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1";
static const char *H_MILLION_A = "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0";

static void test_sha256_vectors(void **state) {
  (void)state;
  char hex[HASH_HEX_LEN + 1];
  hash_sha256_buf("", 0, hex);
  assert_string_equal(hex, H_EMPTY);
  hash_sha256_buf("abc", 3, hex);
  assert_string_equal(hex, H_ABC);
  const char *m448 = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
  hash_sha256_buf(m448, strlen(m448), hex);
  assert_string_equal(hex, H_448);

  /* incremental, in uneven pieces, and reused after final */
  hash_ctx *h = hash_sha256_new();
  assert_non_null(h);
  hash_final_hex(h, hex);
  assert_string_equal(hex, H_EMPTY);
  for (size_t i = 0; i < strlen(m448); i += 7)
    hash_update(h, m448 + i, strlen(m448) - i < 7 ? strlen(m448) - i : 7);
  hash_final_hex(h, hex);
  assert_string_equal(hex, H_448);
  hash_update(h, "a", 1);
  hash_update(h, NULL, 0);
  hash_update(h, "bc", 2);
  hash_final_hex(h, hex);
  assert_string_equal(hex, H_ABC);
  hash_free(h);
  hash_free(NULL);
  tl_mem_fail_after(0);
  assert_null(hash_sha256_new());
  tl_mem_fail_reset();
}

static void test_sha256_file(void **state) {
  (void)state;
  char hex[HASH_HEX_LEN + 1];
  ts_err err = {0};
  /* one million 'a': exactly one read chunk */
  size_t n = 1000000;
  char *a = malloc(n);
  memset(a, 'a', n);
  assert_int_equal(fs_write_file_sync(at("million"), a, n, &err), 0);
  assert_int_equal(hash_sha256_file(at("million"), hex, &err), 0);
  assert_string_equal(hex, H_MILLION_A);
  free(a);
  put("abc", "abc");
  assert_int_equal(hash_sha256_file(at("abc"), hex, &err), 0);
  assert_string_equal(hex, H_ABC);
  put("nothing", "");
  assert_int_equal(hash_sha256_file(at("nothing"), hex, &err), 0);
  assert_string_equal(hex, H_EMPTY);

  /* several chunks: streaming agrees with hashing the buffer at once */
  size_t big = (3u << 20) + 7;
  unsigned char *b = malloc(big);
  uint32_t s = 1;
  for (size_t i = 0; i < big; i++) b[i] = (unsigned char)((s = s * 1103515245u + 12345u) >> 24);
  assert_int_equal(fs_write_file_sync(at("big"), b, big, &err), 0);
  char want[HASH_HEX_LEN + 1];
  hash_sha256_buf(b, big, want);
  assert_int_equal(hash_sha256_file(at("big"), hex, &err), 0);
  assert_string_equal(hex, want);
  free(b);

  assert_int_equal(hash_sha256_file(at("absent"), hex, &err), -TS_ENOTFOUND);
  assert_non_null(strstr(err.msg, "absent"));
  assert_int_equal(hash_sha256_file(root, hex, &err), -TS_EINVAL); /* a directory */
  assert_non_null(strstr(err.msg, "directory"));
  tl_mem_fail_after(0);
  assert_int_equal(hash_sha256_file(at("abc"), hex, &err), -TS_ENOMEM);
  tl_mem_fail_reset();
}

/* Only regular files open, and opening never blocks: a FIFO without a
 * writer, a device, a directory, a socket or a loop of links is refused
 * with what it is. */
static void test_open_regular(void **state) {
  (void)state;
  int fd;
  ts_err err = {0};
  put("plain", "x");
  assert_int_equal(fs_open_regular(at("plain"), &fd, &err), 0);
  assert_true(fd >= 0);
  assert_int_equal(fcntl(fd, F_GETFL) & O_NONBLOCK, 0);
  close(fd);
  assert_int_equal(mkfifo(at("fifo"), 0644), 0);
  assert_int_equal(fs_open_regular(at("fifo"), &fd, &err), -TS_EINVAL);
  assert_non_null(strstr(err.msg, "FIFO"));
  assert_int_equal(fd, -1);
  mkdir_ok("dir");
  assert_int_equal(fs_open_regular(at("dir"), &fd, &err), -TS_EINVAL);
  assert_non_null(strstr(err.msg, "directory"));
  assert_int_equal(symlink("/dev/zero", at("zero")), 0);
  assert_int_equal(fs_open_regular(at("zero"), &fd, &err), -TS_EINVAL);
  assert_non_null(strstr(err.msg, "character device"));
  assert_int_equal(symlink("loop_b", at("loop_a")), 0);
  assert_int_equal(symlink("loop_a", at("loop_b")), 0);
  assert_int_equal(fs_open_regular(at("loop_a"), &fd, &err), -TS_EINVAL);
  assert_non_null(strstr(err.msg, "loop"));
  assert_int_equal(fs_open_regular(at("absent"), &fd, &err), -TS_ENOTFOUND);
  int sk = socket(AF_UNIX, SOCK_STREAM, 0);
  struct sockaddr_un sa = {.sun_family = AF_UNIX};
  snprintf(sa.sun_path, sizeof sa.sun_path, "%s", at("sock"));
  assert_true(sk >= 0);
  assert_int_equal(bind(sk, (struct sockaddr *)&sa, sizeof sa), 0);
  assert_int_equal(fs_open_regular(at("sock"), &fd, &err), -TS_EINVAL);
  assert_non_null(strstr(err.msg, "socket"));
  close(sk);
  /* the readers built on it */
  char *buf;
  size_t len;
  assert_int_equal(fs_read_file(at("fifo"), 1024, &buf, &len, &err), -TS_EINVAL);
  assert_null(buf);
  char hex[HASH_HEX_LEN + 1];
  assert_int_equal(hash_sha256_file(at("fifo"), hex, &err), -TS_EINVAL);
  assert_int_equal(hash_sha256_file(at("zero"), hex, &err), -TS_EINVAL);
}

/* The one name rule, shared by the repository scan and the router. */
static void test_name_valid(void **st) {
  (void)st;
  char n[FS_NAME_MAX + 2];
  memset(n, 'a', sizeof n);
  n[FS_NAME_MAX] = 0;
  assert_true(fs_name_valid(n)); /* 200 characters */
  n[FS_NAME_MAX] = 'a';
  n[FS_NAME_MAX + 1] = 0;
  assert_false(fs_name_valid(n)); /* 201 */
  assert_true(fs_name_valid("m.x-y_Z9"));
  assert_false(fs_name_valid(""));
  assert_false(fs_name_valid(NULL));
  assert_false(fs_name_valid("."));
  assert_false(fs_name_valid(".."));
  assert_false(fs_name_valid(".tmp-1"));
  assert_false(fs_name_valid("a/b"));
  assert_false(fs_name_valid("a b"));
  assert_false(fs_name_valid("caf\xc3\xa9"));
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_name_valid),      cmocka_unit_test(test_list_versions),
      cmocka_unit_test(test_rmtree),          cmocka_unit_test(test_rmtree_unremovable),
      cmocka_unit_test(test_publish_version), cmocka_unit_test(test_claim_version_race),
      cmocka_unit_test(test_clean_tmp),       cmocka_unit_test(test_read_file),
      cmocka_unit_test(test_sha256_vectors),  cmocka_unit_test(test_sha256_file),
      cmocka_unit_test(test_open_regular),
  };
  return cmocka_run_group_tests(tests, setup, teardown);
}
