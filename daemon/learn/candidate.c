/* candidate.c - refits into candidate versions, their shadow answers, and
 * the decision to promote or drop them (learn.h, docs/learning.md).
 *
 * A refit fits on the newest window of labelled rows (those whose inputs
 * have the shape of the newest labelled row) and saves the result as a
 * version whose version.json says "candidate": {"state": "pending", ...};
 * the repository never serves it (repo.h). While it is pending, every
 * logged request is answered by it too, as a pool job after the answer was
 * sent; a row labelled after both answers exist is scored for both. The
 * decision, once compare_rows such rows were scored:
 *   promote   when mean(candidate) <= mean(served) * (1 - margin)
 *   drop      when mean(candidate) >= mean(served) ("worse"), when after
 *             4 * compare_rows rows it is still not better by the margin,
 *             or when it is older than max_age_seconds
 * and it is written into the candidate's version.json (state "promoted" or
 * "dropped", the window, the rows compared, both scores, why) before a
 * promoted candidate is served by a rescan. A crash before that write
 * leaves it pending: at the next start the comparison starts again. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "../base/fsutil.h"
#include "../base/log.h"
#include "../base/mem.h"
#include "learn_int.h"

/* ---- the comparison --------------------------------------------------------- */

static void unscore_all(lmodel *m) {
  for (int64_t i = 0; i < m->count; i++) m->ring[(m->head + i) % m->cap]->scored = 0;
  m->n_cmp = 0;
  m->sum_served = m->sum_cand = 0;
}

void cand_score_row(lmodel *m, lrow *r) {
  if (!m->cand || !r->cand || r->cand_version != m->cand_version || !r->labelled) return;
  if (r->scored) { /* a later label for the id replaces the earlier one */
    m->sum_served -= r->loss_served;
    m->sum_cand -= r->loss_cand;
    m->n_cmp--;
    r->scored = 0;
  }
  double ls = lm_score(m, r->out, r->nout, r->label);
  double lc = lm_score(m, r->cand, r->nout, r->label);
  if (!isfinite(ls) || !isfinite(lc)) return;
  r->loss_served = ls;
  r->loss_cand = lc;
  r->scored = 1;
  m->sum_served += ls;
  m->sum_cand += lc;
  m->n_cmp++;
}

static void add_decision(lmodel *m, int64_t version, const char *decision, const char *why,
                         double served, double cand, int64_t rows) {
  if (m->n_decisions == L_DECISIONS) {
    memmove(m->decisions, m->decisions + 1, sizeof *m->decisions * (L_DECISIONS - 1));
    m->n_decisions--;
  }
  ldecision *d = &m->decisions[m->n_decisions++];
  d->version = version;
  snprintf(d->decision, sizeof d->decision, "%s", decision);
  snprintf(d->why, sizeof d->why, "%s", why);
  d->served = served;
  d->cand = cand;
  d->rows = rows;
  d->t = learn_wall();
}

/* Writes the decision into the candidate's version.json; a promotion is
 * then served by a rescan of the model. */
static void record(learn_t *L, const char *model, repo_ver *cv, int64_t version,
                   const char *decision, const char *why, const char *metric, double served,
                   double cand, int64_t rows) {
  const json_t *old = repo_ver_info(cv);
  json_t *info = old ? json_deep_copy(old) : json_object();
  if (!info) return;
  json_t *c = json_object_get(info, "candidate");
  if (!json_is_object(c)) {
    c = json_object();
    json_object_set_new(info, "candidate", c);
  }
  char ts[64];
  time_t now = time(NULL);
  struct tm tm;
  gmtime_r(&now, &tm);
  strftime(ts, sizeof ts, "%Y-%m-%dT%H:%M:%SZ", &tm);
  json_object_set_new(c, "state",
                      json_string(strcmp(decision, "promoted") == 0 ? "promoted" : "dropped"));
  json_object_set_new(c, "decision", json_string(decision));
  json_object_set_new(c, "why", json_string(why));
  json_object_set_new(c, "decided", json_string(ts));
  json_object_set_new(c, "compared_rows", json_integer(rows));
  json_object_set_new(c, "scores",
                      json_pack("{s:s, s:o, s:o}", "metric", metric, "served",
                                isfinite(served) ? json_real(served) : json_null(), "candidate",
                                isfinite(cand) ? json_real(cand) : json_null()));
  ts_err err = {0};
  int promote = strcmp(decision, "promoted") == 0;
  if (repo_rewrite_version_info(L->repo, model, version, info, promote, &err))
    log_error("model '%s': candidate %lld: the decision (%s) was not saved: %s", model,
              (long long)version, decision, err.msg);
  else
    log_info("model '%s': candidate version %lld %s: %s", model, (long long)version, decision, why);
  json_decref(info);
}

