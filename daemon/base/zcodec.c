/* zcodec.c - gzip and deflate bodies through zlib (see zcodec.h).
 *
 * Inflating grows its output by doubling, never past cap + 1 bytes: the
 * extra byte is how "more than cap" is seen without inflating the rest. */
#include "zcodec.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <zlib.h>

#include "mem.h"

const char *zc_name(zc_coding c) {
  return c == ZC_GZIP ? "gzip" : c == ZC_DEFLATE ? "deflate" : "identity";
}

/* Trims spaces and tabs around s[0..*n): returns the new start. */
static const char *trim(const char *s, size_t *n) {
  while (*n && (*s == ' ' || *s == '\t')) s++, (*n)--;
  while (*n && (s[*n - 1] == ' ' || s[*n - 1] == '\t')) (*n)--;
  return s;
}

static int token_is(const char *s, size_t n, const char *word) {
  return strlen(word) == n && strncasecmp(s, word, n) == 0;
}

/* The coding a token names; -1 for none of ours. */
static int coding_of(const char *s, size_t n) {
  if (token_is(s, n, "gzip") || token_is(s, n, "x-gzip")) return ZC_GZIP;
  if (token_is(s, n, "deflate")) return ZC_DEFLATE;
  if (token_is(s, n, "identity")) return ZC_IDENTITY;
  return -1;
}

int zc_parse_content_encoding(const char *value, zc_coding *out, ts_err *err) {
  *out = ZC_IDENTITY;
  if (!value) return 0;
  size_t n = strlen(value);
  const char *s = trim(value, &n);
  if (!n) return 0;
  if (memchr(s, ',', n))
    return ts_errf(err, TS_EMEDIA,
                   "Content-Encoding '%.60s': one coding only (gzip, deflate or "
                   "identity), not a list",
                   value);
  int c = coding_of(s, n);
  if (c < 0)
    return ts_errf(err, TS_EMEDIA,
                   "Content-Encoding '%.60s' is not supported (gzip, deflate or "
                   "identity)",
                   value);
  *out = (zc_coding)c;
  return 0;
}

/* q from the parameters of one Accept-Encoding element ("q=0.5"); 1 when
 * absent, -1 when unreadable (the element is then ignored). */
static double qvalue(const char *p, size_t n) {
  double q = 1.0;
  while (n) {
    const char *semi = memchr(p, ';', n);
    size_t len = semi ? (size_t)(semi - p) : n;
    size_t k = len;
    const char *t = trim(p, &k);
    if (k >= 2 && (t[0] == 'q' || t[0] == 'Q') && t[1] == '=') {
      char buf[16];
      if (k - 2 == 0 || k - 2 >= sizeof buf) return -1;
      memcpy(buf, t + 2, k - 2);
      buf[k - 2] = 0;
      char *end;
      q = strtod(buf, &end);
      if (*end || q < 0 || q > 1) return -1;
    }
    if (!semi) break;
    p = semi + 1;
    n -= len + 1;
  }
  return q;
}

zc_coding zc_choose(const char *accept) {
  if (!accept) return ZC_IDENTITY;
  double q[3] = {-1, -1, -1}, star = -1; /* -1: not named */
  const char *p = accept;
  size_t n = strlen(accept);
  while (n) {
    const char *comma = memchr(p, ',', n);
    size_t len = comma ? (size_t)(comma - p) : n;
    const char *semi = memchr(p, ';', len);
    size_t tl = semi ? (size_t)(semi - p) : len;
    const char *t = trim(p, &tl);
    double v = semi ? qvalue(semi + 1, len - (size_t)(semi - p) - 1) : 1.0;
    if (v >= 0) {
      int c = coding_of(t, tl);
      if (c >= 0 && v > q[c])
        q[c] = v; /* "gzip;q=0, x-gzip" : the larger */
      else if (c < 0 && tl == 1 && *t == '*')
        star = v;
    }
    if (!comma) break;
    p = comma + 1;
    n -= len + 1;
  }
  double g = q[ZC_GZIP] >= 0 ? q[ZC_GZIP] : star, d = q[ZC_DEFLATE] >= 0 ? q[ZC_DEFLATE] : star;
  if (g > 0 && g >= d) return ZC_GZIP;
  if (d > 0) return ZC_DEFLATE;
  return ZC_IDENTITY;
}

/* zlib's window bits for a coding: 16+ gzip, + zlib, - raw deflate. */
static int window_bits(zc_coding c, const unsigned char *in, size_t n) {
  if (c == ZC_GZIP) return 15 + 16;
  /* RFC 1950 header: CM 8, and CMF*256+FLG a multiple of 31 */
  int zlib_hdr = n >= 2 && (in[0] & 0x0f) == 8 && (in[0] >> 4) <= 7 &&
                 ((unsigned)in[0] * 256u + in[1]) % 31u == 0;
  return zlib_hdr ? 15 : -15;
}

