/* session_store.h - the store behind KV-cache sessions: ids, a hash table,
 * least-recently-used order, idle expiry, and the count and byte limits.
 *
 * It knows nothing of HTTP, JSON or model kinds: a session is an id, an
 * owner name (the model), a position, a byte count and a fixed-size payload
 * the caller copies in (sessions.c keeps the kind, its cache and the pinned
 * version there) and frees through free_payload. Unit-tested alone in
 * tests/unit/test_session_store.c.
 *
 * Invariants, under the store's mutex:
 *   - every live session is in the hash table (by id) and in the list, most
 *     recently used first; every change of last_used moves a session to the
 *     front, so the list is ordered by last use and the oldest idle session
 *     is the last idle one (expiry and eviction walk from the tail and stop
 *     early: no operation scans the whole store);
 *   - count and bytes are the number of listed sessions and the sum of their
 *     counted bytes; busy_count and busy_bytes the same for busy ones;
 *   - a busy session (taken by ss_acquire) is never expired, evicted or
 *     freed by anyone but its taker: ss_delete of a busy session unlists it
 *     and the taker's ss_release frees it;
 *   - a session leaves the store exactly once; its id and the reason go to
 *     the tombstones at that moment, so that a later lookup can say why.
 * Payloads are freed outside the mutex. A session's counted bytes are the
 * payload's bytes as its owner reports them plus what the store itself holds
 * for it (its entry as the allocator holds it, and its hash slot).
 *
 * Threads: any. Lookups (ss_get) are O(1) under the mutex and never free
 * anything, so the event loop may call them. A reaper thread (optional)
 * expires idle sessions. */
#ifndef TALLYD_SESSION_STORE_H
#define TALLYD_SESSION_STORE_H

#include <stddef.h>
#include <stdint.h>

#include "../base/err.h"

#define SS_ID_LEN 32 /* 128 random bits in hex */
/* With a prefix (the replica id, ss_config.id_prefix) an id is
 * "<prefix>.<32 hex>", so that a balancer can route a session's requests to
 * the replica that holds it, and another replica can say who does. */
#define SS_PREFIX_MAX 48
#define SS_ID_MAX (SS_PREFIX_MAX + 1 + SS_ID_LEN)

typedef struct ss_store ss_store;
typedef struct ss_entry ss_entry;

/* Why a session is not there. */
typedef enum ss_gone {
  SS_UNKNOWN = 0,   /* never was, or forgotten */
  SS_EXPIRED,       /* idle past the TTL */
  SS_EVICTED_BYTES, /* least recently used when the byte limit was reached */
  SS_EVICTED_COUNT, /* least recently used when the count limit was reached */
  SS_DELETED,
  SS_STOPPED,    /* the store closed */
  SS_OTHER_OWNER /* the id is live but belongs to another owner */
} ss_gone;

/* Why a new session was refused (ss_create's -TS_EUNAVAIL). */
typedef enum ss_full {
  SS_FULL_COUNT = 1, /* max_sessions are open and none is idle */
  SS_FULL_BYTES,     /* not enough idle sessions to evict to fit the bytes */
  SS_FULL_TOO_BIG    /* the new session alone is over max_bytes */
} ss_full;

typedef struct ss_limits {
  double ttl_secs;      /* > 0 */
  uint64_t max_bytes;   /* > 0 */
  int64_t max_sessions; /* > 0 */
} ss_limits;

typedef struct ss_config {
  ss_limits limits;
  size_t payload_size;                 /* bytes copied in at ss_create */
  void (*free_payload)(void *payload); /* outside the mutex; may be NULL */
  /* Called under the mutex whenever the count or bytes change: keep it to a
   * few stores (the gauges). May be NULL. */
  void (*on_change)(int64_t count, uint64_t bytes, void *arg);
  void *arg;
  double (*clock)(void); /* monotonic seconds; NULL: CLOCK_MONOTONIC (tests pass their own) */
  int reaper;            /* start a thread that expires idle sessions */
  char id_prefix[SS_PREFIX_MAX + 1]; /* "": ids are SS_ID_LEN hex characters alone */
} ss_config;

typedef struct ss_info {
  char id[SS_ID_MAX + 1];
  int64_t position;
  uint64_t bytes;         /* counted: the payload's plus the store's own */
  uint64_t payload_bytes; /* the payload's alone, as last reported */
  double expires_in;      /* seconds; the TTL itself while busy */
  int busy;
} ss_info;

int ss_open(ss_store **out, const ss_config *cfg, ts_err *err);
/* Stops the reaper, ends every session (SS_STOPPED) and frees their
 * payloads, then the store. No session may be busy. NULL is a no-op. */
void ss_close(ss_store *s);
ss_limits ss_get_limits(const ss_store *s);
/* Calls fn for every session with its owner and counted bytes (under the
 * store's lock: fn must not call into the store). */
void ss_owner_bytes(ss_store *s, void (*fn)(void *arg, const char *owner, uint64_t bytes),
                    void *arg);
void ss_stats(ss_store *s, int64_t *count, uint64_t *bytes);
/* What the store holds per session on top of the payload's bytes. */
uint64_t ss_overhead(const ss_store *s, const char *owner);

/* A new session of `owner` with a copy of payload and payload_bytes: it
 * gets a fresh random id and goes to the front. Least recently used idle
 * sessions are evicted to make room, but only when that makes it fit:
 * otherwise nothing is evicted and -TS_EUNAVAIL is returned with *full
 * saying which limit. The new session is never evicted by its own
 * creation. On any failure the payload stays the caller's. 0 and *info;
 * -TS_EUNAVAIL, -TS_ENOMEM or -TS_EINTERNAL (no random id). */
int ss_create(ss_store *s, const char *owner, const void *payload, uint64_t payload_bytes,
              ss_info *info, ss_full *full, ts_err *err);

/* A live session's info and a copy of its payload (NULL: not wanted).
 * Frees nothing (loop-thread safe); an idle session past its TTL reads as
 * SS_EXPIRED. 0, or -TS_ENOTFOUND with *gone. */
int ss_get(ss_store *s, const char *owner, const char *id, ss_info *info, void *payload,
           ss_gone *gone);

/* Takes a session for exclusive use: it is marked busy and moved to the
 * front. *payload points at the stored payload, the caller's until
 * ss_release. 0, -TS_ENOTFOUND with *gone, or -TS_ECONFLICT (busy). */
int ss_acquire(ss_store *s, const char *owner, const char *id, ss_entry **e, void **payload,
               ss_info *info, ss_gone *gone);
/* Gives a taken session back with its position and its payload's bytes now:
 * idle again, at the front; then least recently used idle sessions are
 * evicted until the limits hold, this one last (it can go when it alone is
 * over the byte limit). A session deleted while taken is freed here. */
void ss_release(ss_store *s, ss_entry *e, int64_t position, uint64_t payload_bytes);

/* Ends a session. 0, or -TS_ENOTFOUND with *gone. */
int ss_delete(ss_store *s, const char *owner, const char *id, ss_gone *gone);

#endif
