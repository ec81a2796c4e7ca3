/* rowlog.c - the served-row log's segments, their reading and the writer
 * thread (the format and invariants are in rowlog.h and docs/learning.md).
 *
 * Why a new segment at every open: a crash can leave the newest segment
 * with a torn record at its end; never appending to it again means a good
 * record is never written after a bad one, so one rule (stop at the first
 * bad record of a segment) reads every crash right. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <zlib.h>

#include "../base/fsutil.h"
#include "../base/log.h"
#include "../base/mem.h"
#include "rowlog.h"

#define RL_ROW_BIT 0x80000000u
#define RL_HDR 8

typedef struct qrec {
  struct qrec *next;
  size_t len;
  int is_row;
  unsigned char data[];
} qrec;

typedef struct seg {
  uint64_t no;
  int64_t rows;
} seg;

struct rl_store {
  char *dir;
  rl_opts o;
  pthread_mutex_t mu;
  pthread_cond_t cv, done_cv;
  qrec *head, *tail;
  size_t qbytes;
  uint64_t seq_appended, seq_synced;
  int flush_wanted, stop;
  pthread_t th;
  int th_started;
  /* the writer's (read under mu for statistics) */
  int fd;
  int lock_fd; /* <dir>/lock, flock'ed: one process logs into a directory */
  seg *segs;   /* oldest first; the last is the one written */
  int nseg, capseg;
  uint64_t next_no; /* no new segment below this number (those found at open) */
  int64_t rows;
  int dirty;
  double last_sync;
  rl_stats st;
};

