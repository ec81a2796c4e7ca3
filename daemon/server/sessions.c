/* sessions.c - the KV-cache session endpoints (see sessions.h): JSON in and
 * out, the kind's session hooks, the pinned version; the store
 * (session_store.c) keeps everything else. */
#include "sessions.h"

#include <stdio.h>
#include <string.h>

#include "../base/log.h"
#include "../base/mem.h"
#include "../models/model.h"
#include "metrics.h"
#include "oip.h"
#include "server.h"
#include "session_store.h"

/* What the store keeps for each session. version is a copy, so that the
 * loop thread never reads through ver, which a worker may release. */
typedef struct sess_payload {
  repo_ver *ver;
  const md_kind *kind;
  void *sess;
  int64_t version;
} sess_payload;

static uv_once_t once = UV_ONCE_INIT;
static uv_mutex_t store_mu;
static ss_store *store;
static char replica[SS_PREFIX_MAX + 1]; /* this replica's id: the prefix of its session ids */

static void init_mu(void) {
  uv_mutex_init(&store_mu);
}

static void free_payload(void *p) {
  sess_payload *sp = p;
  if (sp->sess) sp->kind->session_free(sp->sess);
  if (sp->ver) repo_release(sp->ver);
}

static void on_change(int64_t count, uint64_t bytes, void *arg) {
  (void)arg;
  metrics_set_sessions(count, (int64_t)bytes);
}

static int open_store(int64_t ttl, int64_t cap, int64_t max, int reaper, ts_err *err) {
  ss_config c = {.limits = {.ttl_secs = (double)(ttl > 0 ? ttl : SESSIONS_DEFAULT_TTL_SECS),
                            .max_bytes = (uint64_t)(cap > 0 ? cap : SESSIONS_DEFAULT_CAP_BYTES),
                            .max_sessions = max > 0 ? max : SESSIONS_DEFAULT_MAX},
                 .payload_size = sizeof(sess_payload),
                 .free_payload = free_payload,
                 .on_change = on_change,
                 .reaper = reaper};
  snprintf(c.id_prefix, sizeof c.id_prefix, "%s", replica);
  return ss_open(&store, &c, err);
}

int sessions_set_replica(const char *id, ts_err *err) {
  uv_once(&once, init_mu);
  uv_mutex_lock(&store_mu);
  int rc = 0;
  if (store)
    rc = ts_errf(err, TS_EINVAL, "the session store is already open");
  else if (strlen(id) > SS_PREFIX_MAX || strchr(id, '.'))
    rc = ts_errf(err, TS_EINVAL, "replica id '%.80s': at most %d characters and no '.'", id,
                 SS_PREFIX_MAX);
  else
    snprintf(replica, sizeof replica, "%s", id);
  uv_mutex_unlock(&store_mu);
  return rc;
}

int sessions_configure(int64_t ttl_secs, int64_t cap_bytes, int64_t max_sessions, ts_err *err) {
  uv_once(&once, init_mu);
  uv_mutex_lock(&store_mu);
  int rc = store ? ts_errf(err, TS_EINVAL, "the session store is already open")
                 : open_store(ttl_secs, cap_bytes, max_sessions, 1, err);
  uv_mutex_unlock(&store_mu);
  return rc;
}

void sessions_shutdown(void) {
  uv_once(&once, init_mu);
  uv_mutex_lock(&store_mu);
  ss_close(store);
  store = NULL;
  uv_mutex_unlock(&store_mu);
}

static ss_store *the_store(ts_err *err) {
  uv_once(&once, init_mu);
  uv_mutex_lock(&store_mu);
  if (!store && open_store(0, 0, 0, 0, err)) store = NULL;
  ss_store *s = store;
  uv_mutex_unlock(&store_mu);
  return s;
}

void sessions_owner_bytes(void (*fn)(void *arg, const char *model, uint64_t bytes), void *arg) {
  ts_err err = {0};
  ss_store *s = the_store(&err);
  if (s) ss_owner_bytes(s, fn, arg);
}

/* ---- messages --------------------------------------------------------------- */

