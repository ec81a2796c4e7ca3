/* randid.c - random identifiers (see randid.h). */
#include "randid.h"

#include <openssl/crypto.h>
#include <openssl/rand.h>
#include <string.h>
#include <unistd.h>

#define POOL_BYTES 4096

size_t rid_len(size_t nbytes, rid_enc enc) {
  return enc == RID_HEX ? 2 * nbytes : (4 * nbytes + 2) / 3;
}

/* The per-thread block: a thread that never asks for a pooled id never
 * fills one. */
static _Thread_local unsigned char pool[POOL_BYTES];
static _Thread_local size_t pool_used = POOL_BYTES;
/* The process that filled the block: a child of fork(2) inherits the block
 * and would hand out the very ids its parent hands out next (replicas
 * started by a forking supervisor), so it refills its own first. */
static _Thread_local pid_t pool_pid;

static int draw(unsigned char *b, size_t n, int pooled) {
  if (!pooled) return RAND_bytes(b, (int)n) == 1 ? 0 : -1;
  pid_t me = getpid();
  if (pool_pid != me) pool_used = POOL_BYTES;
  if (pool_used + n > POOL_BYTES) {
    if (RAND_bytes(pool, POOL_BYTES) != 1) return -1;
    pool_used = 0;
    pool_pid = me;
  }
  memcpy(b, pool + pool_used, n);
  memset(pool + pool_used, 0, n); /* the same bytes are never handed out twice */
  pool_used += n;
  return 0;
}

static void encode(const unsigned char *b, size_t n, rid_enc enc, char *out) {
  static const char hex[] = "0123456789abcdef";
  static const char b64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
  size_t k = 0;
  if (enc == RID_HEX) {
    for (size_t i = 0; i < n; i++) {
      out[k++] = hex[b[i] >> 4];
      out[k++] = hex[b[i] & 15];
    }
  } else {
    for (size_t i = 0; i < n; i += 3) {
      unsigned v = (unsigned)b[i] << 16 | (i + 1 < n ? (unsigned)b[i + 1] << 8 : 0) |
                   (i + 2 < n ? b[i + 2] : 0);
      size_t chars = n - i >= 3 ? 4 : n - i + 1; /* 1 byte: 2 characters, 2 bytes: 3 */
      for (size_t c = 0; c < chars; c++) out[k++] = b64[v >> (18 - 6 * c) & 63];
    }
  }
  out[k] = 0;
}

int rid_make(char *out, size_t out_size, size_t nbytes, rid_enc enc, int flags, ts_err *err) {
  if (nbytes < 1 || nbytes > RID_MAX_BYTES || !out || out_size < rid_len(nbytes, enc) + 1)
    return ts_errf(err, TS_EINVAL, "rid_make: %zu bytes do not fit in %zu characters", nbytes,
                   out_size);
  unsigned char b[RID_MAX_BYTES];
  if (draw(b, nbytes, flags & RID_POOLED)) {
    out[0] = 0;
    return ts_errf(err, TS_EINTERNAL, "the random number generator failed");
  }
  encode(b, nbytes, enc, out);
  OPENSSL_cleanse(b, sizeof b);
  return 0;
}