static double now_mono(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void seg_path(const rl_store *s, uint64_t no, char *buf, size_t n) {
  snprintf(buf, n, "%s/seg-%016llu.log", s->dir, (unsigned long long)no);
}

static int parse_seg_name(const char *name, uint64_t *no) {
  if (strncmp(name, "seg-", 4) != 0 || strlen(name) != 4 + 16 + 4) return 0;
  if (strcmp(name + 20, ".log") != 0) return 0;
  uint64_t v = 0;
  for (int i = 4; i < 20; i++) {
    if (name[i] < '0' || name[i] > '9') return 0;
    v = v * 10 + (uint64_t)(name[i] - '0');
  }
  *no = v;
  return 1;
}

static int cmp_seg(const void *a, const void *b) {
  uint64_t x = ((const seg *)a)->no, y = ((const seg *)b)->no;
  return x < y ? -1 : x > y;
}

static uint32_t rd32(const unsigned char *p) {
  return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static void wr32(unsigned char *p, uint32_t v) {
  p[0] = (unsigned char)v;
  p[1] = (unsigned char)(v >> 8);
  p[2] = (unsigned char)(v >> 16);
  p[3] = (unsigned char)(v >> 24);
}

/* ---- reading -------------------------------------------------------------- */

typedef struct count_ctx {
  rl_replay_fn fn;
  void *data;
  int64_t rows, records;
} count_ctx;

int rl_read_segment(const char *path, rl_replay_fn fn, void *data, int *skipped, ts_err *err) {
  *skipped = 0;
  int fd;
  int rc = fs_open_regular(path, &fd, err);
  if (rc) return rc;
  struct stat st;
  if (fstat(fd, &st) != 0) {
    close(fd);
    return ts_errf(err, TS_EIO, "%s: %s", path, strerror(errno));
  }
  size_t size = (size_t)st.st_size;
  unsigned char *buf = tl_malloc(size ? size : 1);
  if (!buf) {
    close(fd);
    return ts_errf(err, TS_ENOMEM, "out of memory for %s (%zu bytes)", path, size);
  }
  size_t got = 0;
  while (got < size) {
    ssize_t r = read(fd, buf + got, size - got);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) break;
    got += (size_t)r;
  }
  close(fd);
  size_t off = 0;
  if (got < 8 || memcmp(buf, RL_MAGIC, 8) != 0) {
    *skipped = got > 0; /* a segment torn before its magic was written holds nothing */
    tl_free(buf);
    return 0;
  }
  off = 8;
  while (off < got) {
    if (got - off < RL_HDR) {
      *skipped = 1;
      break;
    }
    uint32_t lenf = rd32(buf + off), crc = rd32(buf + off + 4);
    uint32_t len = lenf & ~RL_ROW_BIT;
    if (len == 0 || len > RL_MAX_RECORD || got - off - RL_HDR < len ||
        (uint32_t)crc32(0L, buf + off + RL_HDR, len) != crc) {
      *skipped = 1;
      break;
    }
    if (fn) fn(data, buf + off + RL_HDR, len, (lenf & RL_ROW_BIT) != 0);
    off += RL_HDR + len;
  }
  tl_free(buf);
  return 0;
}

static void count_fn(void *data, const void *payload, size_t len, int is_row) {
  count_ctx *c = data;
  c->records++;
  c->rows += is_row;
  if (c->fn) c->fn(c->data, payload, len, is_row);
}

/* ---- segments (writer thread, or open before it starts) -------------------- */

static int push_seg(rl_store *s, uint64_t no, int64_t rows) {
  if (s->nseg == s->capseg) {
    int cap = s->capseg ? s->capseg * 2 : 16;
    seg *n = tl_realloc(s->segs, sizeof *n * (size_t)cap);
    if (!n) return -1;
    s->segs = n;
    s->capseg = cap;
  }
  s->segs[s->nseg].no = no;
  s->segs[s->nseg].rows = rows;
  s->nseg++;
  return 0;
}

/* Deletes the oldest segments (never the one being written) while the
 * store holds more rows than max_rows. */
static void drop_over_bound(rl_store *s) {
  while (s->nseg > 1 && s->rows > s->o.max_rows) {
    char p[PATH_MAX];
    seg_path(s, s->segs[0].no, p, sizeof p);
    if (unlink(p) != 0 && errno != ENOENT)
      log_warn("row log: cannot delete %s: %s", p, strerror(errno));
    s->rows -= s->segs[0].rows;
    memmove(s->segs, s->segs + 1, sizeof *s->segs * (size_t)(s->nseg - 1));
    s->nseg--;
    s->st.segments_dropped++;
  }
}

static int open_new_segment(rl_store *s, ts_err *err) {
  uint64_t no = s->nseg ? s->segs[s->nseg - 1].no + 1 : 1;
  if (no < s->next_no) no = s->next_no; /* past any segment left unread at open */
  char p[PATH_MAX];
  seg_path(s, no, p, sizeof p);
  int fd = open(p, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_APPEND, 0644);
  if (fd < 0) return ts_errf(err, TS_EIO, "row log: cannot create %s: %s", p, strerror(errno));
  int rc = fs_write_all(fd, RL_MAGIC, 8, p, err);
  if (!rc && fsync(fd) != 0) rc = ts_errf(err, TS_EIO, "row log: fsync %s: %s", p, strerror(errno));
  if (!rc) rc = fs_fsync_dir(s->dir, err);
  if (!rc) {
    pthread_mutex_lock(&s->mu);
    if (push_seg(s, no, 0)) rc = ts_errf(err, TS_ENOMEM, "out of memory");
    pthread_mutex_unlock(&s->mu);
  }
  if (rc) {
    close(fd);
    unlink(p);
    return rc;
  }
  if (s->fd >= 0) close(s->fd);
  s->fd = fd;
  return 0;
}

static void sync_now(rl_store *s) {
  if (s->fd >= 0 && s->dirty) {
    int bad = fdatasync(s->fd) != 0;
    if (bad) log_error("row log %s: fsync: %s", s->dir, strerror(errno));
    pthread_mutex_lock(&s->mu);
    s->st.write_failed |= bad;
    s->st.syncs++;
    pthread_mutex_unlock(&s->mu);
  }
  s->dirty = 0;
  s->last_sync = now_mono();
}

static void write_one(rl_store *s, qrec *q) {
  if (q->is_row && s->segs[s->nseg - 1].rows >= s->o.seg_rows) {
    sync_now(s);
    ts_err err = {0};
    if (open_new_segment(s, &err)) {
      log_error("%s", err.msg);
      pthread_mutex_lock(&s->mu);
      s->st.write_failed = 1;
      pthread_mutex_unlock(&s->mu);
      return;
    }
  }
  if (s->fd < 0) return;
  unsigned char hdr[RL_HDR];
  wr32(hdr, (uint32_t)q->len | (q->is_row ? RL_ROW_BIT : 0));
  wr32(hdr + 4, (uint32_t)crc32(0L, q->data, (uInt)q->len));
  ts_err err = {0};
  /* one write for header and payload, so a crash tears at most this record */
  unsigned char *rec = tl_malloc(RL_HDR + q->len);
  int rc;
  if (rec) {
    memcpy(rec, hdr, RL_HDR);
    memcpy(rec + RL_HDR, q->data, q->len);
    rc = fs_write_all(s->fd, rec, RL_HDR + q->len, "row log", &err);
    tl_free(rec);
  } else {
    rc = fs_write_all(s->fd, hdr, RL_HDR, "row log", &err);
    if (!rc) rc = fs_write_all(s->fd, q->data, q->len, "row log", &err);
  }
  if (rc) {
    log_error("row log %s: %s", s->dir, err.msg);
    pthread_mutex_lock(&s->mu);
    s->st.write_failed = 1;
    pthread_mutex_unlock(&s->mu);
    return;
  }
  s->dirty = 1;
  pthread_mutex_lock(&s->mu); /* rl_get_stats reads these */
  s->st.written++;
  if (q->is_row) {
    s->segs[s->nseg - 1].rows++;
    s->rows++;
    drop_over_bound(s);
  }
  pthread_mutex_unlock(&s->mu);
}

static void *writer_main(void *arg) {
  rl_store *s = arg;
  pthread_mutex_lock(&s->mu);
  for (;;) {
    while (!s->head && !s->stop && !s->flush_wanted &&
           !(s->dirty && now_mono() - s->last_sync >= s->o.sync_interval)) {
      if (s->dirty) {
        double wait = s->o.sync_interval - (now_mono() - s->last_sync);
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        double t = ts.tv_sec + ts.tv_nsec * 1e-9 + (wait > 0 ? wait : 0);
        ts.tv_sec = (time_t)t;
        ts.tv_nsec = (long)((t - (double)ts.tv_sec) * 1e9);
        pthread_cond_timedwait(&s->cv, &s->mu, &ts);
      } else {
        pthread_cond_wait(&s->cv, &s->mu);
      }
    }
    qrec *q = s->head;
    s->head = s->tail = NULL;
    s->qbytes = 0;
    uint64_t upto = s->seq_appended;
    int flush = s->flush_wanted || s->stop;
    s->flush_wanted = 0;
    int stop = s->stop;
    pthread_mutex_unlock(&s->mu);
    while (q) {
      qrec *n = q->next;
      write_one(s, q);
      tl_free(q);
      q = n;
    }
    int synced = 0;
    if (flush || now_mono() - s->last_sync >= s->o.sync_interval) {
      sync_now(s);
      synced = 1;
    }
    pthread_mutex_lock(&s->mu);
    if (synced || !s->dirty) {
      s->seq_synced = upto;
      pthread_cond_broadcast(&s->done_cv);
    }
    if (stop && !s->head) break;
  }
  pthread_mutex_unlock(&s->mu);
  return NULL;
}

/* ---- the public face ------------------------------------------------------ */

int rl_open(rl_store **out, const char *dir, const rl_opts *o, rl_replay_fn fn, void *data,
            ts_err *err) {
  *out = NULL;
  if (!o || o->max_rows < 1) return ts_errf(err, TS_EINVAL, "row log: max_rows must be >= 1");
  if (mkdir(dir, 0755) != 0 && errno != EEXIST)
    return ts_errf(err, TS_EIO, "row log: cannot create %s: %s", dir, strerror(errno));
  rl_store *s = tl_calloc(1, sizeof *s);
  if (!s || !(s->dir = tl_strdup(dir))) {
    tl_free(s);
    return ts_errf(err, TS_ENOMEM, "out of memory");
  }
  s->fd = -1;
  s->lock_fd = -1;
  s->o = *o;
  if (s->o.seg_rows <= 0) s->o.seg_rows = s->o.max_rows / 8 > 0 ? s->o.max_rows / 8 : 1;
  if (s->o.seg_rows > s->o.max_rows) s->o.seg_rows = s->o.max_rows;
  if (s->o.sync_interval <= 0) s->o.sync_interval = 1.0;
  if (s->o.max_queue_bytes == 0) s->o.max_queue_bytes = (size_t)64 << 20;
  pthread_mutex_init(&s->mu, NULL);
  pthread_cond_init(&s->cv, NULL);
  pthread_cond_init(&s->done_cv, NULL);
  int rc = 0;
  char lp[PATH_MAX];
  snprintf(lp, sizeof lp, "%s/lock", dir);
  s->lock_fd = open(lp, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (s->lock_fd < 0) {
    rc = ts_errf(err, TS_EIO, "row log: cannot open %s: %s", lp, strerror(errno));
    goto fail;
  }
  if (flock(s->lock_fd, LOCK_EX | LOCK_NB) != 0) {
    rc = errno == EWOULDBLOCK
             ? ts_errf(err, TS_ECONFLICT,
                       "row log %s is in use by another process (one tallyd logs into a model "
                       "directory: on a repository shared by replicas, one of them logs)",
                       dir)
             : ts_errf(err, TS_EIO, "row log: cannot lock %s: %s", lp, strerror(errno));
    goto fail;
  }
  DIR *d = opendir(dir);
  if (!d) {
    rc = ts_errf(err, TS_EIO, "row log: cannot open %s: %s", dir, strerror(errno));
    goto fail;
  }
  struct dirent *e;
  seg *found = NULL;
  int nf = 0, capf = 0;
  while ((e = readdir(d))) {
    uint64_t no;
    if (!parse_seg_name(e->d_name, &no)) continue;
    if (nf == capf) {
      capf = capf ? capf * 2 : 16;
      seg *n = tl_realloc(found, sizeof *n * (size_t)capf);
      if (!n) {
        tl_free(found);
        closedir(d);
        rc = ts_errf(err, TS_ENOMEM, "out of memory");
        goto fail;
      }
      found = n;
    }
    found[nf].no = no;
    found[nf++].rows = 0;
  }
  closedir(d);
  if (nf) qsort(found, (size_t)nf, sizeof *found, cmp_seg);
  if (nf) s->next_no = found[nf - 1].no + 1;
  for (int i = 0; i < nf; i++) {
    char p[PATH_MAX];
    seg_path(s, found[i].no, p, sizeof p);
    count_ctx c = {.fn = fn, .data = data};
    int skipped = 0;
    ts_err e2 = {0};
    if (rl_read_segment(p, count_fn, &c, &skipped, &e2)) {
      log_warn("row log: %s", e2.msg);
      continue;
    }
    if (skipped) {
      s->st.skipped_records++;
      log_warn("row log: %s ends in a torn or corrupt record; the rest of it is skipped", p);
    }
    if (c.records == 0 && i < nf - 1) { /* nothing in it: not worth keeping */
      unlink(p);
      continue;
    }
    if (push_seg(s, found[i].no, c.rows)) {
      tl_free(found);
      rc = ts_errf(err, TS_ENOMEM, "out of memory");
      goto fail;
    }
    s->rows += c.rows;
  }
  tl_free(found);
  /* the rows over the bound were replayed too: the caller's own bound
   * (the newest first) keeps its index right; here they leave the disk */
  drop_over_bound(s);
  if ((rc = open_new_segment(s, err))) goto fail;
  /* an empty segment left by the previous run (only its magic) goes now */
  if (s->nseg >= 2 && s->segs[s->nseg - 2].rows == 0) {
    char p[PATH_MAX];
    seg_path(s, s->segs[s->nseg - 2].no, p, sizeof p);
    count_ctx c = {0};
    int skipped = 0;
    if (rl_read_segment(p, count_fn, &c, &skipped, NULL) == 0 && c.records == 0) {
      unlink(p);
      s->segs[s->nseg - 2] = s->segs[s->nseg - 1];
      s->nseg--;
    }
  }
  s->last_sync = now_mono();
  if (pthread_create(&s->th, NULL, writer_main, s) != 0) {
    rc = ts_errf(err, TS_ENOMEM, "row log: cannot start the writer thread");
    goto fail;
  }
  s->th_started = 1;
  *out = s;
  return 0;
fail:
  rl_close(s);
  return rc;
}

int rl_append(rl_store *s, const void *payload, size_t len, int is_row, ts_err *err) {
  if (len == 0 || len > RL_MAX_RECORD)
    return ts_errf(err, TS_EINVAL, "row log: a record of %zu bytes (1 to %u)", len,
                   (unsigned)RL_MAX_RECORD);
  pthread_mutex_lock(&s->mu);
  int full = s->qbytes + len > s->o.max_queue_bytes;
  if (full) {
    s->st.dropped_queue++;
    pthread_mutex_unlock(&s->mu);
    return ts_errf(err, TS_EBUSY, "row log: the write queue is full; the record was dropped");
  }
  pthread_mutex_unlock(&s->mu);
  qrec *q = tl_malloc(sizeof *q + len);
  if (!q) return ts_errf(err, TS_ENOMEM, "out of memory");
  q->next = NULL;
  q->len = len;
  q->is_row = is_row;
  memcpy(q->data, payload, len);
  pthread_mutex_lock(&s->mu);
  if (s->tail)
    s->tail->next = q;
  else
    s->head = q;
  s->tail = q;
  s->qbytes += len;
  s->seq_appended++;
  s->st.appended++;
  pthread_cond_signal(&s->cv);
  pthread_mutex_unlock(&s->mu);
  return 0;
}

void rl_flush(rl_store *s) {
  if (!s) return;
  pthread_mutex_lock(&s->mu);
  uint64_t target = s->seq_appended;
  s->flush_wanted = 1;
  pthread_cond_signal(&s->cv);
  while (s->seq_synced < target && s->th_started) pthread_cond_wait(&s->done_cv, &s->mu);
  pthread_mutex_unlock(&s->mu);
}

void rl_get_stats(rl_store *s, rl_stats *out) {
  pthread_mutex_lock(&s->mu);
  *out = s->st;
  out->rows = s->rows;
  out->segments = s->nseg;
  pthread_mutex_unlock(&s->mu);
}

void rl_close(rl_store *s) {
  if (!s) return;
  if (s->th_started) {
    pthread_mutex_lock(&s->mu);
    s->stop = 1;
    pthread_cond_signal(&s->cv);
    pthread_mutex_unlock(&s->mu);
    pthread_join(s->th, NULL);
  }
  for (qrec *q = s->head; q;) {
    qrec *n = q->next;
    tl_free(q);
    q = n;
  }
  if (s->fd >= 0) close(s->fd);
  if (s->lock_fd >= 0) close(s->lock_fd); /* and its flock with it */
  pthread_mutex_destroy(&s->mu);
  pthread_cond_destroy(&s->cv);
  pthread_cond_destroy(&s->done_cv);
  tl_free(s->segs);
  tl_free(s->dir);
  tl_free(s);
}
