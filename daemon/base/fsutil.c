/* fsutil.c - durable writes, atomic renames and safe directory removal for
 * the model repository (see fsutil.h for the publication protocol).
 *
 * Removal walks with openat/unlinkat relative to an open directory handle and
 * AT_SYMLINK_NOFOLLOW, so a symbolic link planted inside a tree being removed
 * can never redirect the removal outside it. */
#include "fsutil.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "mem.h"

static int errno_status(int e) {
  switch (e) {
    case ENOENT: return TS_ENOTFOUND;
    case EEXIST:
    case ENOTEMPTY: return TS_ECONFLICT;
    case ENOMEM: return TS_ENOMEM;
    default: return TS_EIO;
  }
}

static int sys_err(ts_err *err, int e, const char *what, const char *path) {
  return ts_errf(err, errno_status(e), "%s '%s': %s", what, path, strerror(e));
}

int fs_write_all(int fd, const void *data, size_t len, const char *what, ts_err *err) {
  const char *p = data;
  while (len > 0) {
    ssize_t w = write(fd, p, len);
    if (w < 0) {
      if (errno == EINTR) continue;
      return sys_err(err, errno, "cannot write", what);
    }
    p += w;
    len -= (size_t)w;
  }
  return 0;
}

int fs_write_file_sync(const char *path, const void *data, size_t len, ts_err *err) {
  int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return sys_err(err, errno, "cannot create", path);
  int r = fs_write_all(fd, data, len, path, err);
  if (!r && fsync(fd) != 0) r = sys_err(err, errno, "cannot fsync", path);
  if (close(fd) != 0 && !r) r = sys_err(err, errno, "cannot close", path);
  return r;
}

int fs_fsync_dir(const char *path, ts_err *err) {
  int fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return sys_err(err, errno, "cannot open directory", path);
  int r = 0;
  if (fsync(fd) != 0) r = sys_err(err, errno, "cannot fsync directory", path);
  close(fd);
  return r;
}

int fs_mkdtemp_in(const char *dir, const char *prefix, char **out_path, ts_err *err) {
  size_t n = strlen(dir) + 1 + strlen(prefix) + 7;
  char *p = tl_malloc(n);
  if (!p) return ts_errf(err, TS_ENOMEM, "out of memory");
  snprintf(p, n, "%s/%sXXXXXX", dir, prefix);
  if (!mkdtemp(p)) {
    int e = errno;
    tl_free(p);
    return sys_err(err, e, "cannot create a temporary directory in", dir);
  }
  *out_path = p;
  return 0;
}

/* The directory that holds path: "a/b" -> "a", "b" -> ".", "/b" -> "/". */
static char *parent_of(const char *path) {
  size_t n = strlen(path);
  while (n > 1 && path[n - 1] == '/') n--; /* "a/b/" names b too */
  while (n > 0 && path[n - 1] != '/') n--;
  while (n > 1 && path[n - 1] == '/') n--;
  if (n == 0) return tl_strdup(".");
  char *p = tl_malloc(n + 1);
  if (p) {
    memcpy(p, path, n);
    p[n] = '\0';
  }
  return p;
}

int fs_rename_atomic(const char *from, const char *to, ts_err *err) {
  char *pto = parent_of(to), *pfrom = parent_of(from);
  int r = 0;
  if (!pto || !pfrom) {
    r = ts_errf(err, TS_ENOMEM, "out of memory");
    goto out;
  }
  if (rename(from, to) != 0) {
    int e = errno;
    r = ts_errf(err, errno_status(e), "cannot rename '%s' to '%s': %s", from, to, strerror(e));
    goto out;
  }
  r = fs_fsync_dir(pto, err);
  if (!r && strcmp(pto, pfrom) != 0) r = fs_fsync_dir(pfrom, err);
out:
  tl_free(pto);
  tl_free(pfrom);
  return r;
}

int fs_claim_version(const char *model_dir, const char *tmp, int64_t *version,
                     fs_prepare_fn prepare, void *ctx, ts_err *err) {
  char to[PATH_MAX];
  for (int attempt = 0; attempt < 64; attempt++, (*version)++) {
    if (*version < 1 || *version > FS_MAX_VERSION)
      return ts_errf(err, TS_ECONFLICT, "no version number is left after %lld",
                     (long long)(*version - 1));
    int rc = prepare ? prepare(tmp, *version, ctx, err) : 0;
    if (rc) return rc;
    int n = snprintf(to, sizeof to, "%s/%lld", model_dir, (long long)*version);
    if (n < 0 || (size_t)n >= sizeof to) return ts_errf(err, TS_EINVAL, "path too long");
    int r = renameat2(AT_FDCWD, tmp, AT_FDCWD, to, RENAME_NOREPLACE);
    if (r != 0 && (errno == EINVAL || errno == ENOSYS)) r = rename(tmp, to);
    if (r == 0) return fs_fsync_dir(model_dir, err);
    int e = errno;
    if (e != EEXIST && e != ENOTEMPTY)
      return ts_errf(err, errno_status(e), "cannot rename '%s' to '%s': %s", tmp, to, strerror(e));
    /* taken by another writer: try the next number */
  }
  return ts_errf(err, TS_ECONFLICT,
                 "64 version numbers in a row were taken by other writers; try again");
}

