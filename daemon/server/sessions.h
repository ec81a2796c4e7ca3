/* sessions.h - the KV-cache session store and its HTTP endpoints.
 *
 *   POST   /v2/models/{m}/sessions            201 {"session_id", "position": 0, ...}
 *   POST   /v2/models/{m}/sessions/{id}/infer feed the next tokens (OIP infer body)
 *   GET    /v2/models/{m}/sessions/{id}       position, memory, expiry
 *   DELETE /v2/models/{m}/sessions/{id}       end it
 *
 * A session belongs to one model version, which it pins (holds a repo_ver
 * reference) until it ends, so a new version never changes a session under
 * way. The kind keeps the cache (md_kind session_* hooks); the store keeps
 * ids (128 random bits from OpenSSL's RAND_bytes, hex), the least recently
 * used order, and the accounting:
 *   - a session idle longer than the TTL (--session-ttl-secs) expires;
 *   - when the sessions' memory passes the cap (--kv-cache-bytes), the least
 *     recently used idle sessions are evicted until it fits (the session
 *     just used goes last; when it alone is over the cap it is evicted after
 *     its answer is sent).
 * Ended sessions' ids stay in a small ring, so that a later request for one
 * is told why it is gone (expired, evicted, deleted) instead of just 404.
 * One request at a time per session: a second concurrent one gets 409.
 *
 * Threads: GET is answered on the loop thread (a table lookup under the
 * store's mutex); creation, infer and DELETE run on workers (they compute or
 * free memory). A reaper thread frees expired sessions. Memory of ended
 * sessions is freed outside the mutex. */
#ifndef TALLYD_SESSIONS_H
#define TALLYD_SESSIONS_H

#include <stdint.h>

#include "server.h"

#define SESSIONS_DEFAULT_TTL_SECS 600
#define SESSIONS_DEFAULT_CAP_BYTES (INT64_C(4) << 30)

/* Sets the TTL and the cap (<= 0: the defaults) and starts the reaper
 * thread. Called once at start; without it the defaults apply and expiry is
 * only noticed when a session is used. */
int sessions_configure(int64_t ttl_secs, int64_t cap_bytes, ts_err *err);
/* Stops the reaper and ends every session (releasing the pinned versions).
 * Called after the worker pool has stopped. */
void sessions_shutdown(void);

/* For metrics: open sessions and the bytes their caches hold. */
void sessions_stats(int *open, uint64_t *bytes);

/* Loop thread: answers GET of a session; 1 when answered, 0 otherwise. */
int sessions_inline(server *s, const route *rt, const char *method, resp *out);
/* Worker: R_SESSIONS, R_SESSION (DELETE), R_SESSION_INFER. */
void sessions_job(job *j);

#endif
