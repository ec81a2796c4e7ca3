/* quantile_fit.c - the quantile_ensemble kind learning: fit (a new
 * aggregator) and calibrate (conformal corrections), and the new versions
 * they write (see quantile.c). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "../base/hash.h"
#include "../base/jtext.h"
#include "../base/mem.h"
#include "../base/safetensors.h"
#include "../kernels/sgemm.h"
#include "../methods/qagg.h"
#include "../methods/qlive.h"
#include "model.h"
#include "quantile_int.h"

/* ---- new versions ------------------------------------------------------- */

/* A writer holding the aggregator params p, the linear bases and, when
 * given, conformal corrections; metadata records the aggregator settings. */
static int new_writer(const qk_state *s, const qa_params *p, const qk_agg *a, int D,
                      const double *lo, const double *hi, const char *conf_method, st_writer **out,
                      ts_err *err) {
  st_writer *w = st_writer_new();
  if (!w) return ts_errf(err, TS_ENOMEM, "out of memory");
  int rc = 0;
  for (int i = 0; i < p->ntensors && !rc; i++)
    rc = st_writer_add(w, p->t[i].name, TS_FP32, p->t[i].ndim, p->t[i].shape, p->t[i].data, err);
  for (int j = 0; j < s->M && !rc; j++) {
    const qk_base *b = &s->bases[j];
    if (b->kind != QB_LINEAR) continue;
    char n[QK_NAME_MAX + 32];
    snprintf(n, sizeof n, "bases.%s.weight", b->name);
    rc = st_writer_add(w, n, TS_FP32, 2, b->w.shape, b->w.data, err);
    snprintf(n, sizeof n, "bases.%s.bias", b->name);
    if (!rc) rc = st_writer_add(w, n, TS_FP32, 1, b->b.shape, b->b.data, err);
  }
  if (!rc && lo) {
    float *f = tl_malloc((size_t)s->K * 2 * sizeof(float));
    int64_t sh[1] = {s->K};
    if (!f) rc = ts_errf(err, TS_ENOMEM, "out of memory");
    for (int k = 0; f && k < s->K; k++) {
      f[k] = (float)lo[k];
      f[s->K + k] = (float)hi[k];
    }
    if (!rc) rc = st_writer_add(w, "conformal.lower", TS_FP32, 1, sh, f, err);
    if (!rc) rc = st_writer_add(w, "conformal.upper", TS_FP32, 1, sh, f + s->K, err);
    if (!rc) rc = st_writer_meta(w, "conformal", conf_method, err);
    tl_free(f);
  }
  json_t *aj = qk_agg_json(a, a->scope == QA_LOCAL ? D : 0);
  char *txt = aj ? jtext_dumps(aj, JT_COMPACT | JT_SORT_KEYS, NULL) : NULL;
  json_decref(aj);
  if (!rc)
    rc = txt ? st_writer_meta(w, "aggregator", txt, err) : ts_errf(err, TS_ENOMEM, "out of memory");
  free(txt); /* jansson's allocator is tl_malloc's, whose free is free(3) */
  if (rc) {
    st_writer_free(w);
    return rc;
  }
  *out = w;
  return 0;
}

/* A nested JSON array of float values with the given shape (1 or 2 dims). */
static json_t *array_json(const float *v, int ndim, const int64_t *shape) {
  json_t *a = json_array();
  if (ndim == 1) {
    for (int64_t i = 0; i < shape[0]; i++) json_array_append_new(a, qk_jnum(v[i]));
    return a;
  }
  for (int64_t i = 0; i < shape[0]; i++)
    json_array_append_new(a, array_json(v + i * shape[1], 1, shape + 1));
  return a;
}

/* "weights" of a qk_fit answer: the learned arrays when small, always the
 * share of each base (global) or the tensor shapes (local). */