json_t *cand_decide(learn_t *L, lmodel *m) {
  pthread_mutex_lock(&m->mu);
  if (!m->cand) {
    pthread_mutex_unlock(&m->mu);
    return NULL;
  }
  const lc_config *c = &m->cfg;
  int64_t n = m->n_cmp;
  double ms = n ? m->sum_served / (double)n : NAN, mc = n ? m->sum_cand / (double)n : NAN;
  double age = learn_wall() - m->cand_created;
  const char *decision = NULL;
  char why[200];
  const char *metric = m->metric;
  if (n >= c->compare_rows && mc <= ms * (1 - c->margin)) {
    decision = "promoted";
    snprintf(why, sizeof why,
             "%s %.6g against the served %.6g on %lld fresh rows: better by more "
             "than the margin %g",
             metric, mc, ms, (long long)n, c->margin);
  } else if (n >= c->compare_rows && mc >= ms) {
    decision = "dropped";
    snprintf(why, sizeof why, "worse: %s %.6g against the served %.6g on %lld fresh rows", metric,
             mc, ms, (long long)n);
  } else if (n >= 4 * c->compare_rows) {
    decision = "dropped";
    snprintf(why, sizeof why, "not better by the margin %g after %lld rows: %s %.6g against %.6g",
             c->margin, (long long)n, metric, mc, ms);
  } else if (c->max_age_seconds > 0 && age > c->max_age_seconds) {
    decision = "dropped";
    snprintf(why, sizeof why, "too old: undecided after %.0f s (max_age_seconds %g) with %lld rows",
             age, c->max_age_seconds, (long long)n);
  }
  if (decision && strcmp(decision, "promoted") == 0) {
    /* a /fit since the refit serves a newer version: under a latest-N policy
     * the candidate would be saved as promoted and still not served */
    int64_t vs[16];
    int nv = repo_served_versions(L->repo, m->name, vs, 16);
    int64_t newest = nv > 0 ? vs[(nv < 16 ? nv : 16) - 1] : 0;
    if (newest > m->cand_version) {
      decision = "dropped";
      snprintf(why, sizeof why,
               "superseded: version %lld, newer than the candidate, is served since the refit "
               "(%s %.6g against %.6g on %lld rows)",
               (long long)newest, metric, mc, ms, (long long)n);
    }
  }
  if (!decision) {
    pthread_mutex_unlock(&m->mu);
    return NULL;
  }
  repo_ver *cv = m->cand;
  int64_t version = m->cand_version;
  m->cand = NULL;
  m->cand_version = 0;
  if (strcmp(decision, "promoted") == 0)
    m->promoted++;
  else
    m->dropped++;
  add_decision(m, version, decision, why, ms, mc, n);
  unscore_all(m);
  pthread_mutex_unlock(&m->mu);
  record(L, m->name, cv, version, decision, why, metric, ms, mc, n);
  repo_release(cv);
  char v[32];
  snprintf(v, sizeof v, "%lld", (long long)version);
  return json_pack("{s:s, s:s, s:s, s:s, s:I, s:o, s:o}", "version", v, "decision", decision, "why",
                   why, "metric", metric, "rows", (json_int_t)n, "served_score",
                   isfinite(ms) ? json_real(ms) : json_null(), "candidate_score",
                   isfinite(mc) ? json_real(mc) : json_null());
}