static int not_found(ss_store *s, const route *rt, ss_gone gone, ts_err *err) {
  ss_limits L = ss_get_limits(s);
  const char *id = rt->session;
  switch (gone) {
    case SS_EXPIRED:
      return ts_errf(err, TS_ENOTFOUND, "session %s expired after %.0f s idle (--session-ttl-secs)",
                     id, L.ttl_secs);
    case SS_EVICTED_BYTES:
      return ts_errf(err, TS_ENOTFOUND,
                     "session %s was evicted: the KV cache cap of %llu bytes "
                     "(--kv-cache-bytes) was reached",
                     id, (unsigned long long)L.max_bytes);
    case SS_EVICTED_COUNT:
      return ts_errf(err, TS_ENOTFOUND,
                     "session %s was evicted: the limit of %lld sessions "
                     "(--max-sessions) was reached",
                     id, (long long)L.max_sessions);
    case SS_DELETED: return ts_errf(err, TS_ENOTFOUND, "session %s was deleted", id);
    case SS_STOPPED: return ts_errf(err, TS_ENOTFOUND, "session %s ended: the daemon stopped", id);
    case SS_OTHER_OWNER:
      return ts_errf(err, TS_ENOTFOUND, "unknown session '%s' for model '%s'", id, rt->model);
    default: break;
  }
  /* An id made by another replica: say which one holds it, so that the
   * client (or whoever runs the balancer) knows the request was misrouted
   * rather than the session lost. */
  const char *dot = strchr(id, '.');
  if (dot && (strncmp(id, replica, (size_t)(dot - id)) != 0 || replica[dot - id] != 0))
    return ts_errf(err, TS_ENOTFOUND,
                   "session '%s' is held by replica '%.*s', not this one ('%s'): route a "
                   "session's requests by the replica part of its id, before the '.' "
                   "(docs/deployment.md, Scaling)",
                   id, (int)(dot - id), id, replica[0] ? replica : "(none)");
  switch (gone) {
    default: return ts_errf(err, TS_ENOTFOUND, "unknown session '%s'", id);
  }
}

static int refused(ss_store *s, const char *model, ss_full full, uint64_t need, ts_err *err) {
  ss_limits L = ss_get_limits(s);
  switch (full) {
    case SS_FULL_TOO_BIG:
      return ts_errf(err, TS_EUNAVAIL,
                     "a new session of model '%s' needs %llu bytes, more than "
                     "the KV cache cap of %llu bytes (--kv-cache-bytes)",
                     model, (unsigned long long)need, (unsigned long long)L.max_bytes);
    case SS_FULL_COUNT:
      return ts_errf(err, TS_EUNAVAIL,
                     "no room for a new session: %lld sessions are open "
                     "(--max-sessions) and every one is busy; retry shortly",
                     (long long)L.max_sessions);
    default:
      return ts_errf(err, TS_EUNAVAIL,
                     "no room for a new session of %llu bytes: busy sessions "
                     "hold the rest of the KV cache cap of %llu bytes (--kv-cache-bytes); retry "
                     "shortly",
                     (unsigned long long)need, (unsigned long long)L.max_bytes);
  }
}

static json_t *describe(const ss_info *in, const char *model, int64_t version) {
  char v[32];
  snprintf(v, sizeof v, "%lld", (long long)version);
  return json_pack("{s:s, s:s, s:s, s:I, s:I, s:f, s:b}", "session_id", in->id, "model_name", model,
                   "model_version", v, "position", (json_int_t)in->position, "memory_bytes",
                   (json_int_t)in->bytes, "expires_in_s", in->expires_in, "busy", in->busy);
}

static void answer(job *j, int status, json_t *o) {
  if (!o) {
    resp_errorf(&j->out, TS_ENOMEM, "out of memory");
    return;
  }
  resp_json(&j->out, status, o);
  json_decref(o);
}

/* ---- loop thread ------------------------------------------------------------ */

void ep_session_get(job *j) {
  ts_err err = {0};
  ss_store *s = the_store(&err);
  if (!s) {
    resp_error(&j->out, &err);
    return;
  }
  ss_info in;
  sess_payload p;
  ss_gone gone;
  if (ss_get(s, j->rt.model, j->rt.session, &in, &p, &gone)) {
    not_found(s, &j->rt, gone, &err);
    resp_error(&j->out, &err);
    return;
  }
  answer(j, 200, describe(&in, j->rt.model, p.version));
}