static json_t *weights_json(const qk_state *s, const qa_spec *sp, const qa_params *p) {
  json_t *o =
      json_pack("{s:s, s:s, s:b, s:I}", "granularity", qa_granularity_name(sp->gran), "scope",
                qk_scope_name(sp->scope), "simplex", sp->simplex, "parameters", (json_int_t)p->n);
  if (sp->scope == QA_LOCAL) {
    json_t *t = json_object();
    for (int i = 0; i < p->ntensors; i++) {
      json_t *sh = json_array();
      for (int d = 0; d < p->t[i].ndim; d++)
        json_array_append_new(sh, json_integer(p->t[i].shape[d]));
      json_object_set_new(t, p->t[i].name, sh);
    }
    json_object_set_new(o, "tensors", t);
    return o;
  }
  int64_t L = p->n, K = s->K;
  double *W = tl_malloc((size_t)L * sizeof(double));
  if (W && qa_global_weights(sp, p, W, NULL) == 0) {
    json_t *share = json_object();
    for (int j = 0; j < s->M; j++) {
      double acc = 0.0;
      if (sp->gran == QA_COARSE)
        acc = W[j];
      else if (sp->gran == QA_MEDIUM)
        for (int64_t k = 0; k < K; k++) acc += W[j * K + k] / (double)K;
      else
        for (int64_t l = 0; l < K; l++)
          for (int64_t k = 0; k < K; k++) acc += W[(j * K + l) * K + k] / (double)K;
      json_object_set_new(share, s->bases[j].name, qk_jnum(acc));
    }
    json_object_set_new(o, "base_share", share);
    if (L <= QK_MAX_WEIGHTS_JSON) {
      const qa_tensor *t = &p->t[0];
      json_object_set_new(o, "logits", array_json(p->data, t->ndim, t->shape));
      float *wf = tl_malloc((size_t)L * sizeof(float));
      if (wf) {
        for (int64_t i = 0; i < L; i++) wf[i] = (float)W[i];
        json_object_set_new(o, "weights", array_json(wf, t->ndim, t->shape));
        tl_free(wf);
      }
    }
  }
  tl_free(W);
  return o;
}

/* ---- qk_fit ---------------------------------------------------------------- */

/* The uniform blend Q [B, K]: at each level the plain mean of the bases'
 * values (what zero logits give a global simplex coarse or medium
 * aggregator), then the model's monotone step, as a version with those
 * weights would serve it. The yardstick a learned aggregator must beat. */
static int uniform_predict(const qk_state *s, pool_t *pool, const qk_rows *r, float *Q,
                           ts_err *err) {
  int64_t MK = (int64_t)s->M * s->K;
  for (int64_t i = 0; i < r->B; i++)
    for (int k = 0; k < s->K; k++) {
      double acc = 0.0;
      for (int j = 0; j < s->M; j++) acc += r->Z[i * MK + (int64_t)j * s->K + k];
      Q[i * s->K + k] = (float)(acc / s->M);
    }
  return qa_monotone_rows(pool, s->mono, r->B, s->K, s->median, Q, err);
}

/* Aggregator settings of a qk_fit: the version's, overridden by
 * parameters.aggregator {...} and by the flat keys (one way per key). */
int qk_fit_agg(const qk_state *s, const json_t *params, qk_agg *a, ts_err *err) {
  static const char *const flat[] = {"granularity", "scope", "simplex", "hidden", "depth"};
  *a = s->agg;
  json_t *nested = params ? json_object_get(params, "aggregator") : NULL;
  int rc;
  if (nested && (rc = qk_agg_parse(nested, a, "parameters", 0, NULL, err))) return rc;
  json_t *f = json_object();
  if (!f) return ts_errf(err, TS_ENOMEM, "out of memory");
  for (int i = 0; i < 5; i++) {
    json_t *v = params ? json_object_get(params, flat[i]) : NULL;
    if (!v) continue;
    if (nested && json_object_get(nested, flat[i])) {
      json_decref(f);
      return ts_errf(err, TS_EINVAL, "parameters: '%s' is given both flat and inside 'aggregator'",
                     flat[i]);
    }
    json_object_set(f, flat[i], v);
  }
  rc = qk_agg_parse(f, a, "parameters", 0, NULL, err);
  json_decref(f);
  return rc;
}

