/* fitlock.c - a lease lock in a file across processes and hosts (see
 * fitlock.h for the protocol and why takeover is safe). */
#include "fitlock.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "log.h"
#include "mem.h"
#include "randid.h"

#define FL_MAX_BYTES 4096
#define FL_TOKEN_BYTES 12

struct fl_lock {
  char *path;
  int fd;
  dev_t dev;
  ino_t ino;
  char owner[FL_OWNER_MAX], host[FL_HOST_MAX];
  char token[2 * FL_TOKEN_BYTES + 1];
  char pidns[64]; /* /proc/self/ns/pid's link, "" when unknown */
  int64_t lease_ms;
  pthread_t renewer;
  int renewer_started;
  pthread_mutex_t mu; /* guards stop and lost */
  pthread_cond_t cv;
  int stop, lost;
};

int64_t fl_now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* The lock's JSON text for an expiry; NULL when out of memory. */
static char *lock_text(const fl_lock *l, int64_t expires_ms) {
  json_t *o = json_pack("{s:s, s:s, s:I, s:s, s:s, s:I, s:I}", "owner", l->owner, "host", l->host,
                        "pid", (json_int_t)getpid(), "pidns", l->pidns, "token", l->token,
                        "lease_ms", (json_int_t)l->lease_ms, "expires_ms", (json_int_t)expires_ms);
  char *s = o ? json_dumps(o, JSON_COMPACT) : NULL;
  json_decref(o);
  return s;
}

/* Writes the whole text at offset 0 of fd and cuts what follows. */
static int write_at0(int fd, const char *s) {
  size_t n = strlen(s), done = 0;
  while (done < n) {
    ssize_t w = pwrite(fd, s + done, n - done, (off_t)done);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return -1;
    done += (size_t)w;
  }
  return ftruncate(fd, (off_t)n);
}

static void copy_str(char *dst, size_t n, const char *src) {
  snprintf(dst, n, "%s", src ? src : "");
}

/* Parses the contents of a lock; 0 on success. */
static int parse_holder(const char *text, size_t len, fl_holder *h, char *token, size_t token_n) {
  json_error_t je;
  json_t *o = json_loadb(text, len, 0, &je);
  if (!json_is_object(o)) {
    json_decref(o);
    return -1;
  }
  json_t *exp = json_object_get(o, "expires_ms"), *lease = json_object_get(o, "lease_ms");
  int rc = json_is_integer(exp) ? 0 : -1;
  if (!rc) {
    copy_str(h->owner, sizeof h->owner, json_string_value(json_object_get(o, "owner")));
    copy_str(h->host, sizeof h->host, json_string_value(json_object_get(o, "host")));
    copy_str(h->pidns, sizeof h->pidns, json_string_value(json_object_get(o, "pidns")));
    h->pid = json_is_integer(json_object_get(o, "pid"))
                 ? (long long)json_integer_value(json_object_get(o, "pid"))
                 : 0;
    h->expires_ms = json_integer_value(exp);
    h->lease_ms = json_is_integer(lease) ? json_integer_value(lease) : 0;
    if (token) copy_str(token, token_n, json_string_value(json_object_get(o, "token")));
  }
  json_decref(o);
  return rc;
}

/* Reads the lock at path through one descriptor: its holder and the inode
 * and mtime of the very file read. 1: read (h->expires_ms 0 when the
 * contents do not parse), 0: no file, <0: error. */
static int read_lock(const char *path, fl_holder *h, struct stat *st, ts_err *err) {
  memset(h, 0, sizeof *h);
  int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
  if (fd < 0) {
    if (errno == ENOENT) return 0;
    return ts_errf(err, TS_EIO, "fit lock %s: %s", path, strerror(errno));
  }
  char buf[FL_MAX_BYTES];
  size_t n = 0;
  int rc = 1;
  if (fstat(fd, st) != 0) {
    rc = ts_errf(err, TS_EIO, "fit lock %s: %s", path, strerror(errno));
  } else {
    while (n < sizeof buf) {
      ssize_t r = read(fd, buf + n, sizeof buf - n);
      if (r < 0 && errno == EINTR) continue;
      if (r <= 0) break;
      n += (size_t)r;
    }
    if (n == 0 || n == sizeof buf || parse_holder(buf, n, h, NULL, 0) != 0) h->expires_ms = 0;
  }
  close(fd);
  return rc;
}

int fl_read(const char *path, fl_holder *h, ts_err *err) {
  struct stat st;
  return read_lock(path, h, &st, err);
}

/* When a lock read as h (from a file with status st) stops being live. A
 * file whose contents do not parse counts from its mtime with our lease. */