json_t *cand_state_json(lmodel *m) {
  if (!m->cand) return json_null();
  char v[32];
  snprintf(v, sizeof v, "%lld", (long long)m->cand_version);
  int64_t n = m->n_cmp;
  return json_pack("{s:s, s:f, s:I, s:I, s:I, s:o, s:o, s:f, s:f}", "version", v, "created",
                   m->cand_created, "window_rows", (json_int_t)m->cand_window, "compared_rows",
                   (json_int_t)n, "needed_rows", (json_int_t)m->cfg.compare_rows, "served_score",
                   n ? json_real(m->sum_served / (double)n) : json_null(), "candidate_score",
                   n ? json_real(m->sum_cand / (double)n) : json_null(), "margin", m->cfg.margin,
                   "max_age_seconds", m->cfg.max_age_seconds);
}

void cand_release(lmodel *m) {
  if (m->cand) repo_release(m->cand);
  m->cand = NULL;
}

/* ---- shadow answers ---------------------------------------------------------- */

typedef struct shadow_job {
  learn_t *L;
  lmodel *m;
  repo_ver *cv;
  int64_t version;
  ts_list inputs;
  char **ids;
  int64_t B;
} shadow_job;

static void shadow_free(shadow_job *j) {
  if (j->cv) repo_release(j->cv);
  ts_list_free(&j->inputs);
  for (int64_t b = 0; j->ids && b < j->B; b++) tl_free(j->ids[b]);
  tl_free(j->ids);
  tl_free(j);
}

static void shadow_run(void *arg) {
  shadow_job *j = arg;
  lmodel *m = j->m;
  md_call c;
  md_call_init(&c);
  c.inputs = &j->inputs;
  c.pool = j->L->pool;
  c.host = repo_host(j->L->repo);
  c.model_name = m->name;
  c.version = j->version;
  ts_err err = {0};
  const md_kind *k = repo_ver_kind(j->cv);
  float *out = NULL;
  int rc = k->infer(repo_ver_state(j->cv), &c, &err);
  const ts_tensor *o = rc ? NULL : ts_list_find(&c.outputs, m->lk->output);
  if (!rc && (!o || o->ndim < 1 || o->shape[0] != j->B)) rc = -TS_EINVAL;
  if (!rc) rc = ts_to_f32(o, 1, &out, &err);
  pthread_mutex_lock(&m->mu);
  if (rc) {
    m->shadow_failed += (uint64_t)j->B;
  } else if (m->cand_version == j->version) {
    int64_t nout = ts_tensor_numel(o) / j->B;
    for (int64_t b = 0; b < j->B; b++) {
      lrow *r = lm_find(m, j->ids[b]);
      if (!r || r->nout != nout) continue;
      float *v = tl_malloc(sizeof(float) * (size_t)nout);
      if (!v) continue;
      memcpy(v, out + b * nout, sizeof(float) * (size_t)nout);
      tl_free(r->cand);
      r->cand = v;
      r->cand_version = j->version;
      m->shadow_rows++;
      cand_score_row(m, r); /* its label may have come first */
    }
  }
  pthread_mutex_unlock(&m->mu);
  if (rc && err.msg[0])
    log_warn("model '%s': candidate %lld could not answer in the background: %s", m->name,
             (long long)j->version, err.msg);
  tl_free(out);
  md_call_free(&c);
  learn_t *L = j->L;
  shadow_free(j);
  /* off the request's path: a candidate whose labels came before its shadow
   * answers, or one grown too old, is decided here */
  json_t *d = cand_decide(L, m);
  if (d) json_decref(d);
  atomic_fetch_sub(&L->jobs, 1);
}

void cand_shadow(learn_t *L, lmodel *m, const ts_list *inputs, char **ids, int64_t B) {
  shadow_job *j = tl_calloc(1, sizeof *j);
  if (!j) goto skip;
  j->L = L;
  j->m = m;
  j->version = m->cand_version;
  j->B = B;
  ts_list_init(&j->inputs);
  if (!(j->ids = tl_calloc((size_t)B, sizeof(char *)))) goto fail;
  for (int64_t b = 0; b < B; b++)
    if (!(j->ids[b] = tl_strdup(ids[b]))) goto fail;
  for (int i = 0; i < inputs->n; i++) {
    const ts_tensor *t = &inputs->items[i];
    ts_tensor *d = ts_list_add(&j->inputs);
    if (!d || ts_alloc(d, t->name, t->dtype, t->ndim, t->shape, NULL) || d->nbytes != t->nbytes)
      goto fail;
    memcpy(d->data, t->data, t->nbytes);
  }
  repo_ver_retain(m->cand);
  j->cv = m->cand;
  atomic_fetch_add(&L->jobs, 1);
  /* background work: after every request waiting (the lowest level) */
  if (pool_submit_q(L->pool, NULL, POOL_LANE_INFER, POOL_LEVELS - 1, shadow_run, j) == 0) return;
  atomic_fetch_sub(&L->jobs, 1);
fail:
  shadow_free(j);
skip:
  m->shadow_skipped += (uint64_t)B;
}