/* ---- workers ------------------------------------------------------------------ */

void ep_session_create(job *j) {
  ts_err err = {0};
  json_t *body = NULL;
  sess_payload p = {0};
  ss_store *s = the_store(&err);
  if (!s) goto fail;
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
    ts_errf(&err, TS_EINVAL,
            "model '%s' (kind %s) does not support sessions; only transformer "
            "models do",
            repo_ver_model(j->ver), k->name);
    goto fail;
  }
  size_t bytes = 0;
  if (k->session_open(repo_ver_state(j->ver), params, &p.sess, &bytes, &err)) goto fail;
  p.ver = j->ver;
  p.kind = k;
  p.version = repo_ver_version(j->ver);
  ss_info in;
  ss_full full;
  int rc = ss_create(s, j->rt.model, &p, bytes, &in, &full, &err);
  if (rc) {
    if (rc == -TS_EUNAVAIL) {
      refused(s, j->rt.model, full, bytes + ss_overhead(s, j->rt.model), &err);
      if (full != SS_FULL_TOO_BIG) j->out.retry_after = 1;
    }
    k->session_free(p.sess); /* never stored: still ours; the job releases the version */
    goto fail;
  }
  /* stored: the session owns the version reference now; from here on only
   * the copies in `in` are read, never the stored session, which another
   * worker may already be evicting */
  j->ver = NULL;
  log_info("session %s opened on %s", in.id, j->rt.model);
  answer(j, 201, describe(&in, j->rt.model, p.version));
  if (body) json_decref(body);
  return;
fail:
  if (body) json_decref(body);
  int retry = j->out.retry_after;
  resp_error(&j->out, &err);
  j->out.retry_after = retry;
}

void ep_session_delete(job *j) {
  ts_err err = {0};
  ss_store *s = the_store(&err);
  ss_gone gone;
  if (s && ss_delete(s, j->rt.model, j->rt.session, &gone)) not_found(s, &j->rt, gone, &err);
  if (err.status) {
    resp_error(&j->out, &err);
    return;
  }
  answer(j, 200, json_object());
}

void ep_session_infer(job *j) {
  ts_err err = {0};
  oip_request req;
  md_call call;
  md_call_init(&call);
  memset(&req, 0, sizeof req);
  ts_list_init(&req.inputs);
  ss_store *s = the_store(&err);
  ss_entry *e = NULL;
  void *pp = NULL;
  ss_info in;
  ss_gone gone;
  int rc = s ? ss_acquire(s, j->rt.model, j->rt.session, &e, &pp, &in, &gone) : -TS_ENOMEM;
  if (rc == -TS_ENOTFOUND)
    not_found(s, &j->rt, gone, &err);
  else if (rc == -TS_ECONFLICT)
    ts_errf(&err, TS_ECONFLICT,
            "session %s is busy with another request; send its chunks one at "
            "a time",
            j->rt.session);
  if (rc) {
    resp_error(&j->out, &err);
    return;
  }
  sess_payload *p = pp;
  size_t bytes = (size_t)in.payload_bytes;
  rc = job_decode(j, p->ver, (route_get(j->rt.id)->flags & RF_LIMITS) != 0, &req, &call, &err);
  if (!rc) {
    call.claim = &j->claim; /* the chunk commits only while its answer is wanted */
    rc = p->kind->session_infer(repo_ver_state(p->ver), p->sess, &call, &bytes, &err);
  }
  int64_t pos = p->kind->session_position(p->sess);
  if (!rc) {
    json_t *extra = json_pack("{s:s, s:I}", "session_id", in.id, "position", (json_int_t)pos);
    rc =
        extra ? job_encode(j, &req, &call, extra, &err) : ts_errf(&err, TS_ENOMEM, "out of memory");
    if (extra) json_decref(extra);
  }
  if (rc) resp_error(&j->out, &err);
  /* p may be freed from here on (deleted meanwhile, or evicted over the cap) */
  ss_release(s, e, pos, bytes);
  md_call_free(&call);
  oip_request_free(&req);
}