int zc_inflate(zc_coding c, const void *in, size_t n, size_t cap, char **out, size_t *out_len,
               ts_err *err) {
  *out = NULL;
  *out_len = 0;
  if (c == ZC_IDENTITY) {
    if (n > cap)
      return ts_errf(err, TS_ETOOBIG, "the body (%zu bytes) is larger than the limit of %zu bytes",
                     n, cap);
    char *b = tl_malloc(n + 1);
    if (!b) return ts_errf(err, TS_ENOMEM, "out of memory");
    if (n) memcpy(b, in, n);
    b[n] = 0;
    *out = b;
    *out_len = n;
    return 0;
  }
  const unsigned char *src = in;
  z_stream z;
  memset(&z, 0, sizeof z);
  if (inflateInit2(&z, window_bits(c, src, n)) != Z_OK)
    return ts_errf(err, TS_ENOMEM, "out of memory (zlib)");
  size_t size = n * 4 + 64; /* first guess; doubled as needed, never past cap + 1 */
  if (size > cap + 1) size = cap + 1;
  char *buf = tl_malloc(size + 1);
  int rc = 0;
  size_t have = 0;
  if (!buf) {
    rc = ts_errf(err, TS_ENOMEM, "out of memory");
    goto done;
  }
  /* zlib counts in uInt: feed the input in pieces */
  size_t fed = 0;
  for (;;) {
    if (z.avail_in == 0 && fed < n) {
      size_t k = n - fed > (1u << 30) ? (1u << 30) : n - fed;
      z.next_in = (Bytef *)(src + fed);
      z.avail_in = (uInt)k;
      fed += k;
    }
    if (have == size) {
      if (size == cap + 1) {
        rc = ts_errf(err, TS_ETOOBIG,
                     "the body inflates to more than the limit of %zu bytes "
                     "(--max-body-bytes applies to the inflated size)",
                     cap);
        goto done;
      }
      size_t ns = size * 2 > cap + 1 || size * 2 < size ? cap + 1 : size * 2;
      char *nb = tl_realloc(buf, ns + 1);
      if (!nb) {
        rc = ts_errf(err, TS_ENOMEM, "out of memory inflating the body");
        goto done;
      }
      buf = nb;
      size = ns;
    }
    size_t room = size - have > (1u << 30) ? (1u << 30) : size - have;
    z.next_out = (Bytef *)(buf + have);
    z.avail_out = (uInt)room;
    int zr = inflate(&z, Z_NO_FLUSH);
    have += room - z.avail_out;
    if (have > cap) {
      rc = ts_errf(err, TS_ETOOBIG,
                   "the body inflates to more than the limit of %zu bytes "
                   "(--max-body-bytes applies to the inflated size)",
                   cap);
      goto done;
    }
    if (zr == Z_STREAM_END) {
      /* gzip members may follow one another; nothing else may follow */
      size_t left = z.avail_in + (n - fed);
      if (!left) break;
      const unsigned char *next = z.next_in;
      if (c == ZC_GZIP && z.avail_in >= 2 && next[0] == 0x1f && next[1] == 0x8b) {
        inflateReset(&z);
        continue;
      }
      rc = ts_errf(err, TS_EINVAL,
                   "Content-Encoding %s: %zu bytes after the end of the "
                   "compressed stream",
                   zc_name(c), left);
      goto done;
    }
    if (zr == Z_BUF_ERROR && z.avail_in == 0 && fed == n) {
      rc = ts_errf(err, TS_EINVAL, "Content-Encoding %s: the compressed body is truncated",
                   zc_name(c));
      goto done;
    }
    if (zr == Z_MEM_ERROR) {
      rc = ts_errf(err, TS_ENOMEM, "out of memory (zlib)");
      goto done;
    }
    if (zr != Z_OK && zr != Z_BUF_ERROR) {
      rc = ts_errf(err, TS_EINVAL, "Content-Encoding %s: the body is not a valid %s stream (%s)",
                   zc_name(c), c == ZC_GZIP ? "gzip" : "zlib/deflate",
                   z.msg ? z.msg : "corrupt data");
      goto done;
    }
  }
  buf[have] = 0;
  *out = buf;
  *out_len = have;
  buf = NULL;
done:
  inflateEnd(&z);
  tl_free(buf);
  return rc;
}

int zc_compress(zc_coding c, const void *in, size_t n, int level, char **out, size_t *out_len,
                ts_err *err) {
  *out = NULL;
  *out_len = 0;
  if (c != ZC_GZIP && c != ZC_DEFLATE)
    return ts_errf(err, TS_EINVAL, "zc_compress: coding %s is not a compression", zc_name(c));
  if (n > (size_t)UINT32_MAX / 2)
    return ts_errf(err, TS_ETOOBIG, "an answer of %zu bytes is too large to compress", n);
  z_stream z;
  memset(&z, 0, sizeof z);
  if (deflateInit2(&z, level > 0 && level <= 9 ? level : Z_DEFAULT_COMPRESSION, Z_DEFLATED,
                   c == ZC_GZIP ? 15 + 16 : 15, 8, Z_DEFAULT_STRATEGY) != Z_OK)
    return ts_errf(err, TS_ENOMEM, "out of memory (zlib)");
  /* deflateBound holds the zlib wrapper; a gzip one is 12 bytes longer */
  size_t size = (size_t)deflateBound(&z, (uLong)n) + 32;
  char *buf = tl_malloc(size);
  if (!buf) {
    deflateEnd(&z);
    return ts_errf(err, TS_ENOMEM, "out of memory");
  }
  z.next_in = (Bytef *)in;
  z.avail_in = (uInt)n;
  z.next_out = (Bytef *)buf;
  z.avail_out = (uInt)size;
  int zr = deflate(&z, Z_FINISH);
  size_t have = size - z.avail_out;
  deflateEnd(&z);
  if (zr != Z_STREAM_END) {
    tl_free(buf);
    return ts_errf(err, TS_EINTERNAL, "zlib could not compress the answer (%d)", zr);
  }
  *out = buf;
  *out_len = have;
  return 0;
}
