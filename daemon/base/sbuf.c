/* sbuf.c - growable buffer (see sbuf.h). */
#include "sbuf.h"

#include <math.h>
#include <stdint.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mem.h"

void sbuf_init(sbuf *b) {
  memset(b, 0, sizeof *b);
}

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

void sbuf_adds(sbuf *b, const char *s) {
  sbuf_add(b, s, strlen(s));
}

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

/* Writes p significant digits of `digits` (an integer with exactly p
 * digits) times 10^e10 (e10: the decimal exponent of the first digit) in the
 * style of printf's %g, trailing zeros removed. */
static void put_digits(sbuf *b, int neg, uint64_t digits, int p, int e10) {
  char d[24], out[40];
  for (int i = p - 1; i >= 0; i--) {
    d[i] = (char)('0' + digits % 10);
    digits /= 10;
  }
  while (p > 1 && d[p - 1] == '0') p--;
  int o = 0;
  if (neg) out[o++] = '-';
  if (e10 < -4 || e10 >= 9) { /* d.ddde±XX */
    out[o++] = d[0];
    if (p > 1) {
      out[o++] = '.';
      for (int i = 1; i < p; i++) out[o++] = d[i];
    }
    o += snprintf(out + o, sizeof out - (size_t)o, "e%c%02d", e10 < 0 ? '-' : '+', abs(e10));
  } else if (e10 < 0) { /* 0.000ddd */
    out[o++] = '0';
    out[o++] = '.';
    for (int i = -1; i > e10; i--) out[o++] = '0';
    for (int i = 0; i < p; i++) out[o++] = d[i];
  } else { /* ddd.ddd */
    for (int i = 0; i <= e10; i++) out[o++] = i < p ? d[i] : '0';
    if (p > e10 + 1) {
      out[o++] = '.';
      for (int i = e10 + 1; i < p; i++) out[o++] = d[i];
    }
  }
  sbuf_add(b, out, (size_t)o);
}

/* Shortest text (6 to 9 significant digits) that reads back to the same
 * float. Candidates are checked in double arithmetic, which is exact enough
 * for 9 digits; 9 digits always round-trip, and that last case goes through
 * snprintf so it is exact. Response bodies of large float tensors spend
 * most of their time here, so it avoids snprintf/strtof per candidate. */
void sbuf_f32(sbuf *b, float v) {
  if (!isfinite(v)) {
    sbuf_add(b, "null", 4);
    return;
  }
  if (v == 0.0f) {
    sbuf_add(b, signbit(v) ? "-0" : "0", signbit(v) ? 2 : 1);
    return;
  }
  static double pow10[700];
  static int init;
  if (!init) { /* benign race: every thread writes the same values */
    for (int i = 0; i < 700; i++) pow10[i] = pow(10.0, i - 350);
    init = 1;
  }
  double a = fabs((double)v);
  int e10 = (int)floor(log10(a));
  for (int p = 6; p <= 8; p++) {
    int sh = p - 1 - e10;
    if (sh < -300 || sh > 300) break;
    double scaled = nearbyint(a * pow10[sh + 350]);
    int e = e10;
    if (scaled >= pow10[p + 350]) { /* rounding carried into a new digit */
      scaled /= 10;
      e++;
    }
    if ((float)(scaled * pow10[350 - (p - 1 - e)]) == (float)a) {
      put_digits(b, v < 0, (uint64_t)scaled, p, e);
      return;
    }
  }
  char t[32];
  int n = snprintf(t, sizeof t, "%.9g", (double)v);
  sbuf_add(b, t, (size_t)n);
}

void sbuf_f64(sbuf *b, double v) {
  if (!isfinite(v)) {
    sbuf_add(b, "null", 4);
    return;
  }
  char t[40];
  int n = 0;
  for (int p = 15; p <= 17; p++) { /* the first precision that reads back exactly */
    n = snprintf(t, sizeof t, "%.*g", p, v);
    if (strtod(t, NULL) == v) break;
  }
  sbuf_add(b, t, (size_t)n);
}

int sbuf_failed(const sbuf *b) {
  return b->failed;
}

char *sbuf_take(sbuf *b, size_t *len) {
  if (sbuf_reserve(b, 0)) return NULL;
  char *d = b->data;
  if (len) *len = b->len;
  memset(b, 0, sizeof *b);
  return d;
}
