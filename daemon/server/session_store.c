/* session_store.c - ids, hash table, LRU, expiry and limits (see
 * session_store.h for the invariants). */
#include "session_store.h"

#include <stdalign.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <uv.h>

#include "../base/mem.h"
#include "../base/randid.h"

#define TOMBS 256 /* ended ids remembered, direct-mapped by hash */

struct ss_entry {
  ss_entry *hnext;       /* the bucket's chain */
  ss_entry *prev, *next; /* the list, most recent first; also the victims' chain */
  uint64_t hash;
  int64_t position;
  uint64_t bytes; /* counted: payload_bytes + overhead */
  uint64_t overhead;
  double last_used;
  int busy, doomed;
  char id[SS_ID_MAX + 1];
  const char *owner; /* inside this allocation, after the payload */
  alignas(max_align_t) unsigned char payload[];
};

struct ss_store {
  ss_config cfg;
  uv_mutex_t mu;
  uv_cond_t cv;
  uv_thread_t reaper;
  int reaper_on, stopping;
  ss_entry **buckets;
  size_t mask; /* buckets - 1 (a power of two) */
  ss_entry *head, *tail;
  int64_t count, busy_count;
  uint64_t bytes, busy_bytes;
  struct {
    char id[SS_ID_MAX + 1];
    unsigned char gone;
  } tomb[TOMBS];
};

static double mono_now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static double now_of(const ss_store *s) {
  return s->cfg.clock ? s->cfg.clock() : mono_now();
}

/* FNV-1a with a final mix: ids in the table are random, so a client cannot
 * make them collide; an id it asks for just lands in one bucket. */
static uint64_t hash_id(const char *id) {
  uint64_t h = 1469598103934665603ull;
  for (const unsigned char *p = (const unsigned char *)id; *p; p++) h = (h ^ *p) * 1099511628211ull;
  h ^= h >> 33;
  h *= 0xff51afd7ed558ccdull;
  h ^= h >> 33;
  return h;
}

static void changed(ss_store *s) {
  if (s->cfg.on_change) s->cfg.on_change(s->count, s->bytes, s->cfg.arg);
}

/* ---- table and list (mutex held) ----------------------------------------- */

static ss_entry *find(const ss_store *s, const char *id, uint64_t h) {
  for (ss_entry *e = s->buckets[h & s->mask]; e; e = e->hnext)
    if (e->hash == h && strcmp(e->id, id) == 0) return e;
  return NULL;
}

static void list_unlink(ss_store *s, ss_entry *e) {
  if (e->prev)
    e->prev->next = e->next;
  else
    s->head = e->next;
  if (e->next)
    e->next->prev = e->prev;
  else
    s->tail = e->prev;
  e->prev = e->next = NULL;
}

static void list_push_front(ss_store *s, ss_entry *e) {
  e->prev = NULL;
  e->next = s->head;
  if (s->head) s->head->prev = e;
  s->head = e;
  if (!s->tail) s->tail = e;
}

static void to_front(ss_store *s, ss_entry *e, double now) {
  e->last_used = now;
  if (s->head == e) return;
  list_unlink(s, e);
  list_push_front(s, e);
}

static void insert(ss_store *s, ss_entry *e, double now) {
  ss_entry **b = &s->buckets[e->hash & s->mask];
  e->hnext = *b;
  *b = e;
  e->last_used = now;
  list_push_front(s, e);
  s->count++;
  s->bytes += e->bytes;
  changed(s);
}

/* Unlists e for good, remembering why. Its memory is the caller's to free
 * (or the taker's, when it is busy). */
static void unlist(ss_store *s, ss_entry *e, ss_gone why) {
  ss_entry **p = &s->buckets[e->hash & s->mask];
  while (*p != e) p = &(*p)->hnext;
  *p = e->hnext;
  e->hnext = NULL;
  list_unlink(s, e);
  s->count--;
  s->bytes -= e->bytes;
  if (e->busy) {
    s->busy_count--;
    s->busy_bytes -= e->bytes;
  }
  size_t t = e->hash & (TOMBS - 1);
  memcpy(s->tomb[t].id, e->id, sizeof s->tomb[t].id);
  s->tomb[t].gone = (unsigned char)why;
  changed(s);
}

static void retire(ss_store *s, ss_entry *e, ss_gone why, ss_entry **victims) {
  unlist(s, e, why);
  e->next = *victims;
  *victims = e;
}

