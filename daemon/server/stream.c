/* stream.c - bodies sent while they are produced (stream.h). */
#include "stream.h"

#include <microhttpd.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#include "../base/mem.h"
#include "server.h"

gstream *stream_new(struct server *srv, void (*on_gone)(void *), void *ctx) {
  gstream *st = tl_calloc(1, sizeof *st);
  if (!st) return NULL;
  if (pthread_mutex_init(&st->mu, NULL)) {
    tl_free(st);
    return NULL;
  }
  st->refs = 2;
  sbuf_init(&st->pending);
  st->srv = srv;
  st->on_gone = on_gone;
  st->gone_ctx = ctx;
  return st;
}

void stream_unref(gstream *st) {
  pthread_mutex_lock(&st->mu);
  int last = --st->refs == 0;
  pthread_mutex_unlock(&st->mu);
  if (!last) return;
  sbuf_free(&st->pending);
  pthread_mutex_destroy(&st->mu);
  tl_free(st);
}

/* Asks the loop thread to resume st's connection. The wake list holds a
 * reference. */
static void wake(gstream *st) {
  server *s = st->srv;
  int queue = 0;
  uv_mutex_lock(&s->done_mu);
  if (!st->wake_queued) {
    st->wake_queued = 1;
    st->wake_next = s->wake_head;
    s->wake_head = st;
    queue = 1;
  }
  uv_mutex_unlock(&s->done_mu);
  if (queue) {
    pthread_mutex_lock(&st->mu);
    st->refs++;
    pthread_mutex_unlock(&st->mu);
  }
  uv_async_send(&s->done_async);
}

void stream_write(gstream *st, const void *data, size_t len) {
  pthread_mutex_lock(&st->mu);
  int gone = st->gone;
  if (!gone) {
    /* what was handed already is dropped before the buffer grows */
    if (st->off && st->off == st->pending.len) st->pending.len = st->off = 0;
    sbuf_add(&st->pending, data, len);
  }
  pthread_mutex_unlock(&st->mu);
  if (!gone) wake(st);
}

int stream_gone(gstream *st) {
  pthread_mutex_lock(&st->mu);
  int g = st->gone;
  pthread_mutex_unlock(&st->mu);
  return g;
}

void stream_close(gstream *st) {
  pthread_mutex_lock(&st->mu);
  st->closed = 1;
  pthread_mutex_unlock(&st->mu);
  wake(st);
  stream_unref(st);
}

ssize_t stream_read(gstream *st, char *buf, size_t max) {
  pthread_mutex_lock(&st->mu);
  if (sbuf_failed(&st->pending)) {
    pthread_mutex_unlock(&st->mu);
    return MHD_CONTENT_READER_END_WITH_ERROR;
  }
  size_t avail = st->pending.len - st->off;
  if (avail) {
    size_t n = avail < max ? avail : max;
    memcpy(buf, st->pending.data + st->off, n);
    st->off += n;
    pthread_mutex_unlock(&st->mu);
    return (ssize_t)n;
  }
  int end = st->closed || st->gone;
  pthread_mutex_unlock(&st->mu);
  if (end) return MHD_CONTENT_READER_END_OF_STREAM;
  /* nothing yet: sleep until the producer wakes us (stream_wake_all) */
  if (!st->suspended && st->conn) {
    st->suspended = 1;
    MHD_suspend_connection(st->conn);
  }
  return 0;
}

static void live_del(gstream *st) {
  server *s = st->srv;
  if (st->live_prev)
    st->live_prev->live_next = st->live_next;
  else if (s->live_streams == st)
    s->live_streams = st->live_next;
  if (st->live_next) st->live_next->live_prev = st->live_prev;
  st->live_prev = st->live_next = NULL;
}

void stream_detach(gstream *st) {
  live_del(st);
  st->conn = NULL;
  st->attached = 0;
  pthread_mutex_lock(&st->mu);
  int was_gone = st->gone, closed = st->closed;
  st->gone = 1;
  pthread_mutex_unlock(&st->mu);
  if (!was_gone && !closed && st->on_gone) st->on_gone(st->gone_ctx);
  stream_unref(st);
}

void stream_wake_all(struct server *s) {
  uv_mutex_lock(&s->done_mu);
  gstream *list = s->wake_head;
  s->wake_head = NULL;
  for (gstream *st = list; st; st = st->wake_next) st->wake_queued = 0;
  uv_mutex_unlock(&s->done_mu);
  while (list) {
    gstream *st = list;
    list = st->wake_next;
    if (st->conn && st->suspended) {
      st->suspended = 0;
      MHD_resume_connection(st->conn);
    }
    stream_unref(st);
  }
}

void stream_stop_all(struct server *s) {
  for (gstream *st = s->live_streams; st; st = st->live_next) {
    pthread_mutex_lock(&st->mu);
    int was_gone = st->gone, closed = st->closed;
    st->gone = 1;
    pthread_mutex_unlock(&st->mu);
    if (!was_gone && !closed && st->on_gone) st->on_gone(st->gone_ctx);
    if (st->conn && st->suspended) {
      st->suspended = 0;
      MHD_resume_connection(st->conn);
    }
  }
}
