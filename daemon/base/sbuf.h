/* sbuf.h - a growable byte buffer for building response bodies.
 *
 * Allocation failure is sticky: after one, every append is ignored and
 * sbuf_failed() says so; the caller checks once at the end. */
#ifndef TALLYD_SBUF_H
#define TALLYD_SBUF_H

#include <stddef.h>

typedef struct sbuf {
  char *data;
  size_t len, cap;
  int failed;
} sbuf;

void sbuf_init(sbuf *b);
void sbuf_free(sbuf *b);
int sbuf_reserve(sbuf *b, size_t extra);
void sbuf_add(sbuf *b, const void *p, size_t n);
void sbuf_adds(sbuf *b, const char *s);
void sbuf_printf(sbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Appends s as a JSON string literal, quotes included. */
void sbuf_json_str(sbuf *b, const char *s);
/* Shortest round-trip text of a float / double; NaN and Inf as null. */
void sbuf_f32(sbuf *b, float v);
void sbuf_f64(sbuf *b, double v);
int sbuf_failed(const sbuf *b);
/* Hands the buffer over (NUL-terminated); the sbuf is left empty. */
char *sbuf_take(sbuf *b, size_t *len);

#endif
