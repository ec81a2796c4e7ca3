/* quantile_serve.c - the quantile_ensemble kind serving requests: request
 * rows (external, hosted and linear bases), prediction, the scores of
 * evaluate and fit, infer and evaluate (see quantile.c). */
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
#include "model.h"
#include "quantile_int.h"

/* ---- request rows ------------------------------------------------------- */

/* Runs hosted base j on X [B, D] and writes its [B, K] into Z's slot j. */
static int run_hosted(const qk_state *s, int j, const md_call *c, int64_t B, const float *X,
                      float *Z, ts_err *err) {
  const qk_base *b = &s->bases[j];
  ts_tensor t;
  memset(&t, 0, sizeof t);
  int64_t xs[2] = {B, s->D};
  int rc =
      ts_wrap(&t, "features", TS_FP32, 2, xs, (void *)X, (size_t)(B * s->D) * sizeof(float), err);
  if (rc) return rc;
  md_call sub;
  md_hosted held;
  rc = md_run_hosted(c, "base", b->name, &t, &sub, &held, err);
  ts_free(&t);
  if (rc) return rc;
  const ts_tensor *o = ts_list_find(&sub.outputs, "output");
  if (!o && sub.outputs.n == 1) o = &sub.outputs.items[0];
  float *q = NULL;
  char sh[64];
  if (!o)
    rc = ts_errf(err, TS_EINVAL, "base '%s' (kind %s) gave no single output", b->name,
                 held.kind->name);
  else if (o->ndim != 2 || o->shape[0] != B || o->shape[1] != s->K)
    rc = ts_errf(err, TS_EINVAL,
                 "base '%s': output '%s' is %s, expected [%lld, %d] (its K "
                 "quantiles)",
                 b->name, o->name, ts_shape_str(o->shape, o->ndim, sh, sizeof sh), (long long)B,
                 s->K);
  else if ((rc = ts_to_f32(o, 0, &q, err)) == 0) {
    int64_t MK = (int64_t)s->M * s->K;
    for (int64_t r = 0; r < B; r++)
      memcpy(Z + r * MK + (int64_t)j * s->K, q + r * s->K, (size_t)s->K * sizeof(float));
    tl_free(q);
  } else {
    ts_err_prefix(err, "base '%s'", b->name);
  }
  md_hosted_done(&sub, &held);
  return rc;
}

static int input_2d_or_1d_targets(const md_call *c, int64_t B, float **y, ts_err *err) {
  const ts_tensor *t;
  int rc = md_input(c, "targets", &t, err);
  if (rc) return rc;
  int64_t d1[1] = {B};
  if (!(t->ndim == 2 && t->shape[0] == B && t->shape[1] == 1) &&
      (rc = md_check_shape(t, 1, d1, err)))
    return rc;
  if (t->dtype != TS_FP32 && t->dtype != TS_FP64)
    return ts_errf(err, TS_EINVAL, "input 'targets': datatype must be FP32 or FP64, got %s",
                   ts_dtype_name(t->dtype));
  return ts_to_f32(t, 0, y, err);
}

/* Checks the optional request parameter "levels" against the model's. */
static int check_levels_param(const qk_state *s, const json_t *params, ts_err *err) {
  json_t *lv = params ? json_object_get(params, "levels") : NULL;
  if (!lv) return 0;
  int ok = json_is_array(lv) && (int)json_array_size(lv) == s->K;
  for (int k = 0; ok && k < s->K; k++) {
    json_t *v = json_array_get(lv, (size_t)k);
    ok = json_is_number(v) && fabs(json_number_value(v) - s->levels[k]) <= QA_LEVEL_TOL;
  }
  if (ok) return 0;
  char want[160];
  size_t o = 0;
  for (int k = 0; k < s->K && o + 24 < sizeof want; k++)
    o += (size_t)snprintf(want + o, sizeof want - o, "%s%g", k ? ", " : "", s->levels[k]);
  if (o + 24 >= sizeof want) snprintf(want + o, sizeof want - o, ", ...");
  return ts_errf(err, TS_EINVAL,
                 "levels mismatch: parameter 'levels' (%zu values) differs from the model's %d "
                 "levels [%s]",
                 json_is_array(lv) ? json_array_size(lv) : 0, s->K, want);
}

/* Decodes and assembles Z (and X, y) for a call. need_local_D: the D the
 * aggregator of this call needs (0: none; -1: any width, taken from the
 * request). */