/* Removes `name` inside the open directory dirfd (AT_FDCWD for a path). */
static int rm_at(int dirfd, const char *name, ts_err *err) {
  struct stat st;
  if (fstatat(dirfd, name, &st, AT_SYMLINK_NOFOLLOW) != 0)
    return errno == ENOENT ? 0 : sys_err(err, errno, "cannot inspect", name);
  if (!S_ISDIR(st.st_mode)) {
    if (unlinkat(dirfd, name, 0) != 0 && errno != ENOENT)
      return sys_err(err, errno, "cannot remove", name);
    return 0;
  }
  int fd = openat(dirfd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
  if (fd < 0) return sys_err(err, errno, "cannot open directory", name);
  DIR *d = fdopendir(fd);
  if (!d) {
    int e = errno;
    close(fd);
    return sys_err(err, e, "cannot read directory", name);
  }
  int r = 0;
  struct dirent *de;
  while (!r && (errno = 0, de = readdir(d)) != NULL) {
    if (strcmp(de->d_name, ".") == 0 || strcmp(de->d_name, "..") == 0) continue;
    r = rm_at(fd, de->d_name, err);
  }
  if (!r && errno != 0) r = sys_err(err, errno, "cannot read directory", name);
  closedir(d);
  if (!r && unlinkat(dirfd, name, AT_REMOVEDIR) != 0 && errno != ENOENT)
    r = sys_err(err, errno, "cannot remove directory", name);
  return r;
}

int fs_rmtree(const char *path, ts_err *err) {
  int r = rm_at(AT_FDCWD, path, err);
  if (r) ts_err_prefix(err, "removing '%s'", path);
  return r;
}

int fs_parse_version(const char *s, int64_t *out) {
  if (s[0] < '1' || s[0] > '9') return 0;
  int64_t v = 0;
  int over = 0;
  for (const char *p = s; *p; p++) {
    if (*p < '0' || *p > '9') return 0;
    int d = *p - '0';
    if (over || v > (FS_MAX_VERSION - d) / 10)
      over = 1; /* keep checking the digits */
    else
      v = v * 10 + d;
  }
  if (over) return -1;
  *out = v;
  return 1;
}

static int cmp_i64(const void *a, const void *b) {
  int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
  return (x > y) - (x < y);
}

int fs_list_versions(const char *model_dir, int64_t **versions, int *n, ts_err *err) {
  *versions = NULL;
  *n = 0;
  DIR *d = opendir(model_dir);
  if (!d) return sys_err(err, errno, "cannot open model directory", model_dir);
  int64_t *v = NULL;
  int cnt = 0, cap = 0, r = 0;
  struct dirent *de;
  while ((errno = 0, de = readdir(d)) != NULL) {
    int64_t ver;
    struct stat st;
    int pv = fs_parse_version(de->d_name, &ver);
    if (!pv) continue;
    if (fstatat(dirfd(d), de->d_name, &st, 0) != 0 || !S_ISDIR(st.st_mode)) continue;
    if (pv < 0) {
      r = ts_errf(err, TS_EINVAL,
                  "version directory '%.40s' is over the largest version %lld (rename it)",
                  de->d_name, (long long)FS_MAX_VERSION);
      errno = 0;
      break;
    }
    if (cnt == cap) {
      int nc = cap ? cap * 2 : 8;
      int64_t *p = tl_realloc(v, sizeof *v * (size_t)nc);
      if (!p) {
        r = ts_errf(err, TS_ENOMEM, "out of memory listing '%s'", model_dir);
        break;
      }
      v = p;
      cap = nc;
    }
    v[cnt++] = ver;
  }
  if (!r && errno != 0) r = sys_err(err, errno, "cannot read model directory", model_dir);
  closedir(d);
  if (r) {
    tl_free(v);
    return r;
  }
  if (cnt > 1) qsort(v, (size_t)cnt, sizeof *v, cmp_i64);
  *versions = v;
  *n = cnt;
  return 0;
}

int fs_clean_tmp(const char *model_dir, int *n_removed, ts_err *err) {
  if (n_removed) *n_removed = 0;
  int dfd = open(model_dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd < 0) return sys_err(err, errno, "cannot open model directory", model_dir);
  DIR *d = fdopendir(dfd);
  if (!d) {
    int e = errno;
    close(dfd);
    return sys_err(err, e, "cannot read model directory", model_dir);
  }
  int r = 0, cnt = 0;
  size_t plen = strlen(FS_TMP_PREFIX);
  struct dirent *de;
  while (!r && (errno = 0, de = readdir(d)) != NULL) {
    if (strncmp(de->d_name, FS_TMP_PREFIX, plen) != 0) continue;
    r = rm_at(dfd, de->d_name, err);
    if (!r) cnt++;
  }
  if (!r && errno != 0) r = sys_err(err, errno, "cannot read model directory", model_dir);
  closedir(d);
  if (r) {
    ts_err_prefix(err, "cleaning '%s'", model_dir);
    return r;
  }
  if (cnt > 0 && (r = fs_fsync_dir(model_dir, err))) return r;
  if (n_removed) *n_removed = cnt;
  return 0;
}

const char *fs_type_name(unsigned mode) {
  if (S_ISREG(mode)) return "regular file";
  if (S_ISDIR(mode)) return "directory";
  if (S_ISFIFO(mode)) return "FIFO";
  if (S_ISCHR(mode)) return "character device";
  if (S_ISBLK(mode)) return "block device";
  if (S_ISSOCK(mode)) return "socket";
  if (S_ISLNK(mode)) return "symbolic link";
  return "special file";
}

int fs_open_regular(const char *path, int *fd_out, ts_err *err) {
  *fd_out = -1;
  /* O_NONBLOCK: opening a FIFO for reading would wait for a writer (for
   * ever, with the repository's lock held); a regular file ignores it */
  int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
  if (fd < 0) {
    int e = errno;
    struct stat st;
    if (e == ELOOP)
      return ts_errf(err, TS_EINVAL, "cannot open '%s': a loop of symbolic links", path);
    /* a socket (ENXIO) or a device without a driver: say what it is */
    if ((e == ENXIO || e == ENODEV) && stat(path, &st) == 0 && !S_ISREG(st.st_mode))
      return ts_errf(err, TS_EINVAL, "'%s' is a %s, not a regular file", path,
                     fs_type_name(st.st_mode));
    return sys_err(err, e, "cannot open", path);
  }
  struct stat st;
  if (fstat(fd, &st) != 0) {
    int e = errno;
    close(fd);
    return sys_err(err, e, "cannot stat", path);
  }
  if (!S_ISREG(st.st_mode)) {
    close(fd);
    return ts_errf(err, TS_EINVAL, "'%s' is a %s, not a regular file", path,
                   fs_type_name(st.st_mode));
  }
  /* reads of a regular file never block; clear the flag all the same */
  int fl = fcntl(fd, F_GETFL);
  if (fl >= 0) fcntl(fd, F_SETFL, fl & ~O_NONBLOCK);
  *fd_out = fd;
  return 0;
}

int fs_read_file(const char *path, size_t max_bytes, char **out, size_t *len, ts_err *err) {
  *out = NULL;
  *len = 0;
  if (max_bytes > SIZE_MAX - 2) max_bytes = SIZE_MAX - 2;
  int fd, r = fs_open_regular(path, &fd, err);
  if (r) return r;
  struct stat st;
  size_t cap = 4096;
  if (fstat(fd, &st) == 0 && S_ISREG(st.st_mode) && (uint64_t)st.st_size < (uint64_t)cap * 1024)
    cap = (size_t)st.st_size + 2; /* room for the NUL and the one byte that proves EOF */
  if (cap > max_bytes + 2) cap = max_bytes + 2;
  char *buf = tl_malloc(cap);
  size_t n = 0;
  if (!buf) {
    r = ts_errf(err, TS_ENOMEM, "out of memory reading '%s'", path);
    goto out;
  }
  for (;;) {
    if (n + 1 == cap) { /* keep one byte for the NUL */
      if (cap == max_bytes + 2) break;
      size_t nc = cap > (max_bytes + 2) / 2 ? max_bytes + 2 : cap * 2;
      char *p = tl_realloc(buf, nc);
      if (!p) {
        r = ts_errf(err, TS_ENOMEM, "out of memory reading '%s'", path);
        goto out;
      }
      buf = p;
      cap = nc;
    }
    ssize_t got = read(fd, buf + n, cap - 1 - n);
    if (got < 0) {
      if (errno == EINTR) continue;
      r = sys_err(err, errno, "cannot read", path);
      goto out;
    }
    if (got == 0) break;
    n += (size_t)got;
  }
  if (n > max_bytes) {
    r = ts_errf(err, TS_ETOOBIG, "file '%s' is larger than the limit of %zu bytes", path,
                max_bytes);
    goto out;
  }
  buf[n] = '\0';
  *out = buf;
  *len = n;
  buf = NULL;
out:
  tl_free(buf);
  close(fd);
  return r;
}

int fs_name_valid(const char *s) {
  if (!s || !*s || s[0] == '.') return 0;
  size_t n = 0;
  for (; *s; s++, n++)
    if (n >= FS_NAME_MAX || !((*s >= 'a' && *s <= 'z') || (*s >= 'A' && *s <= 'Z') ||
                              (*s >= '0' && *s <= '9') || *s == '_' || *s == '-' || *s == '.'))
      return 0;
  return 1;
}