int qk_fit_opts(const json_t *p, qa_fit_opts *o, int *warm, ts_err *err) {
  qa_fit_opts_default(o);
  int64_t ep, bs, pat, seed;
  int rc;
  if ((rc = md_param_int(p, "epochs", o->epochs, &ep, err)) ||
      (rc = md_param_int(p, "batch_size", o->batch_size, &bs, err)) ||
      (rc = md_param_int(p, "patience", o->patience, &pat, err)) ||
      (rc = md_param_int(p, "seed", 0, &seed, err)) ||
      (rc = md_param_double(p, "learning_rate", o->learning_rate, &o->learning_rate, err)) ||
      (rc = md_param_double(p, "weight_decay", o->weight_decay, &o->weight_decay, err)) ||
      (rc = md_param_double(p, "dropout", o->dropout, &o->dropout, err)) ||
      (rc = md_param_double(p, "lambda", o->lambda, &o->lambda, err)) ||
      (rc = md_param_double(p, "margin", o->margin, &o->margin, err)) ||
      (rc = md_param_double(p, "validation_fraction", o->validation_fraction,
                            &o->validation_fraction, err)) ||
      (rc = md_param_bool(p, "warm_start", 0, warm, err)))
    return rc;
  if (ep < 1 || ep > 1000000)
    return ts_errf(err, TS_EINVAL, "parameter 'epochs' must be in [1, 1000000]");
  if (bs < 1 || bs > (1 << 30))
    return ts_errf(err, TS_EINVAL, "parameter 'batch_size' must be in [1, 2^30]");
  if (seed < 0) return ts_errf(err, TS_EINVAL, "parameter 'seed' must be >= 0");
  /* ReLU(q_k - q_k' + margin) with margin < 0 would let levels cross by up
   * to |margin| unpenalised: the opposite of a non-crossing penalty */
  if (!(o->margin >= 0.0))
    return ts_errf(err, TS_EINVAL,
                   "parameter 'margin' must be >= 0 (the gap the non-crossing "
                   "penalty asks between neighbouring levels), got %g",
                   o->margin);
  if (pat > 1000000) pat = 1000000;
  o->epochs = (int)ep;
  o->batch_size = (int)bs;
  o->patience = (int)(pat < 0 ? 0 : pat);
  o->seed = (uint64_t)seed;
  return 0;
}

static int fit_on_epoch(void *arg, int epoch, ts_err *err) {
  (void)epoch;
  return md_check_deadline(arg, err);
}