int qk_gather(const qk_state *s, const md_call *c, int want_y, int need_local_D, qk_rows *r,
              ts_err *err) {
  memset(r, 0, sizeof *r);
  int rc = check_levels_param(s, c->params, err);
  if (rc) return rc;
  const ts_tensor *bq = c->inputs ? ts_list_find(c->inputs, "base_quantiles") : NULL;
  const ts_tensor *ft = c->inputs ? ts_list_find(c->inputs, "features") : NULL;
  int64_t B = -1;
  float *zext = NULL;
  if (s->M_ext) {
    if (!bq)
      return ts_errf(err, TS_EINVAL,
                     "missing input 'base_quantiles' [B, %d, %d] (the external "
                     "bases' quantiles, in config order)",
                     s->M_ext, s->K);
    char sh[64];
    if (bq->ndim != 3 || bq->shape[1] != s->M_ext || bq->shape[2] != s->K)
      return ts_errf(err, TS_EINVAL,
                     "input 'base_quantiles': expected [B, %d, %d] (M=%d external bases, K=%d "
                     "levels), got %s",
                     s->M_ext, s->K, s->M_ext, s->K,
                     ts_shape_str(bq->shape, bq->ndim, sh, sizeof sh));
    B = bq->shape[0];
  } else if (bq) {
    return ts_errf(err, TS_EINVAL,
                   "input 'base_quantiles' is not accepted: every base of this "
                   "model is hosted (send 'features' [B, %d])",
                   s->D);
  }
  int needD = s->n_hosted ? s->D : need_local_D;
  if (needD) {
    if (!ft)
      return ts_errf(err, TS_EINVAL, "missing input 'features' [B, %d] (needed by %s)", s->D,
                     s->n_hosted ? "the hosted bases" : "the local aggregator");
    int64_t dims[2] = {B, needD > 0 ? needD : -1};
    if ((rc = md_check_shape(ft, 2, dims, err))) return rc;
    B = ft->shape[0];
    r->D = (int)ft->shape[1];
  }
  if (B < 1) return ts_errf(err, TS_EINVAL, "the request has no rows");
  r->B = B;
  if (needD && (rc = ts_to_f32(ft, 0, &r->X, err))) goto fail;
  if (want_y && (rc = input_2d_or_1d_targets(c, B, &r->y, err))) goto fail;
  if (bq && (rc = ts_to_f32(bq, 0, &zext, err))) goto fail;
  if (s->M_ext == s->M) { /* the common case: Z is the request's tensor */
    r->Z = zext;
    return 0;
  }
  int64_t MK = (int64_t)s->M * s->K;
  if (!(r->Z = tl_malloc((size_t)(B * MK) * sizeof(float)))) {
    rc = ts_errf(err, TS_ENOMEM, "out of memory for %lld rows of base quantiles", (long long)B);
    goto fail;
  }
  float *tmp = NULL;
  for (int j = 0, e = 0; j < s->M && !rc; j++) {
    const qk_base *b = &s->bases[j];
    if (b->kind == QB_EXTERNAL) {
      for (int64_t i = 0; i < B; i++)
        memcpy(r->Z + i * MK + (int64_t)j * s->K, zext + (i * s->M_ext + e) * s->K,
               (size_t)s->K * sizeof(float));
      e++;
    } else if (b->kind == QB_LINEAR) {
      if (!tmp && !(tmp = tl_malloc((size_t)(B * s->K) * sizeof(float)))) {
        rc = ts_errf(err, TS_ENOMEM, "out of memory for %lld rows", (long long)B);
        break;
      }
      sg_gemm(c->pool, 1, B, s->K, s->D, r->X, s->D, b->w.data, s->D, 0.0f, tmp, s->K);
      sg_add_bias(B, s->K, tmp, s->K, b->b.data);
      for (int64_t i = 0; i < B; i++)
        memcpy(r->Z + i * MK + (int64_t)j * s->K, tmp + i * s->K, (size_t)s->K * sizeof(float));
    } else {
      rc = run_hosted(s, j, c, B, r->X, r->Z, err);
    }
  }
  tl_free(tmp);
  tl_free(zext);
  if (rc) rows_free(r);
  return rc;
fail:
  tl_free(zext);
  rows_free(r);
  return rc;
}

/* ---- prediction and metrics -------------------------------------------- */