/* ---- refits --------------------------------------------------------------------- */

/* The tensor section of a row, parsed. */
typedef struct tdesc {
  const char *name;
  uint8_t nl, dtype, nd;
  int64_t dims[TS_MAXDIM];
  uint32_t nbytes;
  const unsigned char *data;
} tdesc;

static int parse_tens(const unsigned char *p, size_t len, tdesc *t, int cap) {
  size_t off = 0;
  int n = 0;
  while (off < len) {
    if (n == cap || len - off < 3) return -1;
    tdesc *d = &t[n++];
    off++; /* role */
    d->nl = p[off++];
    if (len - off < (size_t)d->nl + 2) return -1;
    d->name = (const char *)p + off;
    off += d->nl;
    d->dtype = p[off++];
    d->nd = p[off++];
    if (d->nd >= TS_MAXDIM || d->dtype >= TS_DTYPE_COUNT || len - off < (size_t)d->nd * 8 + 4)
      return -1;
    memcpy(d->dims, p + off, (size_t)d->nd * 8);
    off += (size_t)d->nd * 8;
    memcpy(&d->nbytes, p + off, 4);
    off += 4;
    if (len - off < d->nbytes) return -1;
    d->data = p + off;
    off += d->nbytes;
  }
  return n;
}

static int same_shape(const tdesc *a, int na, const tdesc *b, int nb) {
  if (na != nb) return 0;
  for (int i = 0; i < na; i++)
    if (a[i].nl != b[i].nl || memcmp(a[i].name, b[i].name, a[i].nl) != 0 ||
        a[i].dtype != b[i].dtype || a[i].nd != b[i].nd || a[i].nbytes != b[i].nbytes ||
        memcmp(a[i].dims, b[i].dims, (size_t)a[i].nd * 8) != 0)
      return 0;
  return 1;
}

/* The window as request tensors: every input [W, ...] and the labels. */
static int build_window(lmodel *m, int64_t window, ts_list *list, int64_t *W, char *first_id,
                        char *last_id, size_t idn, ts_err *err) {
  enum { MAXT = 8 };
  tdesc sig[MAXT], cur[MAXT];
  int ns = -1;
  lrow **rows = tl_calloc((size_t)(window ? window : 1), sizeof *rows);
  if (!rows) return ts_errf(err, TS_ENOMEM, "out of memory");
  int64_t n = 0;
  for (int64_t i = m->count - 1; i >= 0 && n < window; i--) {
    lrow *r = m->ring[(m->head + i) % m->cap];
    if (!r->labelled || lm_find(m, r->id) != r) continue;
    if (ns < 0) {
      ns = parse_tens(r->tens, r->tens_len, sig, MAXT);
      if (ns < 1) {
        ns = -1;
        continue;
      }
    } else {
      int nc = parse_tens(r->tens, r->tens_len, cur, MAXT);
      if (!same_shape(sig, ns, cur, nc)) continue;
    }
    rows[n++] = r;
  }
  *W = n;
  int rc = 0;
  if (n == 0) goto out;
  snprintf(last_id, idn, "%s", rows[0]->id);
  snprintf(first_id, idn, "%s", rows[n - 1]->id);
  /* oldest first */
  for (int64_t i = 0; i < n / 2; i++) {
    lrow *t = rows[i];
    rows[i] = rows[n - 1 - i];
    rows[n - 1 - i] = t;
  }
  rc = learn_rows_tensors(m, rows, n, list, NULL, err);
out:
  tl_free(rows);
  return rc;
}

