/* hash.h - SHA-256 digests (OpenSSL EVP) as lowercase hex.
 *
 * Used for the sha256 recorded in a version's version.json (the weights file)
 * and for fingerprinting training data, which arrives in pieces and is hashed
 * incrementally. A hex digest is 64 characters plus the NUL. */
#ifndef TALLYD_HASH_H
#define TALLYD_HASH_H

#include <stddef.h>

#include "err.h"

#define HASH_HEX_LEN 64

/* Hashes a file by streaming it (constant memory). */
int hash_sha256_file(const char *path, char hex[HASH_HEX_LEN + 1], ts_err *err);
void hash_sha256_buf(const void *data, size_t len, char hex[HASH_HEX_LEN + 1]);

/* Incremental hashing. hash_sha256_new returns NULL when out of memory. The
 * caller owns the context and frees it with hash_free. hash_final_hex writes
 * the digest of everything given since creation (or the previous final) and
 * resets the context, so it can be reused for a new message. */
typedef struct hash_ctx hash_ctx;

hash_ctx *hash_sha256_new(void);
void hash_update(hash_ctx *h, const void *data, size_t len);
void hash_final_hex(hash_ctx *h, char hex[HASH_HEX_LEN + 1]);
void hash_free(hash_ctx *h);

#endif
