/* sched.c - per-model queues, priorities, the fit lane and the per-model
 * gauges (sched.h). */
#include "sched.h"

#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "../base/mem.h"
#include "../base/zcodec.h"
#include "oip.h"
#include "sessions.h"

/* The longest JSON text read on the loop thread for a request's priority
 * and timeout; longer ones are read by their worker. */
#define SCHED_SCAN_MAX ((size_t)256 << 10)

void sched_init(server *s) {
  int n = pool_threads(s->pool);
  int64_t cap = s->cfg->fit_workers;
  if (cap < 0) cap = n / 2 > 0 ? n / 2 : 1;
  pool_lane_cap(s->pool, POOL_LANE_FIT, (int)cap);
}

/* Fits, evaluations and calibrations run in the fit lane. */
static int lane_of(int route_id) {
  int op = route_get(route_id)->op;
  return op == MD_OP_FIT || op == MD_OP_EVALUATE || op == MD_OP_CALIBRATE ? POOL_LANE_FIT
                                                                          : POOL_LANE_INFER;
}

/* The pool level of a request: its "priority" (1 first) when it names one,
 * clamped to the model's levels (the worker refuses one above them), else
 * the model's default level. */
static int level_of(const oip_scanned *p, const md_sched *sc) {
  if (!p->has_priority || p->priority == 0) return sc->default_priority_level;
  return p->priority > sc->priority_levels ? sc->priority_levels : (int)p->priority;
}

int sched_submit(server *s, job *j, void (*run)(void *), ts_err *err) {
  const route_def *d = route_get(j->rt.id);
  md_sched defaults;
  memset(&defaults, 0, sizeof defaults);
  defaults.priority_levels = 3;
  defaults.default_priority_level = 2;
  const md_sched *sc = j->ver ? repo_ver_sched(j->ver) : &defaults;
  /* the parameters the scheduler needs, read ahead of decoding on the loop
   * thread; a compressed body, or a JSON text over SCHED_SCAN_MAX, is read
   * by its worker instead (sched_requeue): it waits at the best level for
   * that, then goes back to its place at its own level */
  size_t text = j->json_len ? j->json_len : j->len;
  int has_params = d->op != OP_NONE && j->body;
  int deferred = has_params && j->ver && (j->req_coding != ZC_IDENTITY || text > SCHED_SCAN_MAX);
  oip_scanned p = {0};
  if (has_params && !deferred && j->req_coding == ZC_IDENTITY) oip_scan_params(j->body, text, &p);
  int64_t timeout_ms =
      sc->default_timeout_ms > 0 ? sc->default_timeout_ms : s->cfg->request_timeout_ms;
  if (p.timeout_s > 0)
    atomic_store(&j->deadline, j->t_submit + p.timeout_s);
  else if (timeout_ms > 0 && (d->flags & RF_DEADLINE))
    atomic_store(&j->deadline, j->t_submit + (double)timeout_ms / 1000.0);
  /* a queue of its own for a model the repository serves (a name in a URL
   * that names no model must not make one: the table would grow) */
  const char *name = j->ver ? repo_ver_model(j->ver) : j->rt.model;
  int64_t any;
  pool_q *q = NULL;
  if (j->ver || (name[0] && repo_served_versions(s->repo, name, &any, 1) > 0))
    q = pool_queue(s->pool, name);
  int rc;
  j->place = 0;
  if (!q) {
    rc = pool_submit(s->pool, run, j);
  } else {
    if (j->ver) pool_queue_limits(s->pool, q, sc->max_concurrency, sc->max_queue_size);
    if (deferred)
      rc = pool_submit_at(s->pool, q, lane_of(j->rt.id), 1, &j->place, run, j);
    else
      rc = pool_submit_q(s->pool, q, lane_of(j->rt.id), level_of(&p, sc), run, j);
  }
  if (rc == POOL_QFULL)
    return ts_errf(err, TS_EBUSY,
                   "model '%s' already has %d requests waiting (its scheduling.max_queue_size); "
                   "retry shortly",
                   name, sc->max_queue_size);
  if (rc == -TS_EBUSY)
    return ts_errf(err, TS_EBUSY, "the work queue is full (%d waiting); retry shortly",
                   (int)s->cfg->queue_depth);
  if (rc) return ts_errf(err, -rc, "the daemon is shutting down");
  return 0;
}

int sched_requeue(server *s, job *j, void (*run)(void *)) {
  if (!j->place || !j->ver || !j->body) return 0;
  const md_sched *sc = repo_ver_sched(j->ver);
  oip_scanned p = {0};
  oip_scan_params(j->body, j->json_len ? j->json_len : j->len, &p);
  if (p.timeout_s > 0) atomic_store(&j->deadline, j->t_submit + p.timeout_s);
  int level = level_of(&p, sc);
  uint64_t place = j->place;
  j->place = 0; /* once */
  pool_q *q = pool_queue(s->pool, repo_ver_model(j->ver));
  if (level <= 1 || !q) return 0; /* it is at the best level already: run it */
  return pool_submit_at(s->pool, q, lane_of(j->rt.id), level, &place, run, j) == 0;
}

