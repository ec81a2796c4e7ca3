/* sessions.c - the KV-cache session store (see sessions.h).
 *
 * Invariants, under S.mu:
 *   - every live session is in the list, most recently used first; S.count
 *     and S.bytes are the number of listed sessions and the sum of their
 *     `bytes`;
 *   - a busy session (a worker is feeding it) is never expired, evicted or
 *     freed by anyone but that worker: DELETE of a busy session unlists it
 *     and marks it doomed, and the worker frees it when it is done;
 *   - a session leaves the list exactly once, and its id goes into the ring
 *     with the reason at that moment.
 * Freeing (the kind's session_free, repo_release of the pinned version) is
 * done outside the mutex, from a private list of victims. */
#include "sessions.h"

#include <openssl/rand.h>
#include <stdio.h>
#include <string.h>

#include "../base/log.h"
#include "../base/mem.h"
#include "../models/model.h"
#include "oip.h"

typedef struct ss_entry {
  char id[33];
  char model[256];
  repo_ver *ver;
  const md_kind *kind;
  void *sess;
  size_t bytes;
  int64_t position;
  double last_used;
  int busy, doomed;
  struct ss_entry *prev, *next; /* the list; also the victims' chain */
} ss_entry;

#define SS_RING 64

static struct {
  uv_once_t once;
  uv_mutex_t mu;
  uv_cond_t cv;
  uv_thread_t reaper;
  int reaper_on, stopping;
  double ttl;
  uint64_t cap, bytes;
  int count;
  ss_entry *head, *tail;
  struct {
    char id[33];
    char why[200];
  } ring[SS_RING];
  int ring_next;
} S = {.once = UV_ONCE_INIT};

static void ss_init(void) {
  uv_mutex_init(&S.mu);
  uv_cond_init(&S.cv);
  S.ttl = SESSIONS_DEFAULT_TTL_SECS;
  S.cap = (uint64_t)SESSIONS_DEFAULT_CAP_BYTES;
}

static void ss_once(void) { uv_once(&S.once, ss_init); }

/* ---- the list (S.mu held) ------------------------------------------------ */

static void unlink_entry(ss_entry *e) {
  if (e->prev) e->prev->next = e->next;
  else S.head = e->next;
  if (e->next) e->next->prev = e->prev;
  else S.tail = e->prev;
  e->prev = e->next = NULL;
  S.count--;
  S.bytes -= e->bytes;
}

static void push_front(ss_entry *e) {
  e->prev = NULL;
  e->next = S.head;
  if (S.head) S.head->prev = e;
  S.head = e;
  if (!S.tail) S.tail = e;
  S.count++;
  S.bytes += e->bytes;
}

static ss_entry *find(const char *id) {
  for (ss_entry *e = S.head; e; e = e->next)
    if (strcmp(e->id, id) == 0) return e;
  return NULL;
}

static void remember(const ss_entry *e, const char *why) {
  int i = S.ring_next++ % SS_RING;
  snprintf(S.ring[i].id, sizeof S.ring[i].id, "%s", e->id);
  snprintf(S.ring[i].why, sizeof S.ring[i].why, "%s", why);
}

static const char *ring_why(const char *id) {
  for (int i = 0; i < SS_RING; i++)
    if (S.ring[i].id[0] && strcmp(S.ring[i].id, id) == 0) return S.ring[i].why;
  return NULL;
}

/* Unlists e with a reason and chains it onto *victims. */
static void retire(ss_entry *e, const char *why, ss_entry **victims) {
  unlink_entry(e);
  remember(e, why);
  e->next = *victims;
  *victims = e;
}

static int expired(const ss_entry *e, double now) { return !e->busy && now - e->last_used > S.ttl; }

static void expire_all(double now, ss_entry **victims) {
  char why[200];
  snprintf(why, sizeof why, "expired after %.0f s idle (--session-ttl-secs)", S.ttl);
  for (ss_entry *e = S.tail; e;) {
    ss_entry *p = e->prev;
    if (expired(e, now)) retire(e, why, victims);
    e = p;
  }
}