/* Q [B, K]: the version's output: aggregate, corrections, monotone step. */
int qk_predict(const qk_state *s, pool_t *pool, const qk_rows *r, int with_conf, float *Q,
               ts_err *err) {
  int rc = qa_infer_run(pool, &s->inf, r->B, r->Z, r->X, Q, err);
  if (rc) return rc;
  /* the aggregate of finite inputs is finite unless it overflowed FP32: a
   * 400 for qk_infer, qk_evaluate, qk_fit and qk_calibrate alike (the +-inf that
   * allow_infinite corrections add below is documented, and comes after) */
  for (int64_t i = 0; i < r->B * s->K; i++)
    if (!isfinite(Q[i]))
      return ts_errf(err, TS_EINVAL,
                     "row %lld: the aggregated quantile %d is not finite: the base quantiles or "
                     "features overflow FP32 in the aggregation (values too large in magnitude)",
                     (long long)(i / s->K), (int)(i % s->K));
  if (with_conf && s->has_conf) {
    /* an adaptive version serves the corrections of its current levels */
    double *live = tl_malloc(sizeof(double) * 2 * (size_t)s->K);
    if (!live) return ts_errf(err, TS_ENOMEM, "out of memory");
    if (qk_live_corrections(s, live, live + s->K))
      qa_cqr_apply(s->K, live, live + s->K, r->B, Q);
    else
      qa_cqr_apply(s->K, s->conf_lo, s->conf_hi, r->B, Q);
    tl_free(live);
  }
  return qa_monotone_rows(pool, s->mono, r->B, s->K, s->median, Q, err);
}

json_t *qk_jnum(double x) {
  return isfinite(x) ? json_real(x) : json_null();
}

static void nominal_key(double nominal, char *buf, size_t n) {
  snprintf(buf, n, "%.6g", nominal);
}

/* The metric object of Q [N, K] against y; *sc receives the headline scores. */
int qk_metrics_json(const qk_state *s, int64_t N, const float *Q, const float *y, json_t **out,
                    qk_score *sc, ts_err *err) {
  qa_metrics m;
  int rc = qa_metrics_compute(s->K, s->levels, N, Q, y, &m, err);
  if (rc) return rc;
  json_t *is = json_object(), *cov = json_object();
  for (int i = 0; i < m.n_int; i++) {
    char k[32];
    nominal_key(m.nominal[i], k, sizeof k);
    json_object_set_new(is, k, qk_jnum(m.interval_score[i]));
    json_object_set_new(cov, k, qk_jnum(m.coverage[i]));
  }
  *out = json_pack("{s:o, s:o, s:o, s:o, s:I}", "pinball", qk_jnum(m.mean_pinball), "wis",
                   qk_jnum(m.wis), "interval_score", is, "coverage", cov, "rows", (json_int_t)N);
  if (sc) *sc = (qk_score){m.mean_pinball, m.wis};
  qa_metrics_free(&m);
  return *out ? 0 : ts_errf(err, TS_ENOMEM, "out of memory");
}

/* qk_metrics_json over the rows idx[0..n) of Q [*, K] and y (idx NULL: the
 * first n rows), gathered into a scratch copy. */
int qk_metrics_rows(const qk_state *s, const int64_t *idx, int64_t n, const float *Q,
                    const float *y, json_t **out, qk_score *sc, ts_err *err) {
  if (!idx) return qk_metrics_json(s, n, Q, y, out, sc, err);
  float *q = tl_malloc((size_t)(n * (s->K + 1)) * sizeof(float));
  if (!q)
    return ts_errf(err, TS_ENOMEM, "out of memory for the metrics of %lld rows", (long long)n);
  float *yy = q + n * s->K;
  for (int64_t i = 0; i < n; i++) {
    memcpy(q + i * s->K, Q + idx[i] * s->K, (size_t)s->K * sizeof(float));
    yy[i] = y[idx[i]];
  }
  int rc = qk_metrics_json(s, n, q, yy, out, sc, err);
  tl_free(q);
  return rc;
}

/* "bases": each base's own quantiles scored alone on the rows idx[0..n)
 * (idx NULL: the first n), plus the best of them (by WIS when the levels
 * have a median, else by pinball). */
int qk_bases_json(const qk_state *s, const qk_rows *r, const int64_t *idx, int64_t n,
                  json_t *metrics, qk_score *best, const char **best_name, ts_err *err) {
  float *q = tl_malloc((size_t)(n * (s->K + 1)) * sizeof(float));
  if (!q) return ts_errf(err, TS_ENOMEM, "out of memory");
  float *yy = q + n * s->K;
  for (int64_t i = 0; i < n; i++) yy[i] = r->y[idx ? idx[i] : i];
  json_t *bj = json_object();
  int rc = 0;
  int64_t MK = (int64_t)s->M * s->K;
  best->pinball = best->wis = INFINITY;
  *best_name = NULL;
  for (int j = 0; j < s->M && !rc; j++) {
    for (int64_t i = 0; i < n; i++)
      memcpy(q + i * s->K, r->Z + (idx ? idx[i] : i) * MK + (int64_t)j * s->K,
             (size_t)s->K * sizeof(float));
    json_t *mj;
    qk_score sc;
    if ((rc = qk_metrics_json(s, n, q, yy, &mj, &sc, err))) break;
    json_object_set_new(bj, s->bases[j].name, mj);
    double key = s->median >= 0 ? sc.wis : sc.pinball,
           bk = s->median >= 0 ? best->wis : best->pinball;
    if (key < bk) {
      *best = sc;
      *best_name = s->bases[j].name;
    }
  }
  tl_free(q);
  json_object_set_new(metrics, "bases", bj);
  return rc;
}