int qk_fit(void *state, md_call *c, ts_err *err) {
  qk_state *s = state;
  qk_agg a;
  qa_fit_opts o;
  int warm;
  int rc = qk_fit_agg(s, c->params, &a, err);
  if (!rc) rc = qk_fit_opts(c->params, &o, &warm, err);
  if (rc) return rc;
  /* the new aggregator's D: the model's, or the request's width when the
   * model has none yet (an all-external model turning local) */
  int needD = a.scope == QA_LOCAL ? (s->D ? s->D : -1) : 0;
  if (s->agg.scope == QA_LOCAL && !needD) needD = s->D; /* "before" needs them too */
  qk_rows r;
  if ((rc = qk_gather(s, c, 1, needD, &r, err))) return rc;
  int D = s->D ? s->D : r.D;
  qa_spec sp;
  qk_spec_of(s, &a, D, &sp);
  qa_params p;
  memset(&p, 0, sizeof p);
  qa_fit_report rep;
  memset(&rep, 0, sizeof rep);
  qa_infer nf;
  memset(&nf, 0, sizeof nf);
  json_t *metrics = json_object(), *mj = NULL;
  float *Q = tl_malloc((size_t)(r.B * s->K) * sizeof(float));
  qk_score s_after, s_val, best;
  const char *bn;
  if (!Q || !metrics) {
    rc = ts_errf(err, TS_ENOMEM, "out of memory");
    goto out;
  }
  if ((rc = qa_params_init(&p, &sp, o.seed, err))) goto out;
  if (warm && qk_agg_equal(&a, &s->agg))
    memcpy(p.data, s->params.data, (size_t)p.n * sizeof(float));
  /* the deadline (or an abandoned request) stops the qk_fit between epochs, so
   * a worker and the model's qk_fit claim are not held long after the 504 */
  if ((rc = md_check_deadline(c, err))) goto out;
  o.on_epoch = fit_on_epoch;
  o.on_epoch_arg = c;
  if ((rc = qa_fit(c->pool, &sp, &p, r.B, r.Z, r.X, r.y, &o, &rep, err))) goto out;
  if ((rc = md_check_deadline(c, err))) goto out;
  /* A qk_fit that diverged (a learning rate far too large) leaves weights or
   * outputs that are not finite: refuse it here, before a version is
   * written that would fail to qk_load or, worse, qk_load and serve NaN. */
  for (int64_t i = 0; i < p.n; i++)
    if (!isfinite(p.data[i])) {
      rc = ts_errf(err, TS_EINVAL,
                   "fit diverged: weight %lld is not finite; lower "
                   "'learning_rate' (%g)",
                   (long long)i, o.learning_rate);
      goto out;
    }
  /* Every block is scored on qa_fit's own split (rep.rows: the training
   * rows, then the validation rows early stopping measured): before and
   * after on the training rows, validation on the held-out ones, and the
   * yardsticks (uniform, each base) on the held-out rows too, or on the
   * training rows when none were held out, so that they compare with
   * `validation` (or with `after`). */
  const int64_t *tr = rep.rows, *va = rep.rows + rep.n_train;
  const int64_t *cmp = rep.n_val ? va : tr;
  int64_t n_cmp = rep.n_val ? rep.n_val : rep.n_train;
  /* before: this version as it serves (corrections included) */
  if ((rc = qk_predict(s, c->pool, &r, 1, Q, err)) ||
      (rc = qk_metrics_rows(s, tr, rep.n_train, Q, r.y, &mj, NULL, err)))
    goto out;
  json_object_set_new(metrics, "before", mj);
  if ((rc = uniform_predict(s, c->pool, &r, Q, err)) ||
      (rc = qk_metrics_rows(s, cmp, n_cmp, Q, r.y, &mj, NULL, err)))
    goto out;
  json_object_set_new(metrics, "uniform", mj);
  if ((rc = qk_bases_json(s, &r, cmp, n_cmp, metrics, &best, &bn, err))) goto out;
  /* after: the new version's output (no conformal: a qk_fit drops it) */
  if ((rc = qa_infer_init(&nf, &sp, &p, err)) ||
      (rc = qa_infer_run(c->pool, &nf, r.B, r.Z, r.X, Q, err)))
    goto out;
  for (int64_t i = 0; i < r.B * s->K; i++)
    if (!isfinite(Q[i])) {
      rc = ts_errf(err, TS_EINVAL,
                   "fit diverged: the fitted aggregator's quantile %lld of row "
                   "%lld is not finite; lower 'learning_rate' (%g)",
                   (long long)(i % s->K), (long long)(i / s->K), o.learning_rate);
      goto out;
    }
  if ((rc = qa_monotone_rows(c->pool, s->mono, r.B, s->K, s->median, Q, err)) ||
      (rc = qk_metrics_rows(s, tr, rep.n_train, Q, r.y, &mj, &s_after, err)))
    goto out;
  json_object_set_new(metrics, "after", mj);
  s_val = s_after;
  if (!rep.n_val)
    json_object_set_new(metrics, "validation", json_null());
  else if ((rc = qk_metrics_rows(s, va, rep.n_val, Q, r.y, &mj, &s_val, err)))
    goto out;
  else
    json_object_set_new(metrics, "validation", mj);
  qk_gain_json(metrics, bn, &best, &s_val);
  if ((rc = new_writer(s, &p, &a, D, NULL, NULL, NULL, &c->new_weights, err))) goto out;
  char hex[HASH_HEX_LEN + 1];
  qk_hash_inputs(c, hex);
  json_t *fp = json_pack("{s:o, s:i, s:f, s:f, s:i, s:f, s:f, s:f, s:f, s:i, s:I, s:b}",
                         "aggregator", qk_agg_json(&a, D), "epochs", o.epochs, "learning_rate",
                         o.learning_rate, "weight_decay", o.weight_decay, "batch_size",
                         o.batch_size, "dropout", o.dropout, "lambda", o.lambda, "margin", o.margin,
                         "validation_fraction", o.validation_fraction, "patience", o.patience,
                         "seed", (json_int_t)o.seed, "warm_start", warm);
  json_t *rows = json_pack("{s:I, s:I}", "train", (json_int_t)rep.n_train, "validation",
                           (json_int_t)rep.n_val);
  c->new_version_info = json_pack("{s:O, s:O, s:I, s:s}", "fit", fp, "metrics", metrics, "rows",
                                  (json_int_t)r.B, "sha256_training_data", hex);
  c->result =
      json_pack("{s:O, s:o, s:o, s:i, s:i, s:b, s:o}", "metrics", metrics, "weights",
                weights_json(s, &sp, &p), "rows", rows, "epochs_run", rep.epochs_run, "best_epoch",
                rep.best_epoch, "stopped_early", rep.stopped_early, "fit", fp);
  if (!c->result || !c->new_version_info) rc = ts_errf(err, TS_ENOMEM, "out of memory");
out:
  json_decref(metrics);
  qa_infer_free(&nf);
  qa_fit_report_free(&rep);
  qa_params_free(&p);
  tl_free(Q);
  rows_free(&r);
  return rc;
}