/* Evicts least recently used idle sessions until the cap holds. */
static void enforce_cap(ss_entry **victims) {
  char why[200];
  snprintf(why, sizeof why,
           "was evicted: the KV cache cap of %llu bytes (--kv-cache-bytes) was reached",
           (unsigned long long)S.cap);
  for (ss_entry *e = S.tail; e && S.bytes > S.cap;) {
    ss_entry *p = e->prev;
    if (!e->busy) retire(e, why, victims);
    e = p;
  }
}

static void free_victims(ss_entry *v) {
  while (v) {
    ss_entry *n = v->next;
    if (v->sess) v->kind->session_free(v->sess);
    if (v->ver) repo_release(v->ver);
    tl_free(v);
    v = n;
  }
}

/* ---- configuration and the reaper ---------------------------------------- */

static void reaper_main(void *arg) {
  (void)arg;
  uv_mutex_lock(&S.mu);
  while (!S.stopping) {
    ss_entry *victims = NULL;
    double now = md_now();
    expire_all(now, &victims);
    double wake = 1.0; /* at most a second late for a TTL just shortened */
    for (ss_entry *e = S.head; e; e = e->next)
      if (!e->busy && e->last_used + S.ttl - now < wake) wake = e->last_used + S.ttl - now;
    if (wake < 0.01) wake = 0.01;
    if (victims) {
      uv_mutex_unlock(&S.mu);
      free_victims(victims);
      uv_mutex_lock(&S.mu);
      continue;
    }
    uv_cond_timedwait(&S.cv, &S.mu, (uint64_t)(wake * 1e9));
  }
  uv_mutex_unlock(&S.mu);
}

int sessions_configure(int64_t ttl_secs, int64_t cap_bytes, ts_err *err) {
  ss_once();
  uv_mutex_lock(&S.mu);
  S.ttl = ttl_secs > 0 ? (double)ttl_secs : SESSIONS_DEFAULT_TTL_SECS;
  S.cap = cap_bytes > 0 ? (uint64_t)cap_bytes : (uint64_t)SESSIONS_DEFAULT_CAP_BYTES;
  int start = !S.reaper_on;
  S.stopping = 0;
  uv_mutex_unlock(&S.mu);
  if (start) {
    if (uv_thread_create(&S.reaper, reaper_main, NULL) != 0)
      return ts_errf(err, TS_EINTERNAL, "cannot start the session reaper thread");
    S.reaper_on = 1;
  }
  return 0;
}

void sessions_shutdown(void) {
  ss_once();
  uv_mutex_lock(&S.mu);
  S.stopping = 1;
  uv_cond_signal(&S.cv);
  uv_mutex_unlock(&S.mu);
  if (S.reaper_on) uv_thread_join(&S.reaper);
  S.reaper_on = 0;
  uv_mutex_lock(&S.mu);
  ss_entry *victims = NULL;
  while (S.head) retire(S.head, "ended: the daemon stopped", &victims);
  uv_mutex_unlock(&S.mu);
  free_victims(victims);
}

void sessions_stats(int *open, uint64_t *bytes) {
  ss_once();
  uv_mutex_lock(&S.mu);
  *open = S.count;
  *bytes = S.bytes;
  uv_mutex_unlock(&S.mu);
}

/* ---- lookups -------------------------------------------------------------- */

static int not_found(const char *id, ts_err *err) {
  const char *why = ring_why(id);
  if (why) return ts_errf(err, TS_ENOTFOUND, "session %s %s", id, why);
  return ts_errf(err, TS_ENOTFOUND, "unknown session '%s'", id);
}

/* Finds a live session of `model` (S.mu held); expired ones are retired. */
static int lookup(const char *model, const char *id, double now, ss_entry **out,
                  ss_entry **victims, ts_err *err) {
  ss_entry *e = find(id);
  if (e && victims && expired(e, now)) {
    char why[200];
    snprintf(why, sizeof why, "expired after %.0f s idle (--session-ttl-secs)", S.ttl);
    retire(e, why, victims);
    e = NULL;
  }
  if (!e || (!victims && expired(e, now))) {
    if (e) return ts_errf(err, TS_ENOTFOUND, "session %s expired after %.0f s idle", id, S.ttl);
    return not_found(id, err);
  }
  if (strcmp(e->model, model) != 0)
    return ts_errf(err, TS_ENOTFOUND, "unknown session '%s' for model '%s'", id, model);
  *out = e;
  return 0;
}

