/* batch.c - the dynamic batcher (batch.h).
 *
 * Invariants (under b->mu): `groups` lists the groups that still take
 * requests: OPEN (waiting for their delay or size) and QUEUED (a pool job
 * will run them). A group leaves the list when its job starts; from then on
 * only that job touches it. Every request in a group holds its job's
 * version reference, so the version outlives the group. */
#include "batch.h"

#include <stdlib.h>
#include <string.h>

#include "../base/log.h"
#include "../base/mem.h"
#include "../base/sbuf.h"
#include "../kernels/sgemm.h"
#include "../learn/learn.h"
#include "metrics.h"
#include "sched.h"

typedef struct bitem {
  job *j;
  oip_request req;
  md_call call;
  int64_t rows;
  struct bitem *next;
} bitem;

enum { G_OPEN, G_QUEUED };

typedef struct bgroup {
  const repo_ver *ver;
  char *key;
  const md_sched *sc;
  bitem *head, *tail;
  int64_t rows;
  int n, state;
  double due; /* md_now() when it is queued whatever its size */
  struct bgroup *next;
} bgroup;

struct batcher {
  server *s;
  uv_mutex_t mu;
  uv_cond_t cv;
  uv_thread_t timer;
  int stopping;
  bgroup *groups;
};

/* ---- one request's answer ------------------------------------------------ */

/* What run_model does after computing: the finite check and the encoding,
 * then the job goes back. Frees the item. */
static void finish_item(bitem *it, int rc, ts_err *err) {
  job *j = it->j;
  j->t_computed = md_now();
  if (!rc) rc = md_check_finite_outputs(&it->call, err);
  if (!rc) rc = job_encode(j, &it->req, &it->call, NULL, err);
  if (!rc) /* the served-row log and the candidate's shadow answer, as run_model's */
    learn_after_infer(j->srv->learn, j->ver, it->req.id ? it->req.id : j->request_id,
                      it->call.inputs, &it->call.outputs);
  if (rc) {
    if (err->status == TS_EINTERNAL) log_error("infer %s (batched): %s", j->rt.model, err->msg);
    resp_error(&j->out, err);
  }
  md_call_free(&it->call);
  oip_request_free(&it->req);
  tl_free(it);
  job_finish(j);
}

static void run_alone(bitem *it) {
  ts_err err = {0};
  const md_kind *k = repo_ver_kind(it->j->ver);
  int was = sg_row_invariant(1); /* the same sums as in any joint call */
  int rc = k->infer(repo_ver_state(it->j->ver), &it->call, &err);
  sg_row_invariant(was);
  finish_item(it, rc, &err);
}

/* ---- a group's joint call -------------------------------------------------- */

/* Concatenates every request's input `name` (the first request's order)
 * along the batch dimension into out. */
static int concat_inputs(const bgroup *g, ts_list *out, ts_err *err) {
  const ts_list *first = g->head->call.inputs;
  for (int i = 0; i < first->n; i++) {
    const ts_tensor *t0 = &first->items[i];
    int64_t shape[TS_MAXDIM];
    memcpy(shape, t0->shape, sizeof shape);
    shape[0] = g->rows;
    ts_tensor *t = ts_list_add(out);
    if (!t) return ts_errf(err, TS_ENOMEM, "out of memory");
    int rc = ts_alloc(t, t0->name, t0->dtype, t0->ndim, shape, err);
    if (rc) return rc;
    size_t off = 0;
    for (const bitem *it = g->head; it; it = it->next) {
      const ts_tensor *x = ts_list_find(it->call.inputs, t0->name);
      memcpy((char *)t->data + off, x->data, x->nbytes);
      off += x->nbytes;
    }
  }
  return 0;
}

/* Gives each request its rows of every output of the joint call. 0, or -1
 * when an output has no batch dimension of the group's rows (the caller
 * then runs each request alone). */
static int split_outputs(bgroup *g, const md_call *mc, ts_err *err) {
  for (int o = 0; o < mc->outputs.n; o++) {
    const ts_tensor *t = &mc->outputs.items[o];
    if (t->ndim < 1 || t->shape[0] != g->rows || t->dtype == TS_BYTES) return -1;
  }
  int64_t row0 = 0;
  for (bitem *it = g->head; it; it = it->next) {
    for (int o = 0; o < mc->outputs.n; o++) {
      const ts_tensor *t = &mc->outputs.items[o];
      size_t row_bytes = t->nbytes / (size_t)g->rows;
      int64_t shape[TS_MAXDIM];
      memcpy(shape, t->shape, sizeof shape);
      shape[0] = it->rows;
      ts_tensor *x = ts_list_add(&it->call.outputs);
      if (!x) return ts_errf(err, TS_ENOMEM, "out of memory");
      int rc = ts_alloc(x, t->name, t->dtype, t->ndim, shape, err);
      if (rc) return rc;
      memcpy(x->data, (const char *)t->data + (size_t)row0 * row_bytes,
             (size_t)it->rows * row_bytes);
    }
    it->call.infinite_ok = mc->infinite_ok;
    row0 += it->rows;
  }
  return 0;
}