int learn_same_inputs(const lrow *a, const lrow *b) {
  enum { MAXT = 8 };
  tdesc x[MAXT], y[MAXT];
  int na = parse_tens(a->tens, a->tens_len, x, MAXT),
      nb = parse_tens(b->tens, b->tens_len, y, MAXT);
  return na >= 1 && same_shape(x, na, y, nb);
}

int learn_rows_tensors(lmodel *m, lrow **rows, int64_t n, ts_list *list, ts_list *served,
                       ts_err *err) {
  enum { MAXT = 8 };
  tdesc sig[MAXT], cur[MAXT];
  int ns = parse_tens(rows[0]->tens, rows[0]->tens_len, sig, MAXT);
  if (ns < 1) return ts_errf(err, TS_EINTERNAL, "a logged row has no inputs");
  int rc = 0;
  for (int t = 0; t < ns; t++) {
    int64_t shape[TS_MAXDIM];
    shape[0] = n;
    for (int d = 0; d < sig[t].nd; d++) shape[d + 1] = sig[t].dims[d];
    char name[256];
    memcpy(name, sig[t].name, sig[t].nl);
    name[sig[t].nl] = 0;
    ts_tensor *x = ts_list_add(list);
    if (!x) return ts_errf(err, TS_ENOMEM, "out of memory");
    if ((rc = ts_alloc(x, name, (ts_dtype)sig[t].dtype, sig[t].nd + 1, shape, err))) return rc;
  }
  int64_t shape[2] = {n, rows[0]->nout};
  ts_tensor *y = ts_list_add(list);
  int integer = m->lk->integer_labels;
  if (!y) return ts_errf(err, TS_ENOMEM, "out of memory");
  if ((rc = ts_alloc(y, m->lk->label_input, integer ? TS_INT64 : TS_FP64, 1, shape, err)))
    return rc;
  ts_tensor *o = NULL;
  if (served) {
    if (!(o = ts_list_add(served))) return ts_errf(err, TS_ENOMEM, "out of memory");
    if ((rc = ts_alloc(o, m->lk->output, TS_FP32, 2, shape, err))) return rc;
  }
  for (int64_t j = 0; j < n; j++) {
    lrow *r = rows[j];
    parse_tens(r->tens, r->tens_len, cur, MAXT);
    for (int t = 0; t < ns; t++)
      memcpy((unsigned char *)list->items[t].data + (size_t)j * cur[t].nbytes, cur[t].data,
             cur[t].nbytes);
    if (integer)
      ((int64_t *)y->data)[j] = (int64_t)r->label;
    else
      ((double *)y->data)[j] = r->label;
    if (o) memcpy((float *)o->data + j * r->nout, r->out, sizeof(float) * (size_t)r->nout);
  }
  return 0;
}