static json_t *describe(const ss_entry *e, double now) {
  double left = e->busy ? S.ttl : S.ttl - (now - e->last_used);
  return json_pack("{s:s, s:s, s:s, s:I, s:I, s:f, s:b}", "session_id", e->id, "model_name",
                   e->model, "model_version", "", "position", (json_int_t)e->position,
                   "memory_bytes", (json_int_t)e->bytes, "expires_in_s", left < 0 ? 0.0 : left,
                   "busy", e->busy);
}

static void set_version(json_t *j, const ss_entry *e) {
  char b[32];
  snprintf(b, sizeof b, "%lld", (long long)repo_ver_version(e->ver));
  json_object_set_new(j, "model_version", json_string(b));
}

/* ---- loop thread ----------------------------------------------------------- */

int sessions_inline(server *s, const route *rt, const char *method, resp *out) {
  (void)s;
  if (rt->id != R_SESSION || (strcmp(method, "GET") != 0 && strcmp(method, "HEAD") != 0))
    return 0;
  ss_once();
  ts_err err = {0};
  uv_mutex_lock(&S.mu);
  ss_entry *e;
  json_t *j = NULL;
  int rc = lookup(rt->model, rt->session, md_now(), &e, NULL, &err);
  if (!rc) {
    j = describe(e, md_now());
    if (j) set_version(j, e);
  }
  uv_mutex_unlock(&S.mu);
  if (rc) {
    resp_error(out, &err);
    return 1;
  }
  if (!j) {
    ts_errf(&err, TS_ENOMEM, "out of memory");
    resp_error(out, &err);
    return 1;
  }
  resp_json(out, 200, j);
  json_decref(j);
  return 1;
}

/* ---- workers ----------------------------------------------------------------- */

static void new_id(char out[33]) {
  unsigned char b[16];
  if (RAND_bytes(b, sizeof b) != 1) { /* never expected; ids must still differ */
    static _Atomic unsigned long long n;
    unsigned long long x = (unsigned long long)(md_now() * 1e9) ^ (++n * 0x9e3779b97f4a7c15ull);
    for (size_t i = 0; i < sizeof b; i++) b[i] = (unsigned char)(x >> (8 * (i % 8))) ^ (unsigned char)i;
  }
  static const char hex[] = "0123456789abcdef";
  for (int i = 0; i < 16; i++) {
    out[2 * i] = hex[b[i] >> 4];
    out[2 * i + 1] = hex[b[i] & 15];
  }
  out[32] = 0;
}

static void create(job *j) {
  ts_err err = {0};
  json_t *body = NULL;
  if (j->body && j->len) {
    body = oip_parse_json(j->body, j->len, j->srv->cfg->max_json_memory, &err);
    if (!body) goto fail;
    if (!json_is_object(body)) {
      ts_errf(&err, TS_EINVAL, "the body must be a JSON object (or empty): not an object");
      goto fail;
    }
  }
  const json_t *params = body ? json_object_get(body, "parameters") : NULL;
  if (params && !json_is_object(params)) {
    ts_errf(&err, TS_EINVAL, "'parameters' must be an object");
    goto fail;
  }
  const md_kind *k = repo_ver_kind(j->ver);
  if (params && server_check_params(k, MD_OP_SESSION_OPEN, repo_ver_model(j->ver), params, &err))
    goto fail;
  if (!k->session_open) {
    ts_errf(&err, TS_EINVAL, "model '%s' (kind %s) does not support sessions; only transformer "
            "models do", repo_ver_model(j->ver), k->name);
    goto fail;
  }
  ss_entry *e = tl_calloc(1, sizeof *e);
  if (!e) {
    ts_errf(&err, TS_ENOMEM, "out of memory");
    goto fail;
  }
  if (k->session_open(repo_ver_state(j->ver), params, &e->sess, &e->bytes, &err)) {
    tl_free(e);
    goto fail;
  }
  new_id(e->id);
  snprintf(e->model, sizeof e->model, "%s", repo_ver_model(j->ver));
  e->kind = k;
  e->ver = j->ver; /* the session pins the version: the job no longer releases it */
  j->ver = NULL;
  ss_once();
  uv_mutex_lock(&S.mu);
  e->last_used = md_now();
  push_front(e);
  ss_entry *victims = NULL;
  enforce_cap(&victims);
  json_t *ans = describe(e, e->last_used);
  if (ans) set_version(ans, e);
  uv_mutex_unlock(&S.mu);
  free_victims(victims);
  if (!ans) {
    ts_errf(&err, TS_ENOMEM, "out of memory");
    goto fail;
  }
  log_info("session %s opened on %s", e->id, e->model);
  resp_json(&j->out, 201, ans);
  json_decref(ans);
  if (body) json_decref(body);
  return;
fail:
  if (body) json_decref(body);
  resp_error(&j->out, &err);
}

