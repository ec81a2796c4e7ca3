/* auth.h - API keys: the key file, the scope each route needs, key making.
 *
 * The key file (--api-key-file) holds one key a line:
 *     <SHA-256 hex digest of the key string exactly as sent> <infer|admin>
 * '#' starts a comment (whole line or the rest of one); blank lines are
 * skipped. Only digests are stored, so the file is no secret worth stealing.
 *
 * A presented key (Authorization: Bearer <key> or X-Api-Key: <key>) is
 * digested and compared with every entry by CRYPTO_memcmp, without an early
 * exit on the first match: the time taken does not depend on which entry,
 * if any, matched. Access is decided from the route alone, before any model
 * is looked up, so a refused request learns nothing about the repository.
 *
 * Ownership: auth_keys is immutable once loaded; the server swaps the whole
 * set at SIGHUP (loop thread) and frees the old one. */
#ifndef TALLYD_AUTH_H
#define TALLYD_AUTH_H

#include <stddef.h>

#include "../base/err.h"

typedef enum auth_scope { AUTH_NONE = 0, AUTH_INFER = 1, AUTH_ADMIN = 2 } auth_scope;

typedef struct auth_keys auth_keys;

/* Parses the text of a key file. `source` names it in messages ("keys.txt").
 * 0, or -TS_EINVAL naming the line ("keys.txt:3: ..."), -TS_ENOMEM. A file
 * with no key at all is refused: it would lock every endpoint by mistake. */
int auth_parse(const char *text, size_t len, const char *source, auth_keys **out, ts_err *err);
/* Reads and parses a key file (at most 1 MiB). */
int auth_load(const char *path, auth_keys **out, ts_err *err);
void auth_free(auth_keys *k);
int auth_count(const auth_keys *k);

/* The scope granted to `key` (len bytes): the highest scope among the
 * entries whose digest matches, AUTH_NONE when none does. */
auth_scope auth_lookup(const auth_keys *k, const char *key, size_t len);

/* The scope a route (enum route_id of routes.h) needs: its row's scope
 * column; AUTH_INFER for R_NONE (unknown routes, so that an anonymous
 * client cannot map the server). */
auth_scope auth_required(int route_id);
const char *auth_scope_name(auth_scope s);

/* A new key: 32 random bytes (base/randid.h) in base64url (43 characters, no
 * padding) into key (>= 44 bytes), and its key-file line
 * "<sha256 hex> <scope>" into line (>= 72 bytes). */
int auth_keygen(auth_scope scope, char *key, size_t keylen, char *line, size_t linelen,
                ts_err *err);

#endif