int sched_check_priority(const repo_ver *ver, const json_t *params, ts_err *err) {
  json_t *v = params ? json_object_get(params, "priority") : NULL;
  if (!v || !json_is_integer(v)) return 0; /* oip.c checks the type */
  const md_sched *sc = repo_ver_sched(ver);
  if (json_integer_value(v) > sc->priority_levels)
    return ts_errf(err, TS_EINVAL,
                   "parameter 'priority' must be in [0, %d] for model '%s' (1 is taken first; 0: "
                   "the model's default, %d; config.json scheduling.priority_levels)",
                   sc->priority_levels, repo_ver_model(ver), sc->default_priority_level);
  return 0;
}

/* ---- KV-cache bytes per model ------------------------------------------- */

typedef struct kv_slot {
  atomic_llong bytes;
  struct kv_slot *next;
  char model[];
} kv_slot;

static uv_once_t kv_once = UV_ONCE_INIT;
static uv_mutex_t kv_mu;
static kv_slot *kv_slots;

static void kv_init(void) {
  uv_mutex_init(&kv_mu);
}

atomic_llong *sched_kv_slot(const char *model) {
  uv_once(&kv_once, kv_init);
  uv_mutex_lock(&kv_mu);
  kv_slot *k = kv_slots;
  while (k && strcmp(k->model, model) != 0) k = k->next;
  if (!k) {
    size_t n = strlen(model) + 1;
    /* plain malloc: it lives as long as the process, outside tl_ accounting */
    k = calloc(1, sizeof *k + n);
    if (k) {
      memcpy(k->model, model, n);
      k->next = kv_slots;
      kv_slots = k;
    }
  }
  uv_mutex_unlock(&kv_mu);
  return k ? &k->bytes : NULL;
}

/* ---- gauges --------------------------------------------------------------- */

typedef struct model_kv {
  char *model;
  long long bytes;
} model_kv;

typedef struct kv_sum {
  model_kv *v;
  int n, cap;
} kv_sum;

static void kv_add(kv_sum *a, const char *model, long long bytes) {
  for (int i = 0; i < a->n; i++)
    if (strcmp(a->v[i].model, model) == 0) {
      a->v[i].bytes += bytes;
      return;
    }
  if (a->n == a->cap) {
    int cap = a->cap ? 2 * a->cap : 16;
    model_kv *nv = tl_realloc(a->v, (size_t)cap * sizeof *nv);
    if (!nv) return;
    a->v = nv;
    a->cap = cap;
  }
  if (!(a->v[a->n].model = tl_strdup(model))) return;
  a->v[a->n++].bytes = bytes;
}

static void kv_session(void *arg, const char *model, uint64_t bytes) {
  kv_add(arg, model, (long long)bytes);
}

/* A label value: backslash, quote and newline escaped (text format 0.0.4). */
static void label(sbuf *b, const char *v) {
  for (; *v; v++) {
    if (*v == '\\' || *v == '"')
      sbuf_printf(b, "\\%c", *v);
    else if (*v == '\n')
      sbuf_adds(b, "\\n");
    else
      sbuf_add(b, v, 1);
  }
}

static void head(sbuf *b, const char *name, const char *help) {
  sbuf_printf(b, "# HELP %s %s\n# TYPE %s gauge\n", name, help, name);
}

typedef struct q_line {
  sbuf *b;
  int running; /* which figure this pass writes */
} q_line;

static void queue_line(void *arg, const char *name, int queued, int running) {
  q_line *l = arg;
  sbuf_printf(l->b, "%s{model=\"",
              l->running ? "tallyd_model_running_requests" : "tallyd_model_queued_requests");
  label(l->b, name);
  sbuf_printf(l->b, "\"} %d\n", l->running ? running : queued);
}

void sched_render(sbuf *b, server *s) {
  head(b, "tallyd_model_queued_requests",
       "requests of the model waiting for a worker (scale on this: KEDA, HPA)");
  q_line l = {b, 0};
  pool_queue_foreach(s->pool, queue_line, &l);
  head(b, "tallyd_model_running_requests", "requests of the model running on workers");
  l.running = 1;
  pool_queue_foreach(s->pool, queue_line, &l);
  head(b, "tallyd_fit_lane_workers",
       "most workers fits, evaluations and calibrations take at once (--fit-workers; 0: no cap)");
  sbuf_printf(b, "tallyd_fit_lane_workers %d\n", pool_lane_cap_get(s->pool, POOL_LANE_FIT));
  kv_sum a = {0};
  uv_once(&kv_once, kv_init);
  uv_mutex_lock(&kv_mu);
  for (kv_slot *k = kv_slots; k; k = k->next) kv_add(&a, k->model, atomic_load(&k->bytes));
  uv_mutex_unlock(&kv_mu);
  sessions_owner_bytes(kv_session, &a);
  head(b, "tallyd_model_kv_cache_bytes",
       "KV-cache bytes the model's sessions and generations hold");
  for (int i = 0; i < a.n; i++) {
    sbuf_printf(b, "tallyd_model_kv_cache_bytes{model=\"");
    label(b, a.v[i].model);
    sbuf_printf(b, "\"} %lld\n", a.v[i].bytes);
  }
  head(b, "tallyd_model_kv_cache_utilization",
       "the model's KV-cache bytes over --kv-cache-bytes, the budget all models share (0 to 1)");
  double cap = (double)s->cfg->kv_cache_bytes;
  for (int i = 0; i < a.n; i++) {
    sbuf_printf(b, "tallyd_model_kv_cache_utilization{model=\"");
    label(b, a.v[i].model);
    sbuf_printf(b, "\"} %.6g\n", cap > 0 ? (double)a.v[i].bytes / cap : 0.0);
    tl_free(a.v[i].model);
  }
  tl_free(a.v);
}