static void free_victims(ss_store *s, ss_entry *v) {
  while (v) {
    ss_entry *n = v->next;
    if (s->cfg.free_payload) s->cfg.free_payload(v->payload);
    tl_free(v);
    v = n;
  }
}

static int expired(const ss_store *s, const ss_entry *e, double now) {
  return !e->busy && now - e->last_used > s->cfg.limits.ttl_secs;
}

/* Retires idle sessions past the TTL: from the tail (the oldest), over busy
 * ones, until the first idle one that is still fresh. */
static void expire_old(ss_store *s, double now, ss_entry **victims) {
  for (ss_entry *e = s->tail; e;) {
    ss_entry *p = e->prev;
    if (!e->busy) {
      if (!expired(s, e, now)) break;
      retire(s, e, SS_EXPIRED, victims);
    }
    e = p;
  }
}

static int over(const ss_store *s, int64_t add_count, uint64_t add_bytes, ss_gone *which) {
  if (s->count + add_count > s->cfg.limits.max_sessions) {
    *which = SS_EVICTED_COUNT;
    return 1;
  }
  if (s->bytes + add_bytes > s->cfg.limits.max_bytes) {
    *which = SS_EVICTED_BYTES;
    return 1;
  }
  return 0;
}

/* Evicts least recently used idle sessions, keep excepted, until adding
 * add_count sessions of add_bytes fits (or no idle one is left). */
static void evict_to_fit(ss_store *s, int64_t add_count, uint64_t add_bytes, const ss_entry *keep,
                         ss_entry **victims) {
  ss_gone why;
  for (ss_entry *e = s->tail; e && over(s, add_count, add_bytes, &why);) {
    ss_entry *p = e->prev;
    if (!e->busy && e != keep) retire(s, e, why, victims);
    e = p;
  }
}

static ss_gone tomb_of(const ss_store *s, const char *id, uint64_t h) {
  size_t t = h & (TOMBS - 1);
  return strcmp(s->tomb[t].id, id) == 0 ? (ss_gone)s->tomb[t].gone : SS_UNKNOWN;
}

/* A live session of owner (mutex held). With victims, an expired one is
 * retired there; without, it only reads as expired. */
static int lookup(ss_store *s, const char *owner, const char *id, double now, ss_entry **out,
                  ss_entry **victims, ss_gone *gone) {
  uint64_t h = hash_id(id);
  ss_entry *e = find(s, id, h);
  if (e && expired(s, e, now)) {
    if (victims) retire(s, e, SS_EXPIRED, victims);
    *gone = SS_EXPIRED;
    return -TS_ENOTFOUND;
  }
  if (!e) {
    *gone = tomb_of(s, id, h);
    return -TS_ENOTFOUND;
  }
  if (strcmp(e->owner, owner) != 0) {
    *gone = SS_OTHER_OWNER;
    return -TS_ENOTFOUND;
  }
  *out = e;
  return 0;
}

static void info_of(const ss_store *s, const ss_entry *e, double now, ss_info *info) {
  if (!info) return;
  memcpy(info->id, e->id, sizeof info->id);
  info->position = e->position;
  info->bytes = e->bytes;
  info->payload_bytes = e->bytes - e->overhead;
  info->busy = e->busy;
  double left = e->busy ? s->cfg.limits.ttl_secs : s->cfg.limits.ttl_secs - (now - e->last_used);
  info->expires_in = left < 0 ? 0 : left;
}

/* ---- the reaper ------------------------------------------------------------ */

static void reaper_main(void *arg) {
  ss_store *s = arg;
  uv_mutex_lock(&s->mu);
  while (!s->stopping) {
    ss_entry *victims = NULL;
    double now = now_of(s);
    expire_old(s, now, &victims);
    if (victims) {
      uv_mutex_unlock(&s->mu);
      free_victims(s, victims);
      uv_mutex_lock(&s->mu);
      continue;
    }
    /* the oldest idle session is the next to expire; at most a second's
     * sleep so that the clock's drift never matters */
    double wake = 1.0;
    for (ss_entry *e = s->tail; e; e = e->prev)
      if (!e->busy) {
        double left = e->last_used + s->cfg.limits.ttl_secs - now;
        if (left < wake) wake = left;
        break;
      }
    if (wake < 0.01) wake = 0.01;
    uv_cond_timedwait(&s->cv, &s->mu, (uint64_t)(wake * 1e9));
  }
  uv_mutex_unlock(&s->mu);
}