static void run_group(void *arg) {
  bgroup *g = arg;
  batcher *b = g->head->j->srv->batcher;
  uv_mutex_lock(&b->mu); /* closed: no request joins it from here on */
  for (bgroup **pp = &b->groups; *pp; pp = &(*pp)->next)
    if (*pp == g) {
      *pp = g->next;
      break;
    }
  uv_mutex_unlock(&b->mu);
  metrics_batch(g->head->call.model_name, g->n, g->rows);
  bitem *it = g->head, *next;
  if (g->n > 1) {
    ts_err err = {0};
    ts_list in;
    ts_list_init(&in);
    md_call mc;
    md_call_init(&mc);
    const md_call *c0 = &g->head->call;
    mc.inputs = &in;
    mc.params = c0->params;
    mc.pool = c0->pool;
    mc.host = c0->host;
    mc.model_name = c0->model_name;
    mc.spans = c0->spans; /* hosted calls are traced once, with the first request */
    mc.version = c0->version;
    /* the latest deadline of its requests (each one's own is kept by the
     * transport's sweep, which answers 504 for it) */
    for (bitem *x = g->head; x; x = x->next) {
      if (x->call.deadline <= 0) {
        mc.deadline = 0;
        break;
      }
      if (x->call.deadline > mc.deadline) mc.deadline = x->call.deadline;
    }
    const md_kind *k = repo_ver_kind(g->head->j->ver);
    int rc = concat_inputs(g, &in, &err);
    if (!rc) {
      int was = sg_row_invariant(1); /* each row summed as when alone */
      rc = k->infer(repo_ver_state(g->head->j->ver), &mc, &err);
      sg_row_invariant(was);
    }
    if (!rc) rc = split_outputs(g, &mc, &err);
    md_call_free(&mc);
    ts_list_free(&in);
    if (!rc) {
      for (; it; it = next) {
        next = it->next;
        ts_err e = {0};
        finish_item(it, 0, &e);
      }
    }
    /* else: each request alone, so that each gets its own answer or error */
  }
  for (; it; it = next) {
    next = it->next;
    /* an output of another request's rows may have been added already */
    ts_list_free(&it->call.outputs);
    ts_list_init(&it->call.outputs);
    run_alone(it);
  }
  tl_free(g->key);
  tl_free(g);
}

/* Queues g's job (b->mu held). When the pool refuses (stopping), the
 * caller runs it: 1. */
static int queue_group(batcher *b, bgroup *g) {
  g->state = G_QUEUED;
  pool_q *q = pool_queue(b->s->pool, repo_ver_model(g->ver));
  if (q && pool_submit_q(b->s->pool, q, POOL_LANE_INFER, 0, run_group, g) == 0) return 0;
  return 1;
}

/* ---- offering ---------------------------------------------------------------- */

/* The group key: everything two requests must share to run as one call. */
static int make_key(const repo_ver *ver, const oip_request *req, sbuf *k) {
  sbuf_printf(k, "%p|", (const void *)ver);
  for (int i = 0; i < req->inputs.n; i++) {
    const ts_tensor *t = &req->inputs.items[i];
    if (t->ndim < 1 || t->dtype == TS_BYTES || t->shape[0] < 1 ||
        t->shape[0] != req->inputs.items[0].shape[0] ||
        t->nbytes != (size_t)ts_tensor_numel(t) * ts_dtype_size(t->dtype))
      return -1;
    sbuf_json_str(k, t->name);
    sbuf_printf(k, ":%d:%d", (int)t->dtype, t->ndim);
    for (int d = 1; d < t->ndim; d++) sbuf_printf(k, ",%lld", (long long)t->shape[d]);
    sbuf_adds(k, ";");
  }
  sbuf_printf(k, "|%d|", req->binary_default);
  for (int i = 0; i < req->n_outputs; i++) {
    sbuf_json_str(k, req->outputs[i].name);
    sbuf_printf(k, ":%d:%lld;", req->outputs[i].binary, (long long)req->outputs[i].class_count);
  }
  sbuf_adds(k, "|");
  if (req->params) {
    /* the parameters that change results: all but the scheduling ones */
    json_t *p = json_deep_copy(req->params);
    if (!p) return -1;
    json_object_del(p, "priority");
    json_object_del(p, "timeout");
    json_object_del(p, "timeout_ms");
    char *s = json_dumps(p, JSON_COMPACT | JSON_SORT_KEYS);
    json_decref(p);
    if (!s) return -1;
    sbuf_adds(k, s);
    free(s);
  }
  return sbuf_failed(k) ? -1 : 0;
}

static int is_preferred(const md_sched *sc, int64_t rows) {
  for (int i = 0; i < sc->n_preferred; i++)
    if (sc->preferred[i] == rows) return 1;
  return 0;
}