static void delete(job *j) {
  ts_err err = {0};
  ss_once();
  uv_mutex_lock(&S.mu);
  ss_entry *e, *victims = NULL;
  int rc = lookup(j->rt.model, j->rt.session, md_now(), &e, &victims, &err);
  if (!rc) {
    unlink_entry(e);
    remember(e, "was deleted");
    if (e->busy) {
      e->doomed = 1; /* its worker frees it */
    } else {
      e->next = victims;
      victims = e;
    }
  }
  uv_mutex_unlock(&S.mu);
  free_victims(victims);
  if (rc) {
    resp_error(&j->out, &err);
    return;
  }
  json_t *o = json_object();
  resp_json(&j->out, 200, o);
  json_decref(o);
}

static void feed(job *j) {
  ts_err err = {0};
  oip_request req;
  md_call call;
  md_call_init(&call);
  memset(&req, 0, sizeof req);
  ts_list_init(&req.inputs);
  ss_once();
  uv_mutex_lock(&S.mu);
  ss_entry *e = NULL, *victims = NULL;
  int rc = lookup(j->rt.model, j->rt.session, md_now(), &e, &victims, &err);
  if (!rc && e->busy)
    rc = ts_errf(&err, TS_ECONFLICT, "session %s is busy with another request; send its chunks "
                 "one at a time", e->id);
  if (!rc) {
    e->busy = 1;
    e->last_used = md_now();
  }
  uv_mutex_unlock(&S.mu);
  free_victims(victims);
  victims = NULL;
  if (rc) {
    resp_error(&j->out, &err);
    return;
  }
  rc = job_decode(j, e->ver, 1, &req, &call, &err);
  if (!rc) {
    size_t bytes = e->bytes;
    rc = e->kind->session_infer(repo_ver_state(e->ver), e->sess, &call, &bytes, &err);
    uv_mutex_lock(&S.mu);
    if (!e->doomed) S.bytes = S.bytes - e->bytes + bytes;
    e->bytes = bytes;
    uv_mutex_unlock(&S.mu);
  }
  int64_t pos = e->kind->session_position(e->sess);
  if (!rc) {
    json_t *extra = json_pack("{s:s, s:I}", "session_id", e->id, "position", (json_int_t)pos);
    rc = extra ? job_encode(j, &req, &call, extra, &err)
               : ts_errf(&err, TS_ENOMEM, "out of memory");
    if (extra) json_decref(extra);
  }
  if (rc) resp_error(&j->out, &err);
  uv_mutex_lock(&S.mu);
  e->busy = 0;
  e->position = pos;
  e->last_used = md_now();
  if (e->doomed) {
    e->next = victims;
    victims = e;
  } else {
    unlink_entry(e); /* to the front: the most recently used */
    push_front(e);
    enforce_cap(&victims);
  }
  uv_mutex_unlock(&S.mu);
  free_victims(victims);
  md_call_free(&call);
  oip_request_free(&req);
}

void sessions_job(job *j) {
  if (j->rt.id == R_SESSIONS) {
    create(j);
  } else if (j->rt.id == R_SESSION_INFER) {
    feed(j);
  } else if (j->rt.id == R_SESSION && strcmp(j->method, "DELETE") == 0) {
    delete(j);
  } else { /* GET is answered on the loop thread */
    ts_err err;
    ts_errf(&err, TS_EINTERNAL, "route %s reached the session store", route_name(j->rt.id));
    resp_error(&j->out, &err);
  }
}