static int refit_core(learn_t *L, lmodel *m, repo_ver *ver, const json_t *params,
                      _Atomic int *claim, double deadline, const char *trigger, json_t **result,
                      ts_err *err) {
  ts_list list;
  ts_list_init(&list);
  int64_t W = 0;
  char first_id[256] = "", last_id[256] = "";
  pthread_mutex_lock(&m->mu);
  int64_t window = m->cfg.window_rows, min_rows = m->cfg.min_rows;
  int rc = build_window(m, window, &list, &W, first_id, last_id, sizeof first_id, err);
  pthread_mutex_unlock(&m->mu);
  if (rc) goto out;
  if (W < min_rows) {
    rc = ts_errf(err, TS_EINVAL,
                 "model '%s' has %lld labelled rows of one input shape in its log; a refit needs "
                 "at least %lld (refit.min_rows): send feedback for more served ids",
                 m->name, (long long)W, (long long)min_rows);
    goto out;
  }
  md_call c;
  md_call_init(&c);
  c.inputs = &list;
  c.params = params;
  c.pool = L->pool;
  c.host = repo_host(L->repo);
  c.deadline = deadline;
  c.claim = claim;
  c.model_name = m->name;
  c.version = repo_ver_version(ver);
  const md_kind *k = repo_ver_kind(ver);
  if ((rc = k->fit(repo_ver_state(ver), &c, err))) {
    ts_err_prefix(err, "refit on %lld rows", (long long)W);
    goto fail_call;
  }
  if (!c.new_version_info) c.new_version_info = json_object();
  json_t *cj =
      json_pack("{s:s, s:I, s:s, s:s, s:{s:I, s:s, s:s}}", "state", "pending", "served_version",
                (json_int_t)c.version, "trigger", trigger, "metric", m->metric, "window", "rows",
                (json_int_t)W, "first_id", first_id, "last_id", last_id);
  if (!cj || !c.new_version_info) {
    if (cj) json_decref(cj);
    rc = ts_errf(err, TS_ENOMEM, "out of memory");
    goto fail_call;
  }
  json_object_set_new(c.new_version_info, "candidate", cj);
  if (claim && (rc = md_claim(&c, err))) goto fail_call;
  int64_t nv;
  if ((rc = repo_commit_version(L->repo, ver, &c, &nv, err))) goto fail_call;
  repo_ver *cv;
  if ((rc = repo_load_unserved(L->repo, m->name, nv, &cv, err))) {
    ts_err_prefix(err, "candidate version %lld was saved but does not load", (long long)nv);
    goto fail_call;
  }
  pthread_mutex_lock(&m->mu);
  repo_ver *old = m->cand;
  int64_t old_v = m->cand_version;
  m->cand = cv;
  m->cand_version = nv;
  m->cand_created = learn_wall();
  m->cand_window = W;
  unscore_all(m);
  m->refits++;
  m->labels_since_refit = 0;
  m->last_refit = learn_mono();
  char why[200];
  if (old) {
    snprintf(why, sizeof why, "replaced by candidate %lld before a decision", (long long)nv);
    add_decision(m, old_v, "replaced", why, NAN, NAN, 0);
    m->dropped++;
  }
  pthread_mutex_unlock(&m->mu);
  if (old) {
    record(L, m->name, old, old_v, "replaced", why, m->metric, NAN, NAN, 0);
    repo_release(old);
  }
  char vs[32];
  snprintf(vs, sizeof vs, "%lld", (long long)nv);
  *result = json_pack("{s:s, s:I, s:I, s:s, s:O}", "candidate_version", vs, "served_version",
                      (json_int_t)c.version, "window_rows", (json_int_t)W, "trigger", trigger,
                      "fit", c.result ? c.result : json_null());
  log_info("model '%s': candidate version %lld fitted on %lld rows (%s)", m->name, (long long)nv,
           (long long)W, trigger);
  md_call_free(&c);
  goto out;
fail_call:
  md_call_free(&c);
  pthread_mutex_lock(&m->mu);
  m->refit_failures++;
  pthread_mutex_unlock(&m->mu);
out:
  ts_list_free(&list);
  return rc;
}

int learn_refit(learn_t *L, repo_ver *ver, const json_t *params, _Atomic int *claim,
                double deadline, json_t **result, ts_err *err) {
  const char *name = repo_ver_model(ver);
  lmodel *m = learn_model(L, ver);
  if (!m || !m->cfg.log)
    return ts_errf(err, TS_EINVAL,
                   "model '%s' has no logged rows to refit on: its kind is not ensemble or "
                   "quantile_ensemble, or its config.json has no \"log\"",
                   name);
  if (!repo_ver_kind(ver)->fit)
    return ts_errf(err, TS_EINVAL, "model '%s' does not support fit", name);
  /* no parameters: the policy's (refit.params), as a policy refit would */
  json_t *own = NULL;
  if (!params || json_object_size(params) == 0) {
    pthread_mutex_lock(&m->mu);
    own = m->cfg.params ? json_deep_copy(m->cfg.params) : NULL;
    pthread_mutex_unlock(&m->mu);
    params = own;
  }
  int rc = refit_core(L, m, ver, params, claim, deadline, "request", result, err);
  if (own) json_decref(own);
  return rc;
}

typedef struct policy_job {
  learn_t *L;
  lmodel *m;
  json_t *params;
  char trigger[96];
} policy_job;

