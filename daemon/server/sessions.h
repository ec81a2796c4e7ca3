/* sessions.h - the KV-cache session endpoints.
 *
 *   POST   /v2/models/{m}/sessions            201 {"session_id", "position": 0, ...}
 *   POST   /v2/models/{m}/sessions/{id}/infer feed the next tokens (OIP infer body)
 *   GET    /v2/models/{m}/sessions/{id}       position, memory, expiry
 *   DELETE /v2/models/{m}/sessions/{id}       end it
 *
 * (rows R_SESSIONS, R_SESSION, R_SESSION_DELETE, R_SESSION_INFER of
 * routes.h; handlers ep_session_*). A session belongs to one model version,
 * which it pins (holds a repo_ver reference) until it ends, so a new version
 * never changes a session under way. The kind keeps the cache (md_kind
 * session_* hooks); the store (session_store.h) keeps ids, the least
 * recently used order, expiry and the limits:
 *   - a session idle longer than the TTL (--session-ttl-secs) expires;
 *   - at most --max-sessions are open and their memory (the kind's cache as
 *     allocated plus the store's own per-session overhead) stays under
 *     --kv-cache-bytes: least recently used idle sessions are evicted to make
 *     room; a new session that cannot fit even so is refused 503 with the
 *     reason; a session that grows past the cap alone is evicted after its
 *     answer is sent;
 *   - a chunk commits (moves the session's position) only while its answer
 *     is still wanted: a chunk answered 504, or whose client went away,
 *     leaves the session where it was, so a retry never feeds it twice.
 * An ended session's id is remembered for a while, so that a later request
 * for it is told why it is gone (expired, evicted, deleted) instead of just
 * 404. One request at a time per session: a second concurrent one gets 409.
 * The store feeds tallyd_sessions_open and tallyd_kv_cache_bytes.
 *
 * Threads: GET is answered on the loop thread (an O(1) lookup under the
 * store's mutex); creation, infer and DELETE run on workers (they compute or
 * free memory). The store's reaper thread frees expired sessions. */
#ifndef TALLYD_SESSIONS_H
#define TALLYD_SESSIONS_H

#include <stdint.h>

#include "../base/err.h"

#define SESSIONS_DEFAULT_TTL_SECS 600
#define SESSIONS_DEFAULT_CAP_BYTES (INT64_C(4) << 30)
#define SESSIONS_DEFAULT_MAX 10000

/* Opens the store with the TTL, the byte cap and the count limit (<= 0: the
 * defaults) and starts its reaper. Called once at start, before serving;
 * without it the first session opens a store with the defaults and no
 * reaper (expiry then noticed when a session is used). */
/* The replica id (--replica-id) that prefixes every session id made from
 * now on ("<replica>.<32 hex>"), so that a balancer can route by it; a
 * request for an id of another replica gets 404 naming that replica. Call
 * before sessions_configure. */
int sessions_set_replica(const char *id, ts_err *err);
int sessions_configure(int64_t ttl_secs, int64_t cap_bytes, int64_t max_sessions, ts_err *err);
/* Ends every session (releasing the pinned versions) and closes the store.
 * Called after the worker pool has stopped. */
void sessions_shutdown(void);
/* Calls fn for every open session with its model and counted bytes. */
void sessions_owner_bytes(void (*fn)(void *arg, const char *model, uint64_t bytes), void *arg);

#endif