int batch_offer(job *j, oip_request *req, md_call *call) {
  batcher *b = j->srv->batcher;
  const md_sched *sc = repo_ver_sched(j->ver);
  if (!b || !sc->batching || req->inputs.n == 0) return 0;
  int64_t rows = req->inputs.items[0].ndim >= 1 ? req->inputs.items[0].shape[0] : 0;
  if (rows < 1 || rows > sc->max_batch_size) return 0;
  sbuf k;
  sbuf_init(&k);
  if (make_key(j->ver, req, &k)) {
    sbuf_free(&k);
    return 0;
  }
  size_t klen;
  char *key = sbuf_take(&k, &klen);
  bitem *it = tl_calloc(1, sizeof *it);
  if (!key || !it) {
    tl_free(key);
    tl_free(it);
    return 0;
  }
  it->j = j;
  it->rows = rows;
  it->req = *req;
  it->call = *call;
  it->call.inputs = &it->req.inputs;
  bgroup *run_now = NULL;
  uv_mutex_lock(&b->mu);
  if (b->stopping) { /* the timer is gone: an open group would never run */
    uv_mutex_unlock(&b->mu);
    tl_free(key);
    tl_free(it);
    return 0;
  }
  job_defer(j); /* the group's run finishes it */
  bgroup *g = b->groups;
  while (g &&
         !(g->ver == j->ver && g->rows + rows <= sc->max_batch_size && strcmp(g->key, key) == 0))
    g = g->next;
  if (g) {
    tl_free(key);
  } else if (!(g = tl_calloc(1, sizeof *g))) {
    uv_mutex_unlock(&b->mu);
    tl_free(key);
    tl_free(it);
    atomic_fetch_sub(&j->owners, 1); /* undo the defer: it runs alone */
    return 0;
  } else {
    g->ver = j->ver;
    g->key = key;
    g->sc = sc;
    g->state = G_OPEN;
    g->due = md_now() + (double)sc->max_queue_delay_us / 1e6;
    g->next = b->groups;
    b->groups = g;
  }
  if (g->tail)
    g->tail->next = it;
  else
    g->head = it;
  g->tail = it;
  g->rows += rows;
  g->n++;
  if (g->state == G_OPEN) {
    if (g->rows >= sc->max_batch_size || is_preferred(sc, g->rows) || sc->max_queue_delay_us == 0) {
      if (queue_group(b, g)) run_now = g; /* the pool is stopping: run it here */
    } else {
      uv_cond_signal(&b->cv); /* the timer learns of the new due time */
    }
  }
  uv_mutex_unlock(&b->mu);
  /* the request's own structures now belong to the item */
  memset(req, 0, sizeof *req);
  md_call_init(call);
  if (run_now) run_group(run_now);
  return 1;
}

/* ---- the timer ------------------------------------------------------------------ */

static void timer_main(void *arg) {
  batcher *b = arg;
  uv_mutex_lock(&b->mu);
  for (;;) {
    double now = md_now(), next_due = 0;
    bgroup *inline_run = NULL;
    for (bgroup *g = b->groups; g; g = g->next) {
      if (g->state != G_OPEN) continue;
      if (b->stopping || g->due <= now) {
        if (queue_group(b, g)) {
          inline_run = g;
          break;
        }
      } else if (next_due == 0 || g->due < next_due) {
        next_due = g->due;
      }
    }
    if (inline_run) { /* the pool is stopping: run it here */
      uv_mutex_unlock(&b->mu);
      run_group(inline_run);
      uv_mutex_lock(&b->mu);
      continue;
    }
    if (b->stopping) {
      int open = 0;
      for (bgroup *g = b->groups; g; g = g->next) open |= g->state == G_OPEN;
      if (!open) break;
      continue;
    }
    if (next_due > 0) {
      double wait = next_due - now;
      uint64_t ns = wait > 0 ? (uint64_t)(wait * 1e9) + 1 : 1;
      uv_cond_timedwait(&b->cv, &b->mu, ns);
    } else {
      uv_cond_wait(&b->cv, &b->mu);
    }
  }
  uv_mutex_unlock(&b->mu);
}

int batch_start(server *s, ts_err *err) {
  batcher *b = tl_calloc(1, sizeof *b);
  if (!b) return ts_errf(err, TS_ENOMEM, "out of memory");
  b->s = s;
  uv_mutex_init(&b->mu);
  uv_cond_init(&b->cv);
  if (uv_thread_create(&b->timer, timer_main, b) != 0) {
    uv_cond_destroy(&b->cv);
    uv_mutex_destroy(&b->mu);
    tl_free(b);
    return ts_errf(err, TS_EINTERNAL, "cannot start the batcher's timer thread");
  }
  s->batcher = b;
  return 0;
}

void batch_stop(server *s) {
  batcher *b = s->batcher;
  if (!b) return;
  uv_mutex_lock(&b->mu);
  b->stopping = 1;
  uv_cond_signal(&b->cv);
  uv_mutex_unlock(&b->mu);
  uv_thread_join(&b->timer);
  /* groups still QUEUED are run by the pool as it drains; they read
   * s->batcher, so it is freed after the pool (batch_free) */
}

void batch_free(server *s) {
  batcher *b = s->batcher;
  if (!b) return;
  s->batcher = NULL;
  uv_cond_destroy(&b->cv);
  uv_mutex_destroy(&b->mu);
  tl_free(b);
}
