/* sbuf.c - growable buffer (see sbuf.h). */
#include "sbuf.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mem.h"

void sbuf_init(sbuf *b) { memset(b, 0, sizeof *b); }

void sbuf_free(sbuf *b) {
  tl_free(b->data);
  memset(b, 0, sizeof *b);
}

int sbuf_reserve(sbuf *b, size_t extra) {
  if (b->failed) return -1;
  if (b->len + extra + 1 <= b->cap) return 0;
  size_t nc = b->cap ? b->cap : 256;
  while (nc < b->len + extra + 1) {
    if (nc > ((size_t)-1) / 2) {
      b->failed = 1;
      return -1;
    }
    nc *= 2;
  }
  char *p = tl_realloc(b->data, nc);
  if (!p) {
    b->failed = 1;
    return -1;
  }
  b->data = p;
  b->cap = nc;
  return 0;
}

void sbuf_add(sbuf *b, const void *p, size_t n) {
  if (sbuf_reserve(b, n)) return;
  memcpy(b->data + b->len, p, n);
  b->len += n;
  b->data[b->len] = 0;
}

void sbuf_adds(sbuf *b, const char *s) { sbuf_add(b, s, strlen(s)); }

void sbuf_printf(sbuf *b, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  char tmp[256];
  int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
  va_end(ap);
  if (n < 0) return;
  if ((size_t)n < sizeof tmp) {
    sbuf_add(b, tmp, (size_t)n);
    return;
  }
  if (sbuf_reserve(b, (size_t)n)) return;
  va_start(ap, fmt);
  vsnprintf(b->data + b->len, (size_t)n + 1, fmt, ap);
  va_end(ap);
  b->len += (size_t)n;
}

void sbuf_json_str(sbuf *b, const char *s) {
  static const char hex[] = "0123456789abcdef";
  sbuf_add(b, "\"", 1);
  const char *run = s;
  for (; *s; s++) {
    unsigned char c = (unsigned char)*s;
    if (c >= 0x20 && c != '"' && c != '\\') continue;
    sbuf_add(b, run, (size_t)(s - run));
    char e[6] = {'\\', 'u', '0', '0', hex[c >> 4], hex[c & 15]};
    if (c == '"' || c == '\\') {
      e[1] = (char)c;
      sbuf_add(b, e, 2);
    } else if (c == '\n') {
      sbuf_add(b, "\\n", 2);
    } else {
      sbuf_add(b, e, 6);
    }
    run = s + 1;
  }
  sbuf_add(b, run, (size_t)(s - run));
  sbuf_add(b, "\"", 1);
}

void sbuf_f32(sbuf *b, float v) {
  if (!isfinite(v)) {
    sbuf_add(b, "null", 4);
    return;
  }
  char t[32];
  int n = snprintf(t, sizeof t, "%.9g", (double)v);
  /* prefer the shortest text that reads back to the same float */
  for (int p = 6; p < 9; p++) {
    char s[32];
    int m = snprintf(s, sizeof s, "%.*g", p, (double)v);
    if (strtof(s, NULL) == v) {
      memcpy(t, s, (size_t)m + 1);
      n = m;
      break;
    }
  }
  sbuf_add(b, t, (size_t)n);
}

void sbuf_f64(sbuf *b, double v) {
  if (!isfinite(v)) {
    sbuf_add(b, "null", 4);
    return;
  }
  char t[40];
  int n = snprintf(t, sizeof t, "%.15g", v);
  if (strtod(t, NULL) != v) n = snprintf(t, sizeof t, "%.17g", v);
  sbuf_add(b, t, (size_t)n);
}

int sbuf_failed(const sbuf *b) { return b->failed; }

char *sbuf_take(sbuf *b, size_t *len) {
  if (sbuf_reserve(b, 0)) return NULL;
  char *d = b->data;
  if (len) *len = b->len;
  memset(b, 0, sizeof *b);
  return d;
}
