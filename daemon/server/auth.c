/* auth.c - API keys (see auth.h): key-file parsing, constant-time lookup,
 * the scope check (the scopes are a column of the route table, routes.h),
 * and key generation. */
#include "auth.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "../base/fsutil.h"
#include "../base/mem.h"
#include "../base/randid.h"
#include "routes.h"

#define DIGEST_LEN 32

typedef struct auth_entry {
  unsigned char digest[DIGEST_LEN];
  auth_scope scope;
} auth_entry;

struct auth_keys {
  auth_entry *e;
  int n;
};

static int hexval(int c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

static int is_space(char c) {
  return c == ' ' || c == '\t' || c == '\r';
}

/* One line without its '\n'; comments already cut. 0 blank, 1 entry, <0 error. */
static int parse_line(const char *p, size_t n, auth_entry *out, const char *source, int lineno,
                      ts_err *err) {
  size_t i = 0;
  while (i < n && is_space(p[i])) i++;
  if (i == n) return 0;
  size_t h0 = i;
  while (i < n && !is_space(p[i])) i++;
  size_t hlen = i - h0;
  if (hlen != 2 * DIGEST_LEN)
    return ts_errf(err, TS_EINVAL,
                   "%s:%d: expected '<sha256 hex digest (64 characters)> <infer|admin>', "
                   "the first field has %zu characters",
                   source, lineno, hlen);
  for (size_t k = 0; k < DIGEST_LEN; k++) {
    int hi = hexval((unsigned char)p[h0 + 2 * k]), lo = hexval((unsigned char)p[h0 + 2 * k + 1]);
    if (hi < 0 || lo < 0)
      return ts_errf(err, TS_EINVAL, "%s:%d: the digest is not hexadecimal", source, lineno);
    out->digest[k] = (unsigned char)(hi << 4 | lo);
  }
  while (i < n && is_space(p[i])) i++;
  size_t s0 = i;
  while (i < n && !is_space(p[i])) i++;
  size_t slen = i - s0;
  if (slen == 5 && memcmp(p + s0, "infer", 5) == 0)
    out->scope = AUTH_INFER;
  else if (slen == 5 && memcmp(p + s0, "admin", 5) == 0)
    out->scope = AUTH_ADMIN;
  else if (slen == 0)
    return ts_errf(err, TS_EINVAL, "%s:%d: the scope is missing (infer or admin)", source, lineno);
  else
    return ts_errf(err, TS_EINVAL, "%s:%d: unknown scope '%.*s' (infer or admin)", source, lineno,
                   (int)(slen > 40 ? 40 : slen), p + s0);
  while (i < n && is_space(p[i])) i++;
  if (i != n)
    return ts_errf(err, TS_EINVAL, "%s:%d: unexpected text after the scope", source, lineno);
  return 1;
}

int auth_parse(const char *text, size_t len, const char *source, auth_keys **out, ts_err *err) {
  *out = NULL;
  auth_keys *k = tl_calloc(1, sizeof *k);
  if (!k) return ts_errf(err, TS_ENOMEM, "out of memory");
  int cap = 0, lineno = 0, rc = 0;
  size_t pos = 0;
  while (pos < len) {
    const char *nl = memchr(text + pos, '\n', len - pos);
    size_t end = nl ? (size_t)(nl - text) : len;
    lineno++;
    const char *hash = memchr(text + pos, '#', end - pos);
    size_t n = (hash ? (size_t)(hash - text) : end) - pos;
    if (memchr(text + pos, '\0', end - pos)) {
      rc = ts_errf(err, TS_EINVAL, "%s:%d: a NUL byte (is this a text file?)", source, lineno);
      goto fail;
    }
    auth_entry e;
    rc = parse_line(text + pos, n, &e, source, lineno, err);
    if (rc < 0) goto fail;
    if (rc == 1) {
      if (k->n == cap) {
        int nc = cap ? cap * 2 : 8;
        auth_entry *ne = tl_realloc(k->e, sizeof *ne * (size_t)nc);
        if (!ne) {
          rc = ts_errf(err, TS_ENOMEM, "out of memory");
          goto fail;
        }
        k->e = ne;
        cap = nc;
      }
      k->e[k->n++] = e;
    }
    pos = end + 1;
  }
  if (k->n == 0) {
    rc = ts_errf(err, TS_EINVAL,
                 "%s: holds no key (lines '<sha256 hex> <infer|admin>'; make one "
                 "with tallyd --keygen)",
                 source);
    goto fail;
  }
  *out = k;
  return 0;
fail:
  auth_free(k);
  return rc;
}

int auth_load(const char *path, auth_keys **out, ts_err *err) {
  char *text = NULL;
  size_t len = 0;
  int rc = fs_read_file(path, 1 << 20, &text, &len, err);
  if (rc) return rc;
  rc = auth_parse(text, len, path, out, err);
  tl_free(text);
  return rc;
}

void auth_free(auth_keys *k) {
  if (!k) return;
  OPENSSL_cleanse(k->e, sizeof *k->e * (size_t)k->n);
  tl_free(k->e);
  tl_free(k);
}

int auth_count(const auth_keys *k) {
  return k ? k->n : 0;
}

static void sha256(const void *data, size_t len, unsigned char out[DIGEST_LEN]) {
  unsigned int n = DIGEST_LEN;
  if (EVP_Digest(data, len, out, &n, EVP_sha256(), NULL) != 1)
    memset(out, 0, DIGEST_LEN); /* matches no entry: digests of keys are never all zero */
}

auth_scope auth_lookup(const auth_keys *k, const char *key, size_t len) {
  if (!k || !key || len == 0) return AUTH_NONE;
  unsigned char d[DIGEST_LEN];
  sha256(key, len, d);
  /* Every entry is compared; matches only set bits, so neither the number
   * nor the position of matches changes the work done. */
  unsigned granted = 0;
  for (int i = 0; i < k->n; i++) {
    unsigned eq = (unsigned)(CRYPTO_memcmp(d, k->e[i].digest, DIGEST_LEN) == 0);
    granted |= eq << (unsigned)k->e[i].scope;
  }
  OPENSSL_cleanse(d, sizeof d);
  if (granted & (1u << AUTH_ADMIN)) return AUTH_ADMIN;
  if (granted & (1u << AUTH_INFER)) return AUTH_INFER;
  return AUTH_NONE;
}

auth_scope auth_required(int route_id) {
  return route_get(route_id)->scope;
}

const char *auth_scope_name(auth_scope s) {
  switch (s) {
    case AUTH_INFER: return "infer";
    case AUTH_ADMIN: return "admin";
    default: return "none";
  }
}

int auth_keygen(auth_scope scope, char *key, size_t keylen, char *line, size_t linelen,
                ts_err *err) {
  if (scope != AUTH_INFER && scope != AUTH_ADMIN)
    return ts_errf(err, TS_EINVAL, "a key's scope is infer or admin");
  if (keylen < 44 || linelen < 2 * DIGEST_LEN + 8)
    return ts_errf(err, TS_EINVAL, "auth_keygen: buffers too small");
  /* 32 bytes = 256 bits = 43 base64url characters */
  int rc = rid_make(key, keylen, 32, RID_B64URL, 0, err);
  if (rc) return rc;
  unsigned char d[DIGEST_LEN];
  sha256(key, 43, d);
  static const char hex[] = "0123456789abcdef";
  for (int i = 0; i < DIGEST_LEN; i++) {
    line[2 * i] = hex[d[i] >> 4];
    line[2 * i + 1] = hex[d[i] & 15];
  }
  snprintf(line + 2 * DIGEST_LEN, linelen - 2 * DIGEST_LEN, " %s", auth_scope_name(scope));
  return 0;
}
