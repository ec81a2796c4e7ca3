/* hash.c - SHA-256 through OpenSSL's EVP interface (see hash.h).
 *
 * SHA-256 on a context that was initialised cannot fail in OpenSSL short of a
 * broken library, so update and final return nothing; a failure there would
 * be a bug, which aborts rather than hand out a wrong digest. */
#include "hash.h"

#include <errno.h>
#include <fcntl.h>
#include <openssl/evp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "fsutil.h"
#include "mem.h"

struct hash_ctx {
  EVP_MD_CTX *md;
};

#define CHECK(x)                                                   \
  do {                                                             \
    if (!(x)) {                                                    \
      fprintf(stderr, "tallyd: OpenSSL SHA-256 failed: %s\n", #x); \
      abort();                                                     \
    }                                                              \
  } while (0)

static void to_hex(const unsigned char *d, char hex[HASH_HEX_LEN + 1]) {
  static const char digits[] = "0123456789abcdef";
  for (int i = 0; i < HASH_HEX_LEN / 2; i++) {
    hex[2 * i] = digits[d[i] >> 4];
    hex[2 * i + 1] = digits[d[i] & 15];
  }
  hex[HASH_HEX_LEN] = '\0';
}

hash_ctx *hash_sha256_new(void) {
  hash_ctx *h = tl_malloc(sizeof *h);
  if (!h) return NULL;
  h->md = EVP_MD_CTX_new();
  if (!h->md || EVP_DigestInit_ex(h->md, EVP_sha256(), NULL) != 1) {
    EVP_MD_CTX_free(h->md);
    tl_free(h);
    return NULL;
  }
  return h;
}

void hash_update(hash_ctx *h, const void *data, size_t len) {
  if (len) CHECK(EVP_DigestUpdate(h->md, data, len) == 1);
}

void hash_final_hex(hash_ctx *h, char hex[HASH_HEX_LEN + 1]) {
  unsigned char d[EVP_MAX_MD_SIZE];
  unsigned int n = 0;
  CHECK(EVP_DigestFinal_ex(h->md, d, &n) == 1 && n == HASH_HEX_LEN / 2);
  to_hex(d, hex);
  CHECK(EVP_DigestInit_ex(h->md, EVP_sha256(), NULL) == 1);
}

void hash_free(hash_ctx *h) {
  if (!h) return;
  EVP_MD_CTX_free(h->md);
  tl_free(h);
}

void hash_sha256_buf(const void *data, size_t len, char hex[HASH_HEX_LEN + 1]) {
  unsigned char d[EVP_MAX_MD_SIZE];
  unsigned int n = 0;
  CHECK(EVP_Digest(data, len, d, &n, EVP_sha256(), NULL) == 1 && n == HASH_HEX_LEN / 2);
  to_hex(d, hex);
}

int hash_sha256_file(const char *path, char hex[HASH_HEX_LEN + 1], ts_err *err) {
  enum { CHUNK = 1 << 20 };
  int fd;
  int r0 = fs_open_regular(path, &fd, err);
  if (r0) return r0;
  unsigned char *buf = tl_malloc(CHUNK);
  hash_ctx *h = hash_sha256_new();
  int r = 0;
  if (!buf || !h) {
    r = ts_errf(err, TS_ENOMEM, "out of memory hashing '%s'", path);
    goto out;
  }
  for (;;) {
    ssize_t got = read(fd, buf, CHUNK);
    if (got < 0) {
      if (errno == EINTR) continue;
      r = ts_errf(err, TS_EIO, "cannot read '%s': %s", path, strerror(errno));
      goto out;
    }
    if (got == 0) break;
    hash_update(h, buf, (size_t)got);
  }
  hash_final_hex(h, hex);
out:
  hash_free(h);
  tl_free(buf);
  close(fd);
  return r;
}