/* best_base and gain_over_best_base (1 - model/best: positive = better). */
void qk_gain_json(json_t *metrics, const char *best_name, const qk_score *best,
                  const qk_score *model) {
  if (!best_name) return;
  json_object_set_new(metrics, "best_base",
                      json_pack("{s:s, s:o, s:o}", "name", best_name, "pinball",
                                qk_jnum(best->pinball), "wis", qk_jnum(best->wis)));
  json_object_set_new(
      metrics, "gain_over_best_base",
      json_pack("{s:o, s:o}", "pinball", qk_jnum(1.0 - model->pinball / best->pinball), "wis",
                qk_jnum(1.0 - model->wis / best->wis)));
}

/* SHA-256 over the request tensors used (name, dtype, shape, bytes). */
void qk_hash_inputs(const md_call *c, char hex[HASH_HEX_LEN + 1]) {
  static const char *const names[] = {"base_quantiles", "features", "targets"};
  hash_ctx *h = hash_sha256_new();
  if (!h) {
    snprintf(hex, HASH_HEX_LEN + 1, "unavailable");
    return;
  }
  for (int i = 0; i < 3; i++) {
    const ts_tensor *t = ts_list_find(c->inputs, names[i]);
    if (!t) continue;
    char head[256];
    int n = snprintf(head, sizeof head, "%s %s %d", names[i], ts_dtype_name(t->dtype), t->ndim);
    hash_update(h, head, (size_t)n);
    hash_update(h, t->shape, sizeof(int64_t) * (size_t)t->ndim);
    hash_update(h, t->data, t->nbytes);
  }
  hash_final_hex(h, hex);
  hash_free(h);
}

/* ---- qk_infer -------------------------------------------------------------- */

int qk_infer(void *state, md_call *c, ts_err *err) {
  qk_state *s = state;
  qk_rows r;
  int rc = qk_gather(s, c, 0, s->agg.scope == QA_LOCAL ? s->D : 0, &r, err);
  if (rc) return rc;
  int64_t shape[2] = {r.B, s->K};
  float *Q = md_output(c, "quantiles", TS_FP32, 2, shape, err);
  rc = Q ? qk_predict(s, c->pool, &r, 1, Q, err) : -TS_ENOMEM;
  /* corrections stored with allow_infinite make unbounded intervals: the
   * documented +-inf of this kind (docs/quantile.md) */
  c->infinite_ok = s->has_conf;
  rows_free(&r);
  return rc;
}

/* ---- qk_evaluate ----------------------------------------------------------- */

int qk_evaluate(void *state, md_call *c, ts_err *err) {
  qk_state *s = state;
  qk_rows r;
  int observe;
  int rc = md_param_bool(c->params, "observe", 0, &observe, err);
  if (!rc) rc = qk_gather(s, c, 1, s->agg.scope == QA_LOCAL ? s->D : 0, &r, err);
  if (rc) return rc;
  float *Q = tl_malloc((size_t)(r.B * s->K) * sizeof(float));
  json_t *metrics = json_object(), *mm = NULL;
  qk_score sc, best;
  const char *bn;
  if (!Q) rc = ts_errf(err, TS_ENOMEM, "out of memory");
  if (!rc) rc = qk_predict(s, c->pool, &r, 1, Q, err);
  if (!rc) rc = qk_metrics_json(s, r.B, Q, r.y, &mm, &sc, err);
  if (!rc) {
    json_object_set_new(metrics, "model", mm);
    rc = qk_bases_json(s, &r, NULL, r.B, metrics, &best, &bn, err);
  }
  if (!rc) {
    qk_gain_json(metrics, bn, &best, &sc);
    c->result = json_pack("{s:O, s:I, s:o}", "metrics", metrics, "rows", (json_int_t)r.B,
                          "aggregator", qk_agg_json(&s->agg, s->D));
    if (s->has_conf) json_object_set_new(c->result, "conformal", json_string(s->conf_method));
  }
  if (!rc && observe) {
    /* the rows' outcomes go to the live state, as feedback would send them */
    json_t *ans = c->result;
    c->result = NULL;
    rc = qk_observe(s, c, NULL, err);
    json_t *live = c->result;
    c->result = ans;
    if (!rc) json_object_set_new(ans, "live", live);
  } else if (!rc) {
    json_object_set_new(c->result, "live", qk_live_json(s));
  }
  json_decref(metrics);
  tl_free(Q);
  rows_free(&r);
  return rc;
}