/* ---- public ----------------------------------------------------------------- */

int ss_open(ss_store **out, const ss_config *cfg, ts_err *err) {
  *out = NULL;
  if (!(cfg->limits.ttl_secs > 0) || cfg->limits.max_bytes == 0 || cfg->limits.max_sessions <= 0 ||
      cfg->limits.max_sessions > (INT64_C(1) << 30))
    return ts_errf(err, TS_EINVAL,
                   "session store: the TTL, byte limit and count limit must be "
                   "positive (count at most 2^30)");
  ss_store *s = tl_calloc(1, sizeof *s);
  if (!s) return ts_errf(err, TS_ENOMEM, "out of memory");
  s->cfg = *cfg;
  /* one bucket per session at the count limit: chains stay short without
   * ever rehashing under the mutex (untouched buckets are not resident) */
  size_t nb = 64;
  while (nb < (size_t)cfg->limits.max_sessions) nb <<= 1;
  s->buckets = tl_calloc(nb, sizeof *s->buckets);
  if (!s->buckets) {
    tl_free(s);
    return ts_errf(err, TS_ENOMEM, "out of memory for %zu session slots", nb);
  }
  s->mask = nb - 1;
  uv_mutex_init(&s->mu);
  uv_cond_init(&s->cv);
  if (cfg->reaper) {
    if (uv_thread_create(&s->reaper, reaper_main, s) != 0) {
      ss_close(s);
      return ts_errf(err, TS_EINTERNAL, "cannot start the session reaper thread");
    }
    s->reaper_on = 1;
  }
  changed(s);
  *out = s;
  return 0;
}

void ss_close(ss_store *s) {
  if (!s) return;
  if (s->reaper_on) {
    uv_mutex_lock(&s->mu);
    s->stopping = 1;
    uv_cond_signal(&s->cv);
    uv_mutex_unlock(&s->mu);
    uv_thread_join(&s->reaper);
    s->reaper_on = 0;
  }
  uv_mutex_lock(&s->mu);
  ss_entry *victims = NULL;
  while (s->head) retire(s, s->head, SS_STOPPED, &victims);
  uv_mutex_unlock(&s->mu);
  free_victims(s, victims);
  uv_cond_destroy(&s->cv);
  uv_mutex_destroy(&s->mu);
  tl_free(s->buckets);
  tl_free(s);
}

ss_limits ss_get_limits(const ss_store *s) {
  return s->cfg.limits;
}

void ss_stats(ss_store *s, int64_t *count, uint64_t *bytes) {
  uv_mutex_lock(&s->mu);
  *count = s->count;
  *bytes = s->bytes;
  uv_mutex_unlock(&s->mu);
}

void ss_owner_bytes(ss_store *s, void (*fn)(void *arg, const char *owner, uint64_t bytes),
                    void *arg) {
  uv_mutex_lock(&s->mu);
  for (ss_entry *e = s->head; e; e = e->next) fn(arg, e->owner, e->bytes);
  uv_mutex_unlock(&s->mu);
}

static size_t entry_size(const ss_store *s, const char *owner) {
  return offsetof(ss_entry, payload) + s->cfg.payload_size + strlen(owner) + 1;
}

uint64_t ss_overhead(const ss_store *s, const char *owner) {
  return tl_held(entry_size(s, owner)) + sizeof(ss_entry *);
}