static int64_t expiry_of(const fl_holder *h, const struct stat *st, int64_t lease_ms) {
  if (h->expires_ms > 0) return h->expires_ms;
  return (int64_t)st->st_mtim.tv_sec * 1000 + st->st_mtim.tv_nsec / 1000000 + lease_ms;
}

/* Removes the stale lock read as (dev, ino) if that file is still the one
 * at path. 0 when the path is free (or was freed by someone else) and the
 * caller may try O_EXCL again. */
static int take_over(fl_lock *l, const struct stat *stale, const fl_holder *h, ts_err *err) {
  char aside[PATH_MAX];
  snprintf(aside, sizeof aside, "%s.stale-%s", l->path, l->token);
  if (rename(l->path, aside) != 0) {
    if (errno == ENOENT) return 0; /* another taker removed it first */
    return ts_errf(err, TS_EIO, "fit lock %s: taking over a stale lock: %s", l->path,
                   strerror(errno));
  }
  struct stat st;
  if (lstat(aside, &st) == 0 && st.st_dev == stale->st_dev && st.st_ino == stale->st_ino) {
    unlink(aside);
    int64_t ago = fl_now_ms() - expiry_of(h, stale, l->lease_ms);
    if (!h->owner[0])
      log_warn("fit lock %s: took over an unreadable lock unchanged for over a lease", l->path);
    else if (ago < 0)
      log_warn(
          "fit lock %s: took over the lock of this replica's previous process (pid %lld, "
          "gone)",
          l->path, h->pid);
    else
      log_warn(
          "fit lock %s: took over a stale lock of replica '%s' (host %s, pid %lld), "
          "expired %lld ms ago",
          l->path, h->owner, h->host, h->pid, (long long)ago);
    return 0;
  }
  /* We moved a fresh lock that another taker had just made: put it back
   * (link never replaces; if a third one got in meanwhile, the displaced
   * holder sees at its next renewal that the lock is no longer its own). */
  if (link(aside, l->path) != 0 && errno != EEXIST)
    log_warn("fit lock %s: could not restore a live lock: %s", l->path, strerror(errno));
  unlink(aside);
  return 0;
}

/* The holder is this very replica's previous process (same owner, host and
 * pid namespace) and that process is gone: a restart after a crash need not
 * wait out its own lease. Anything less certain waits for the expiry. */
static int own_dead_predecessor(const fl_lock *l, const fl_holder *h) {
  if (!l->pidns[0] || h->pid <= 0 || h->pid == (long long)getpid()) return 0;
  if (strcmp(h->owner, l->owner) != 0 || strcmp(h->host, l->host) != 0 ||
      strcmp(h->pidns, l->pidns) != 0)
    return 0;
  return kill((pid_t)h->pid, 0) != 0 && errno == ESRCH;
}

static void *renew_main(void *arg) {
  fl_lock *l = arg;
  int64_t period = l->lease_ms / 3 > 0 ? l->lease_ms / 3 : 1;
  int first = 1;
  pthread_mutex_lock(&l->mu);
  while (!l->stop && !l->lost) {
    if (!first) {
      struct timespec ts;
      clock_gettime(CLOCK_MONOTONIC, &ts);
      ts.tv_sec += period / 1000;
      ts.tv_nsec += (period % 1000) * 1000000;
      if (ts.tv_nsec >= 1000000000) ts.tv_sec++, ts.tv_nsec -= 1000000000;
      int w = 0;
      while (!l->stop && w != ETIMEDOUT) w = pthread_cond_timedwait(&l->cv, &l->mu, &ts);
      if (l->stop) break;
    }
    pthread_mutex_unlock(&l->mu);
    /* off the mutex: file steps may be slow (NFS) */
    struct stat st;
    int ours = lstat(l->path, &st) == 0 && st.st_dev == l->dev && st.st_ino == l->ino;
    int ok = 0;
    if (ours) {
      char *text = lock_text(l, fl_now_ms() + l->lease_ms);
      ok = text && write_at0(l->fd, text) == 0 && fdatasync(l->fd) == 0;
      free(text);
      if (!ok) log_warn("fit lock %s: renewal failed: %s", l->path, strerror(errno));
    }
    pthread_mutex_lock(&l->mu);
    if (!ours) {
      l->lost = 1;
      log_warn("fit lock %s: lost (another replica took it over after our lease ran out)", l->path);
    }
    first = 0;
  }
  pthread_mutex_unlock(&l->mu);
  return NULL;
}

static void lock_free(fl_lock *l) {
  if (!l) return;
  if (l->fd >= 0) close(l->fd);
  pthread_cond_destroy(&l->cv);
  pthread_mutex_destroy(&l->mu);
  tl_free(l->path);
  tl_free(l);
}

