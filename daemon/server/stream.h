/* stream.h - an answer whose body is produced while it is sent: the
 * server-sent events of a streamed generation.
 *
 * A producer thread (the generation engine's) appends bytes and finally
 * closes the stream; the loop thread hands the bytes to libmicrohttpd as a
 * chunked body. When the producer has nothing yet, the connection is
 * suspended (no busy polling) and resumed by a wake through the server's
 * done_async. When the client goes away, or the daemon stops, on_gone is
 * called once so that the producer stops within one step.
 *
 * References: the producer's (dropped by stream_close) and the transport's
 * (dropped when libmicrohttpd destroys the response, or by resp_free when
 * the answer never reached it). The last one frees. */
#ifndef TALLYD_STREAM_H
#define TALLYD_STREAM_H

#include <pthread.h>
#include <stddef.h>
#include <sys/types.h>

#include "../base/sbuf.h"

struct server;

typedef struct gstream {
  pthread_mutex_t mu;
  int refs;
  sbuf pending; /* bytes not yet handed to libmicrohttpd (under mu) */
  size_t off;   /* of pending, already handed */
  int closed;   /* the producer has written its last byte (under mu) */
  int gone;     /* the client or the daemon ended it (under mu) */
  /* loop thread only */
  void *conn; /* struct MHD_Connection *, while the response lives */
  int suspended;
  int attached; /* a libmicrohttpd response holds it */
  struct gstream *live_prev, *live_next;
  /* under the server's done_mu */
  int wake_queued;
  struct gstream *wake_next;
  struct server *srv;
  void (*on_gone)(void *ctx); /* called once, on the loop thread, without mu */
  void *gone_ctx;
} gstream;

/* A stream with two references (producer and transport). NULL: no memory. */
gstream *stream_new(struct server *srv, void (*on_gone)(void *), void *ctx);
/* Producer side: append (ignored after the client left), and close (drops
 * the producer's reference; st must not be used after). Thread-safe. */
void stream_write(gstream *st, const void *data, size_t len);
int stream_gone(gstream *st);
void stream_close(gstream *st);
/* Drops a reference (the transport's, when the answer was never sent). */
void stream_unref(gstream *st);

/* Transport side (http.c, loop thread). */
/* libmicrohttpd's content reader: bytes, 0 after suspending, or -1 at the
 * end. */
ssize_t stream_read(gstream *st, char *buf, size_t max);
/* libmicrohttpd destroyed the response: the client is gone or served. */
void stream_detach(gstream *st);
/* Resumes the connections of streams that were woken (on done_async). */
void stream_wake_all(struct server *s);
/* The daemon stops: every live stream ends now (its connection resumed). */
void stream_stop_all(struct server *s);

#endif