static void policy_run(void *arg) {
  policy_job *p = arg;
  lmodel *m = p->m;
  repo_ver *ver;
  ts_err err = {0};
  json_t *res = NULL;
  if (repo_acquire(p->L->repo, m->name, 0, &ver, &err) == 0) {
    if (repo_fit_begin(p->L->repo, m->name, &err) == 0) {
      if (refit_core(p->L, m, ver, p->params, NULL, 0, p->trigger, &res, &err))
        log_warn("model '%s': policy refit: %s", m->name, err.msg);
      repo_fit_end(p->L->repo, m->name);
    }
    repo_release(ver);
  }
  if (res) json_decref(res);
  pthread_mutex_lock(&m->mu);
  m->refit_running = 0;
  if (err.msg[0]) m->last_refit = learn_mono(); /* not again at once */
  pthread_mutex_unlock(&m->mu);
  if (p->params) json_decref(p->params);
  learn_t *L = p->L;
  tl_free(p);
  atomic_fetch_sub(&L->jobs, 1);
}

void cand_policy(learn_t *L, lmodel *m) {
  pthread_mutex_lock(&m->mu);
  const lc_config *c = &m->cfg;
  double since = learn_mono() - m->last_refit;
  int due = c->refit && !m->refit_running && !m->cand && m->labelled >= c->min_rows &&
            ((c->every_rows > 0 && m->labels_since_refit >= c->every_rows) ||
             (c->every_seconds > 0 && since >= c->every_seconds && m->labels_since_refit > 0));
  if (!due) {
    pthread_mutex_unlock(&m->mu);
    return;
  }
  policy_job *p = tl_calloc(1, sizeof *p);
  if (!p) {
    pthread_mutex_unlock(&m->mu);
    return;
  }
  p->L = L;
  p->m = m;
  p->params = c->params ? json_deep_copy(c->params) : NULL;
  if (c->every_rows > 0 && m->labels_since_refit >= c->every_rows)
    snprintf(p->trigger, sizeof p->trigger, "policy: %lld new labelled rows (every_rows %lld)",
             (long long)m->labels_since_refit, (long long)c->every_rows);
  else
    snprintf(p->trigger, sizeof p->trigger,
             "policy: %.0f s since the last refit (every_seconds %g)", since, c->every_seconds);
  m->refit_running = 1;
  atomic_fetch_add(&L->jobs, 1);
  /* a fit: in the fit lane, under --fit-workers like every other */
  if (pool_submit_q(L->pool, NULL, POOL_LANE_FIT, 1, policy_run, p) != 0) {
    atomic_fetch_sub(&L->jobs, 1);
    m->refit_running = 0;
    if (p->params) json_decref(p->params);
    tl_free(p);
  }
  pthread_mutex_unlock(&m->mu);
}

void cand_resume(learn_t *L, lmodel *m) {
  char mdir[4096];
  snprintf(mdir, sizeof mdir, "%s/%s", repo_root(L->repo), m->name);
  int64_t *vs = NULL;
  int nv = 0;
  if (fs_list_versions(mdir, &vs, &nv, NULL)) return;
  for (int i = nv - 1; i >= 0; i--) {
    char path[4200];
    snprintf(path, sizeof path, "%s/%lld/version.json", mdir, (long long)vs[i]);
    char *text = NULL;
    size_t len;
    if (fs_read_file(path, 16u << 20, &text, &len, NULL)) continue;
    json_t *info = json_loadb(text, len, 0, NULL);
    tl_free(text);
    const char *state =
        json_string_value(json_object_get(json_object_get(info, "candidate"), "state"));
    int pending = state && strcmp(state, "pending") == 0;
    json_int_t W = json_integer_value(
        json_object_get(json_object_get(json_object_get(info, "candidate"), "window"), "rows"));
    if (info) json_decref(info);
    if (!pending) continue;
    repo_ver *cv;
    ts_err err = {0};
    if (repo_load_unserved(L->repo, m->name, vs[i], &cv, &err)) {
      log_warn("model '%s': pending candidate %lld does not load: %s", m->name, (long long)vs[i],
               err.msg);
      break;
    }
    pthread_mutex_lock(&m->mu);
    if (!m->cand) {
      m->cand = cv;
      m->cand_version = vs[i];
      m->cand_created = learn_wall();
      m->cand_window = W;
      cv = NULL;
    }
    pthread_mutex_unlock(&m->mu);
    if (cv)
      repo_release(cv);
    else
      log_info("model '%s': candidate version %lld is pending again; its comparison restarts",
               m->name, (long long)vs[i]);
    break;
  }
  tl_free(vs);
}