int fl_acquire(const char *path, const char *owner, int64_t lease_ms, fl_lock **out,
               fl_holder *holder, ts_err *err) {
  *out = NULL;
  if (lease_ms < 100)
    return ts_errf(err, TS_EINVAL, "fit lock lease of %lld ms: below 100 ms", (long long)lease_ms);
  fl_lock *l = tl_calloc(1, sizeof *l);
  if (!l || !(l->path = tl_strdup(path))) {
    tl_free(l);
    return ts_errf(err, TS_ENOMEM, "out of memory");
  }
  l->fd = -1;
  l->lease_ms = lease_ms;
  pthread_mutex_init(&l->mu, NULL);
  pthread_condattr_t ca;
  pthread_condattr_init(&ca);
  pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
  pthread_cond_init(&l->cv, &ca);
  pthread_condattr_destroy(&ca);
  copy_str(l->owner, sizeof l->owner, owner);
  if (gethostname(l->host, sizeof l->host) != 0) copy_str(l->host, sizeof l->host, "unknown");
  l->host[sizeof l->host - 1] = 0;
  ssize_t nl = readlink("/proc/self/ns/pid", l->pidns, sizeof l->pidns - 1);
  l->pidns[nl > 0 ? nl : 0] = 0;
  int rc = rid_make(l->token, sizeof l->token, FL_TOKEN_BYTES, RID_HEX, 0, err);
  if (rc) goto fail;
  /* A few rounds: each lost race either finds a live lock (409) or a path
   * freed by a takeover. */
  for (int round = 0; round < 8; round++) {
    int fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0644);
    if (fd >= 0) {
      struct stat st;
      char *text = lock_text(l, fl_now_ms() + lease_ms);
      if (!text || write_at0(fd, text) != 0 || fstat(fd, &st) != 0) {
        int e = errno;
        free(text);
        close(fd);
        unlink(path);
        rc = text ? ts_errf(err, TS_EIO, "fit lock %s: %s", path, strerror(e))
                  : ts_errf(err, TS_ENOMEM, "out of memory");
        goto fail;
      }
      free(text);
      l->fd = fd;
      l->dev = st.st_dev;
      l->ino = st.st_ino;
      /* the renewer's first step makes the contents durable (fdatasync)
       * off the caller's thread */
      if (pthread_create(&l->renewer, NULL, renew_main, l) != 0) {
        unlink(path);
        rc = ts_errf(err, TS_ENOMEM, "fit lock %s: no thread to renew it", path);
        goto fail;
      }
      l->renewer_started = 1;
      *out = l;
      return 0;
    }
    if (errno != EEXIST) {
      rc = ts_errf(err, TS_EIO, "fit lock %s: %s", path, strerror(errno));
      goto fail;
    }
    fl_holder h;
    struct stat st;
    rc = read_lock(path, &h, &st, err);
    if (rc < 0) goto fail;
    if (rc == 0) continue; /* released meanwhile */
    int64_t now = fl_now_ms(), exp = expiry_of(&h, &st, lease_ms);
    if (exp > now && !own_dead_predecessor(l, &h)) {
      if (holder) *holder = h;
      if (h.expires_ms > 0)
        rc = ts_errf(err, TS_ECONFLICT,
                     "held by replica '%s' (host %s, pid %lld); its lease expires in %.1f s "
                     "unless renewed",
                     h.owner, h.host, h.pid, (double)(exp - now) / 1000.0);
      else
        rc = ts_errf(err, TS_ECONFLICT,
                     "held (its lock file is being written or cannot be read; it counts as "
                     "stale %.1f s after its last change)",
                     (double)(exp - now) / 1000.0);
      goto fail;
    }
    if ((rc = take_over(l, &st, &h, err)) != 0) goto fail;
  }
  rc = ts_errf(err, TS_ECONFLICT, "fit lock %s: contended (taken and released repeatedly)", path);
fail:
  lock_free(l);
  return rc;
}

int fl_lost(fl_lock *l) {
  pthread_mutex_lock(&l->mu);
  int lost = l->lost;
  pthread_mutex_unlock(&l->mu);
  return lost;
}

void fl_release(fl_lock *l) {
  if (!l) return;
  pthread_mutex_lock(&l->mu);
  l->stop = 1;
  pthread_cond_signal(&l->cv);
  pthread_mutex_unlock(&l->mu);
  if (l->renewer_started) pthread_join(l->renewer, NULL);
  struct stat st;
  if (!l->lost && lstat(l->path, &st) == 0 && st.st_dev == l->dev && st.st_ino == l->ino)
    unlink(l->path);
  lock_free(l);
}
