/* randid.h - the one maker of random identifiers: request ids, session ids
 * and API keys.
 *
 * Bytes come from OpenSSL's RAND_bytes (the system's generator, reseeded by
 * OpenSSL). RAND_bytes costs about as much as the rest of a health check, so
 * ids asked for with RID_POOLED (request ids, drawn on the loop thread for
 * every request) are cut from a per-thread 4 KiB block of random bytes; each
 * id is still fresh random bytes, and the bytes handed out are wiped from the
 * block, which a process made by fork(2) never shares with its parent.
 * Secrets (API keys) and session ids are drawn directly and the raw
 * bytes are wiped from the stack.
 *
 * When the generator fails there is no id: the caller refuses (a session,
 * a key) or falls back to something unique but not random (a request id,
 * which only labels log lines). */
#ifndef TALLYD_RANDID_H
#define TALLYD_RANDID_H

#include <stddef.h>

#include "err.h"

typedef enum rid_enc {
  RID_HEX,   /* lowercase hex, 2 characters a byte */
  RID_B64URL /* base64url without padding (RFC 4648 section 5), ceil(4n/3) characters */
} rid_enc;

#define RID_POOLED 1 /* from the per-thread block (not for secrets) */
#define RID_MAX_BYTES 64

/* Characters rid_make writes for nbytes random bytes, without the NUL. */
size_t rid_len(size_t nbytes, rid_enc enc);
/* nbytes (1..RID_MAX_BYTES) random bytes, encoded, NUL-terminated, into out
 * (out_size >= rid_len + 1). 0, -TS_EINVAL (sizes) or -TS_EINTERNAL (the
 * generator failed; out is then "" ). */
int rid_make(char *out, size_t out_size, size_t nbytes, rid_enc enc, int flags, ts_err *err);

#endif