int ss_create(ss_store *s, const char *owner, const void *payload, uint64_t payload_bytes,
              ss_info *info, ss_full *full, ts_err *err) {
  size_t size = entry_size(s, owner);
  ss_entry *e = tl_calloc(1, size);
  if (!e) return ts_errf(err, TS_ENOMEM, "out of memory");
  size_t np = strlen(s->cfg.id_prefix);
  if (np) {
    memcpy(e->id, s->cfg.id_prefix, np);
    e->id[np++] = '.';
  }
  int rc = rid_make(e->id + np, sizeof e->id - np, SS_ID_LEN / 2, RID_HEX, 0, err);
  if (rc) {
    tl_free(e);
    return rc;
  }
  memcpy(e->payload, payload, s->cfg.payload_size);
  char *o = (char *)e->payload + s->cfg.payload_size;
  memcpy(o, owner, strlen(owner) + 1);
  e->owner = o;
  e->hash = hash_id(e->id);
  e->overhead = ss_overhead(s, owner);
  e->bytes = payload_bytes + e->overhead;
  ss_entry *victims = NULL;
  uv_mutex_lock(&s->mu);
  double now = now_of(s);
  const ss_limits *L = &s->cfg.limits;
  /* busy sessions cannot be evicted: refuse before evicting anything when
   * even evicting every idle one would not make room */
  *full = 0;
  if (e->bytes > L->max_bytes)
    *full = SS_FULL_TOO_BIG;
  else if (s->busy_count + 1 > L->max_sessions)
    *full = SS_FULL_COUNT;
  else if (s->busy_bytes + e->bytes > L->max_bytes)
    *full = SS_FULL_BYTES;
  else if (find(s, e->id, e->hash))
    rc = ts_errf(err, TS_EINTERNAL, "session id collision");
  if (*full || rc) {
    uv_mutex_unlock(&s->mu);
    tl_free(e);
    return rc ? rc
              : ts_errf(err, TS_EUNAVAIL, "no room for a session of %llu bytes",
                        (unsigned long long)(payload_bytes + ss_overhead(s, owner)));
  }
  evict_to_fit(s, 1, e->bytes, NULL, &victims);
  insert(s, e, now);
  info_of(s, e, now, info);
  uv_mutex_unlock(&s->mu);
  free_victims(s, victims);
  return 0;
}

int ss_get(ss_store *s, const char *owner, const char *id, ss_info *info, void *payload,
           ss_gone *gone) {
  uv_mutex_lock(&s->mu);
  ss_entry *e = NULL;
  double now = now_of(s);
  int rc = lookup(s, owner, id, now, &e, NULL, gone);
  if (!rc) {
    info_of(s, e, now, info);
    if (payload) memcpy(payload, e->payload, s->cfg.payload_size);
  }
  uv_mutex_unlock(&s->mu);
  return rc;
}

int ss_acquire(ss_store *s, const char *owner, const char *id, ss_entry **out, void **payload,
               ss_info *info, ss_gone *gone) {
  ss_entry *victims = NULL, *e = NULL;
  uv_mutex_lock(&s->mu);
  double now = now_of(s);
  int rc = lookup(s, owner, id, now, &e, &victims, gone);
  if (!rc && e->busy) rc = -TS_ECONFLICT;
  if (!rc) {
    e->busy = 1;
    s->busy_count++;
    s->busy_bytes += e->bytes;
    to_front(s, e, now);
    info_of(s, e, now, info);
    *out = e;
    *payload = e->payload;
  }
  uv_mutex_unlock(&s->mu);
  free_victims(s, victims);
  return rc;
}

void ss_release(ss_store *s, ss_entry *e, int64_t position, uint64_t payload_bytes) {
  ss_entry *victims = NULL;
  uv_mutex_lock(&s->mu);
  e->position = position;
  uint64_t bytes = payload_bytes + e->overhead;
  if (e->doomed) {
    e->next = victims;
    victims = e;
  } else {
    s->busy_count--;
    s->busy_bytes -= e->bytes;
    s->bytes = s->bytes - e->bytes + bytes;
    e->bytes = bytes;
    e->busy = 0;
    to_front(s, e, now_of(s));
    evict_to_fit(s, 0, 0, e, &victims);
    ss_gone why;
    if (over(s, 0, 0, &why))
      retire(s, e, why, &victims); /* it alone is over the limit */
    else
      changed(s);
  }
  uv_mutex_unlock(&s->mu);
  free_victims(s, victims);
}

int ss_delete(ss_store *s, const char *owner, const char *id, ss_gone *gone) {
  ss_entry *victims = NULL, *e = NULL;
  uv_mutex_lock(&s->mu);
  int rc = lookup(s, owner, id, now_of(s), &e, &victims, gone);
  if (!rc) {
    if (e->busy) {
      unlist(s, e, SS_DELETED);
      e->doomed = 1; /* its taker frees it in ss_release */
    } else {
      retire(s, e, SS_DELETED, &victims);
    }
  }
  uv_mutex_unlock(&s->mu);
  free_victims(s, victims);
  return rc;
}