/* ---- qk_calibrate ---------------------------------------------------------- */

int qk_calibrate(void *state, md_call *c, ts_err *err) {
  qk_state *s = state;
  const char *mname;
  int allow_inf;
  qa_cqr_mode mode;
  int rc = md_param_string(c->params, "method", qk_cqr_http_names[s->cqr_default], &mname, err);
  if (!rc) rc = md_param_bool(c->params, "allow_infinite", s->allow_inf_default, &allow_inf, err);
  if (rc) return rc;
  if (qk_cqr_from_http(mname, &mode))
    return ts_errf(err, TS_EINVAL,
                   "parameter 'method' must be cqr, cqr_asymmetric or per_quantile, "
                   "got '%s'",
                   mname);
  /* adaptive conformal inference: {"gamma": g}, false, or the config's */
  double gamma = s->gamma_default;
  int64_t aw = s->aci_window_default;
  const json_t *ad = c->params ? json_object_get(c->params, "adaptive") : NULL;
  if (ad && json_is_false(ad))
    gamma = 0;
  else if (ad && (rc = qk_adaptive_parse(ad, "parameter 'adaptive'", &gamma, &aw, err)))
    return rc;
  if (gamma > 0 && mode != QA_CQR_SYMMETRIC)
    return ts_errf(err, TS_EINVAL,
                   "parameter 'adaptive' needs method cqr (one correction per central "
                   "interval), got '%s'",
                   mname);
  ql_aci aci;
  memset(&aci, 0, sizeof aci);
  qk_rows r;
  if ((rc = qk_gather(s, c, 1, s->agg.scope == QA_LOCAL ? s->D : 0, &r, err))) return rc;
  float *Q = tl_malloc((size_t)(r.B * s->K) * 2 * sizeof(float));
  double *lo = tl_calloc((size_t)s->K * 2, sizeof(double));
  json_t *metrics = json_object(), *mb = NULL, *ma = NULL;
  if (!Q || !lo || !metrics) {
    rc = ts_errf(err, TS_ENOMEM, "out of memory");
    goto out;
  }
  double *hi = lo + s->K;
  float *raw = Q + r.B * s->K;
  qk_score sb, sa;
  if ((rc = qk_predict(s, c->pool, &r, 1, Q, err)) ||
      (rc = qk_metrics_json(s, r.B, Q, r.y, &mb, &sb, err)))
    goto out;
  json_object_set_new(metrics, "before", mb);
  /* corrections are fitted to the raw aggregate, the quantity they are
   * applied to when serving (before the monotone step) */
  if ((rc = qa_infer_run(c->pool, &s->inf, r.B, r.Z, r.X, raw, err))) goto out;
  if ((rc = qa_cqr_fit(mode, s->K, s->levels, r.B, raw, r.y, allow_inf, lo, hi, err))) goto out;
  if (gamma > 0 &&
      (rc = ql_aci_init(&aci, s->K, s->levels, r.B, raw, r.y, aw, gamma, allow_inf, err)))
    goto out;
  /* a finite correction must qk_fit the FP32 the weights store, and applied
   * to these rows it must leave them finite; only allow_infinite's +inf
   * (a rank beyond n) is a documented infinity */
  for (int k = 0; k < s->K && !rc; k++) {
    double cv[2] = {lo[k], hi[k]};
    for (int e = 0; e < 2 && !rc; e++)
      if (isfinite(cv[e]) && !isfinite((float)cv[e]))
        rc = ts_errf(err, TS_EINVAL,
                     "conformal: the %s correction at level %g is %g, beyond FP32: targets and "
                     "quantiles too far apart (values too large in magnitude)",
                     e ? "upper" : "lower", s->levels[k], cv[e]);
  }
  if (rc) goto out;
  qa_cqr_apply(s->K, lo, hi, r.B, raw);
  for (int64_t i = 0; i < r.B * s->K && !rc; i++) {
    int k = (int)(i % s->K);
    if (!isfinite(raw[i]) && isfinite(lo[k]) && isfinite(hi[k]))
      rc = ts_errf(err, TS_EINVAL,
                   "conformal: row %lld, level %g: the corrected quantile overflows FP32 "
                   "(values too large in magnitude)",
                   (long long)(i / s->K), s->levels[k]);
  }
  if (rc) goto out;
  if ((rc = qa_monotone_rows(c->pool, s->mono, r.B, s->K, s->median, raw, err)) ||
      (rc = qk_metrics_json(s, r.B, raw, r.y, &ma, &sa, err)))
    goto out;
  json_object_set_new(metrics, "after", ma);
  if ((rc = new_writer(s, &s->params, &s->agg, s->D, lo, hi, mname, &c->new_weights, err)))
    goto out;
  json_t *adj = NULL;
  if (gamma > 0) {
    int64_t sh[2] = {aci.n_int, aci.n};
    adj = json_pack("{s:f, s:b, s:I}", "gamma", gamma, "allow_infinite", allow_inf, "window",
                    (json_int_t)aw);
    char *txt = adj ? jtext_dumps(adj, JT_COMPACT | JT_SORT_KEYS, NULL) : NULL;
    /* a fresh state's ring is in arrival order (pos 0) */
    rc = txt ? st_writer_add(c->new_weights, "conformal.scores", TS_FP32, 2, sh, aci.ring, err)
             : ts_errf(err, TS_ENOMEM, "out of memory");
    if (!rc) rc = st_writer_meta(c->new_weights, "adaptive", txt, err);
    free(txt);
    if (!rc) {
      json_object_set_new(adj, "scores", json_integer(aci.n));
      json_object_set_new(adj, "intervals", json_integer(aci.n_int));
    }
    if (rc) {
      json_decref(adj);
      goto out;
    }
  }
  json_t *jl = json_array(), *ju = json_array();
  for (int k = 0; k < s->K; k++) {
    json_array_append_new(jl, qk_jnum(lo[k]));
    json_array_append_new(ju, qk_jnum(hi[k]));
  }
  json_t *corr = json_pack("{s:s, s:b, s:o, s:o}", "method", mname, "allow_infinite", allow_inf,
                           "lower", jl, "upper", ju);
  if (corr && adj) json_object_set(corr, "adaptive", adj);
  char hex[HASH_HEX_LEN + 1];
  qk_hash_inputs(c, hex);
  c->new_version_info =
      json_pack("{s:{s:s, s:b, s:o}, s:O, s:I, s:s}", "calibrate", "method", mname,
                "allow_infinite", allow_inf, "adaptive", adj ? json_incref(adj) : json_false(),
                "metrics", metrics, "rows", (json_int_t)r.B, "sha256_calibration_data", hex);
  json_decref(adj);
  c->result = json_pack("{s:O, s:o, s:I}", "metrics", metrics, "corrections", corr, "rows",
                        (json_int_t)r.B);
  if (!c->result || !c->new_version_info) rc = ts_errf(err, TS_ENOMEM, "out of memory");
out:
  json_decref(metrics);
  ql_aci_free(&aci);
  tl_free(Q);
  tl_free(lo);
  rows_free(&r);
  return rc;
}
