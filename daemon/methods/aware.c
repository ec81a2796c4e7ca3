/* aware.c - AWARE-NET two-tier ensemble (see aware.h for the math and the
 * layouts).
 *
 * Invariants kept here:
 *  - P and y are only ever read through (row, family, class) offsets; a fit
 *    reaches rows through an index permutation, so no O(N) copy is made;
 *  - the per-row loss and its gradient come from one function
 *    (aw__rows_loss_grad), so the clamp is handled identically in both;
 *  - theta never leaves aw_fit worse than it came in on the monitored loss
 *    (epoch 0 is a candidate for the best epoch). */
#include "aware.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "../base/mem.h"
#include "../base/rng.h"
#include "optim.h"

#define AW_PROB_SUM_TOL 1e-3
#define AW__SOFTMAX_STACK 64

int aw_cc(const aw_spec *s) {
  return s->C < 2 ? 1 : s->C;
}

int aw_spec_check(const aw_spec *s, ts_err *err) {
  if (s->F < 1 || s->F > AW_MAX_FAMILIES)
    return ts_errf(err, TS_EINVAL, "ensemble: %d families; expected 1 to %d", s->F,
                   AW_MAX_FAMILIES);
  if (!s->family_size) return ts_errf(err, TS_EINVAL, "ensemble: family sizes missing");
  int64_t sum = 0;
  for (int f = 0; f < s->F; f++) {
    if (s->family_size[f] < 1)
      return ts_errf(err, TS_EINVAL, "ensemble: family %d has %d members; needs at least 1", f,
                     s->family_size[f]);
    sum += s->family_size[f];
  }
  if (sum != s->n)
    return ts_errf(err, TS_EINVAL, "ensemble: families hold %lld members in all but n = %d",
                   (long long)sum, s->n);
  if (s->C < 1)
    return ts_errf(err, TS_EINVAL, "ensemble: classes = %d; expected 1 (binary) or >= 2", s->C);
  return 0;
}

/* "member 4 ('xc2', family 'xception')" or "member 4 (family 1, its member 2)". */
static void aw__who(const aw_spec *s, int member, char *buf, size_t len) {
  int f = 0, first = 0;
  while (f < s->F - 1 && member >= first + s->family_size[f]) first += s->family_size[f++];
  const char *mn = s->member_names ? s->member_names[member] : NULL;
  const char *fn = s->family_names ? s->family_names[f] : NULL;
  if (mn && fn)
    snprintf(buf, len, "member %d ('%s', family '%s')", member, mn, fn);
  else if (mn)
    snprintf(buf, len, "member %d ('%s', family %d)", member, mn, f);
  else if (fn)
    snprintf(buf, len, "member %d (family '%s', its member %d)", member, fn, member - first);
  else
    snprintf(buf, len, "member %d (family %d, its member %d)", member, f, member - first);
}

static int aw__bad(const aw_spec *s, int64_t row, int member, ts_err *err, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));
static int aw__bad(const aw_spec *s, int64_t row, int member, ts_err *err, const char *fmt, ...) {
  char who[160], what[200];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(what, sizeof what, fmt, ap);
  va_end(ap);
  aw__who(s, member, who, sizeof who);
  return ts_errf(err, TS_EINVAL, "row %lld, %s: %s", (long long)row, who, what);
}

/* Describes what is wrong with one member's output z [Cc] of one row. Only
 * called once aw__member_ok has said no, so formatting stays off the hot path. */
static int aw__member_err(const aw_spec *s, int64_t row, int member, const float *z, ts_err *err) {
  const char *kind = s->input_logits ? "logit" : "probability";
  int Cc = aw_cc(s);
  double sum = 0.0;
  for (int c = 0; c < Cc; c++) {
    float v = z[c];
    char cls[32] = "";
    if (Cc > 1) snprintf(cls, sizeof cls, "class %d ", c);
    if (isnan(v)) return aw__bad(s, row, member, err, "%s%s is NaN", cls, kind);
    if (isinf(v)) return aw__bad(s, row, member, err, "%s%s is infinite", cls, kind);
    if (!s->input_logits && (v < 0.0f || v > 1.0f))
      return aw__bad(s, row, member, err, "%sprobability %g is outside [0, 1]", cls, (double)v);
    sum += v;
  }
  return aw__bad(s, row, member, err, "class probabilities sum to %.6g, not 1 (tolerance %g)", sum,
                 AW_PROB_SUM_TOL);
}

/* Finite; probabilities in [0, 1], class rows summing to 1 within the tolerance. */
static inline int aw__member_ok(int Cc, int logits, const float *z) {
  if (logits) {
    for (int c = 0; c < Cc; c++)
      if (!isfinite(z[c])) return 0;
    return 1;
  }
  double sum = 0.0;
  for (int c = 0; c < Cc; c++) {
    if (!(z[c] >= 0.0f && z[c] <= 1.0f)) return 0; /* also false for NaN */
    sum += z[c];
  }
  return Cc == 1 || fabs(sum - 1.0) <= AW_PROB_SUM_TOL;
}

static int aw__check_member(const aw_spec *s, int64_t row, int member, const float *z,
                            ts_err *err) {
  return aw__member_ok(aw_cc(s), s->input_logits, z) ? 0 : aw__member_err(s, row, member, z, err);
}

int aw_validate(const aw_spec *s, int64_t B, const float *member_out, ts_err *err) {
  int rc = aw_spec_check(s, err);
  if (rc) return rc;
  int Cc = aw_cc(s);
  for (int64_t b = 0; b < B; b++)
    for (int m = 0; m < s->n; m++) {
      rc = aw__check_member(s, b, m, member_out + (b * s->n + m) * Cc, err);
      if (rc) return rc;
    }
  return 0;
}

/* Stable for any finite z; written without a branch on the sign because
 * member logits are close to random in sign and a mispredicted branch costs
 * as much as the exp. */
static double aw__sigmoid(double z) {
  double e = exp(-fabs(z)), r = 1.0 / (1.0 + e);
  return z >= 0 ? r : e * r;
}

/* Adds the member's class probabilities (scaled by w) into acc [Cc]. */
static inline void aw__add_member(int Cc, int logits, const float *z, double w, double *acc) {
  if (!logits) {
    for (int c = 0; c < Cc; c++) acc[c] += w * z[c];
  } else if (Cc == 1) {
    acc[0] += w * aw__sigmoid(z[0]);
  } else {
    double mx = z[0], sum = 0.0, ex[AW__SOFTMAX_STACK];
    for (int c = 1; c < Cc; c++)
      if (z[c] > mx) mx = z[c];
    if (Cc <= AW__SOFTMAX_STACK) {
      for (int c = 0; c < Cc; c++) sum += ex[c] = exp(z[c] - mx);
      double k = w / sum;
      for (int c = 0; c < Cc; c++) acc[c] += k * ex[c];
    } else { /* many classes: recompute the exponentials rather than allocate */
      for (int c = 0; c < Cc; c++) sum += exp(z[c] - mx);
      double k = w / sum;
      for (int c = 0; c < Cc; c++) acc[c] += k * exp(z[c] - mx);
    }
  }
}

/* Rows [b0, b1): computes P; returns the first bad row, or -1. */
static int64_t aw__family_rows(const aw_spec *s, int64_t b0, int64_t b1, const float *member_out,
                               double *P) {
  const int Cc = aw_cc(s), F = s->F, n = s->n, logits = s->input_logits;
  for (int64_t b = b0; b < b1; b++) {
    const float *zrow = member_out + b * n * Cc;
    double *prow = P + b * F * Cc;
    int m = 0;
    for (int f = 0; f < F; f++) {
      double *acc = prow + f * Cc, w = 1.0 / s->family_size[f];
      for (int c = 0; c < Cc; c++) acc[c] = 0.0;
      for (int i = 0; i < s->family_size[f]; i++, m++) {
        const float *z = zrow + m * Cc;
        if (!aw__member_ok(Cc, logits, z)) return b;
        aw__add_member(Cc, logits, z, w, acc);
      }
    }
  }
  return -1;
}

typedef struct aw__fp_job {
  const aw_spec *s;
  const float *member_out;
  double *P;
  int64_t bad; /* lowest bad row seen, INT64_MAX when none; updated atomically */
} aw__fp_job;

static void aw__fp_range(void *arg, int64_t b0, int64_t b1) {
  aw__fp_job *j = arg;
  int64_t bad = aw__family_rows(j->s, b0, b1, j->member_out, j->P);
  if (bad < 0) return;
  int64_t cur = __atomic_load_n(&j->bad, __ATOMIC_RELAXED);
  while (bad < cur &&
         !__atomic_compare_exchange_n(&j->bad, &cur, bad, 1, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
}

int aw_family_probs(const aw_spec *s, int64_t B, const float *member_out, double *P, pool_t *pool,
                    ts_err *err) {
  int rc = aw_spec_check(s, err);
  if (rc) return rc;
  aw__fp_job j = {s, member_out, P, INT64_MAX};
  /* rows are independent; a chunk of 2048 rows is ~0.3 ms of work */
  pool_parallel_for(pool, B, 2048, aw__fp_range, &j);
  if (j.bad == INT64_MAX) return 0;
  /* Every chunk stops at its first bad row, so j.bad is the lowest one;
   * name its first bad member. */
  const int Cc = aw_cc(s);
  const float *zrow = member_out + j.bad * s->n * Cc;
  for (int m = 0; m < s->n; m++)
    if (!aw__member_ok(Cc, s->input_logits, zrow + m * Cc))
      return aw__member_err(s, j.bad, m, zrow + m * Cc, err);
  return ts_errf(err, TS_EINTERNAL, "ensemble: row %lld reported bad but is not", (long long)j.bad);
}

void aw_alpha(int F, const double *theta, double *alpha) {
  if (!theta) {
    for (int f = 0; f < F; f++) alpha[f] = 1.0 / F;
    return;
  }
  double mx = theta[0], sum = 0.0;
  for (int f = 1; f < F; f++)
    if (theta[f] > mx) mx = theta[f];
  for (int f = 0; f < F; f++) sum += alpha[f] = exp(theta[f] - mx);
  for (int f = 0; f < F; f++) alpha[f] /= sum;
}

static inline void aw__combine_row(int F, int Cc, const double *prow, const double *alpha,
                                   double *y) {
  if (Cc == 1) {
    double v = 0.0;
    for (int f = 0; f < F; f++) v += alpha[f] * prow[f];
    *y = v;
    return;
  }
  for (int c = 0; c < Cc; c++) y[c] = 0.0;
  for (int f = 0; f < F; f++)
    for (int c = 0; c < Cc; c++) y[c] += alpha[f] * prow[f * Cc + c];
}

void aw_combine(const aw_spec *s, int64_t B, const double *P, const double *theta, double *y) {
  int F = s->F, Cc = aw_cc(s);
  double alpha[AW_MAX_FAMILIES];
  aw_alpha(F, theta, alpha);
  for (int64_t b = 0; b < B; b++) aw__combine_row(F, Cc, P + b * F * Cc, alpha, y + b * Cc);
}

/* Sum over rows idx[0..m) (idx NULL: 0..m-1) of the clamped per-row loss;
 * when g is not NULL adds the per-row dL_b/dtheta into g [F] (unscaled).
 * For one row with target probability q = y[t] (binary t = 0: q = 1 - y):
 *   L_b = -log clamp(q),  dL_b/dtheta_f = -(1/q) alpha_f (P_f[t] - y[t])
 * (binary t = 0: dq/dy = -1 and dL/dy = 1/(1 - y) on P_f - y), and 0 when the
 * clamp is active, because clamp(q) is then constant. */
static double aw__rows_loss_grad(int F, int Cc, const double *P, const int32_t *labels,
                                 const int64_t *idx, int64_t m, const double *alpha, double *g) {
  double loss = 0.0;
  for (int64_t k = 0; k < m; k++) {
    int64_t b = idx ? idx[k] : k;
    const double *prow = P + b * F * Cc;
    int t = labels[b];
    int col = Cc == 1 ? 0 : t;
    double yc = 0.0;
    for (int f = 0; f < F; f++) yc += alpha[f] * prow[f * Cc + col];
    double q = (Cc == 1 && t == 0) ? 1.0 - yc : yc;
    if (q <= MET_EPS) {
      loss -= log(MET_EPS);
      continue;
    }
    if (q >= 1.0 - MET_EPS) {
      loss -= log(1.0 - MET_EPS);
      continue;
    }
    loss -= log(q);
    if (!g) continue;
    double dy = (Cc == 1 && t == 0) ? 1.0 / q : -1.0 / q; /* dL_b / dy[col] */
    for (int f = 0; f < F; f++) g[f] += dy * alpha[f] * (prow[f * Cc + col] - yc);
  }
  return loss;
}

double aw_loss_grad(const aw_spec *s, int64_t B, const double *P, const int32_t *labels,
                    const double *theta, double l2, double *grad) {
  int F = s->F;
  double alpha[AW_MAX_FAMILIES];
  aw_alpha(F, theta, alpha);
  if (grad)
    for (int f = 0; f < F; f++) grad[f] = 0.0;
  double L = B > 0 ? aw__rows_loss_grad(F, aw_cc(s), P, labels, NULL, B, alpha, grad) / B : 0.0;
  double r = 0.0;
  for (int f = 0; f < F; f++) {
    double th = theta ? theta[f] : 0.0;
    r += th * th;
    if (grad) grad[f] = (B > 0 ? grad[f] / B : 0.0) + l2 * th;
  }
  return L + 0.5 * l2 * r;
}

void aw_split(int64_t N, double validation_fraction, uint64_t seed, int64_t *perm, int64_t *n_val) {
  for (int64_t i = 0; i < N; i++) perm[i] = i;
  uint64_t st = seed ^ 0x5EEDCAFEF00Dull;
  rng_shuffle(perm, N, &st);
  int64_t v = (int64_t)floor(validation_fraction * (double)N);
  if (validation_fraction > 0 && v < 1 && N >= 2) v = 1;
  if (v > N - 1) v = N > 0 ? N - 1 : 0;
  if (v < 0) v = 0;
  *n_val = v;
}

void aw_fit_opts_default(aw_fit_opts *o) {
  memset(o, 0, sizeof *o);
  o->epochs = 100;
  o->learning_rate = 1e-2;
  o->weight_decay = 1e-4;
  o->l2 = 0.0;
  o->batch_size = 256;
  o->validation_fraction = 0.2;
  o->seed = 0;
  o->patience = 10;
  o->min_delta = 1e-6;
}

static int aw__check_opts(const aw_fit_opts *o, ts_err *err) {
  if (o->epochs < 0)
    return ts_errf(err, TS_EINVAL, "parameter 'epochs': %d; expected >= 0", o->epochs);
  if (!(o->learning_rate > 0) || !isfinite(o->learning_rate))
    return ts_errf(err, TS_EINVAL, "parameter 'learning_rate': %g; expected > 0", o->learning_rate);
  if (!(o->weight_decay >= 0) || !isfinite(o->weight_decay))
    return ts_errf(err, TS_EINVAL, "parameter 'weight_decay': %g; expected >= 0", o->weight_decay);
  if (!(o->l2 >= 0) || !isfinite(o->l2))
    return ts_errf(err, TS_EINVAL, "parameter 'l2': %g; expected >= 0", o->l2);
  if (!(o->validation_fraction >= 0 && o->validation_fraction < 1))
    return ts_errf(err, TS_EINVAL, "parameter 'validation_fraction': %g; expected in [0, 1)",
                   o->validation_fraction);
  if (o->patience < 0)
    return ts_errf(err, TS_EINVAL, "parameter 'patience': %d; expected >= 0", o->patience);
  if (!(o->min_delta >= 0) || !isfinite(o->min_delta))
    return ts_errf(err, TS_EINVAL, "parameter 'min_delta': %g; expected >= 0", o->min_delta);
  return 0;
}

/* Mean data loss (no L2) of alpha on the rows idx[0..m). */
static double aw__mean_loss(const aw_spec *s, const double *P, const int32_t *labels,
                            const int64_t *idx, int64_t m, const double *theta) {
  double alpha[AW_MAX_FAMILIES];
  aw_alpha(s->F, theta, alpha);
  return aw__rows_loss_grad(s->F, aw_cc(s), P, labels, idx, m, alpha, NULL) / (double)m;
}

int aw_fit(const aw_spec *s, int64_t N, const double *P, const int32_t *labels,
           const aw_fit_opts *o, double *theta, aw_fit_report *report, ts_err *err) {
  aw_fit_report rep_local, *rep = report ? report : &rep_local;
  memset(rep, 0, sizeof *rep);
  int rc = aw_spec_check(s, err);
  if (!rc) rc = aw__check_opts(o, err);
  if (rc) return rc;
  if (N < 1) return ts_errf(err, TS_EINVAL, "fit: no labelled rows");
  rc = met_check_labels(N, s->C, labels, err);
  if (rc) return rc;
  int F = s->F;
  for (int f = 0; f < F; f++)
    if (!isfinite(theta[f]))
      return ts_errf(err, TS_EINVAL, "fit: initial theta[%d] is not finite", f);

  int64_t *perm = tl_malloc((size_t)N * sizeof *perm);
  if (!perm)
    return ts_errf(err, TS_ENOMEM, "fit: out of memory for the row permutation (%lld rows)",
                   (long long)N);
  opt_adam adam;
  rc = opt_adam_init(&adam, F, o->learning_rate, o->weight_decay, 0, 1, err);
  if (rc) {
    tl_free(perm);
    return rc;
  }
  int64_t n_val;
  aw_split(N, o->validation_fraction, o->seed, perm, &n_val);
  int64_t *val = perm, *train = perm + n_val, n_train = N - n_val;
  const int64_t *mon = n_val > 0 ? val : train;
  int64_t n_mon = n_val > 0 ? n_val : n_train;
  int64_t bs = o->batch_size > 0 && o->batch_size < n_train ? o->batch_size : n_train;
  uint64_t st = o->seed ^ 0xA3A3E5E5D00Dull;

  rep->n_train = n_train;
  rep->n_val = n_val;
  rep->monitored_validation = n_val > 0;
  double best[AW_MAX_FAMILIES], alpha[AW_MAX_FAMILIES], grad[AW_MAX_FAMILIES];
  memcpy(best, theta, sizeof(double) * F);
  rep->initial_loss = rep->best_loss = aw__mean_loss(s, P, labels, mon, n_mon, theta);
  rep->train_loss = NAN;
  int since = 0;
  for (int epoch = 1; epoch <= o->epochs; epoch++) {
    rng_shuffle(train, n_train, &st);
    double sum = 0.0;
    for (int64_t k = 0; k < n_train; k += bs) {
      int64_t nb = n_train - k < bs ? n_train - k : bs;
      aw_alpha(F, theta, alpha);
      memset(grad, 0, sizeof(double) * F);
      sum += aw__rows_loss_grad(F, aw_cc(s), P, labels, train + k, nb, alpha, grad);
      for (int f = 0; f < F; f++) grad[f] = grad[f] / nb + o->l2 * theta[f];
      opt_adam_step(&adam, theta, grad);
    }
    rep->train_loss = sum / n_train;
    rep->epochs_run = epoch;
    double l = aw__mean_loss(s, P, labels, mon, n_mon, theta);
    if (l < rep->best_loss - o->min_delta) {
      rep->best_loss = l;
      rep->best_epoch = epoch;
      memcpy(best, theta, sizeof(double) * F);
      since = 0;
    } else {
      since++;
    }
    int stop =
        o->on_epoch ? o->on_epoch(o->on_epoch_arg, epoch, rep->train_loss, n_val > 0 ? l : NAN) : 0;
    if (stop < 0) {
      memcpy(theta, best, sizeof(double) * F);
      opt_adam_free(&adam);
      tl_free(perm);
      return ts_errf(err, stop, "fit: stopped by the caller after epoch %d", epoch);
    }
    if (stop > 0 || (o->patience > 0 && since >= o->patience)) break;
  }
  memcpy(theta, best, sizeof(double) * F);
  opt_adam_free(&adam);
  tl_free(perm);
  return 0;
}

/* Gathers y for rows idx[0..m) into buf [m, Cc]: the ensemble (f < 0) or
 * family f alone. */
static int aw__eval(const aw_spec *s, const double *P, const int32_t *labels, const int64_t *idx,
                    int64_t m, const double *theta, int f, double threshold, met_scores *out,
                    ts_err *err) {
  int F = s->F, Cc = aw_cc(s);
  if (m <= 0) return met_all(0, s->C, NULL, NULL, threshold, out, err);
  double *y = tl_malloc((size_t)m * Cc * sizeof *y);
  int32_t *lab = tl_malloc((size_t)m * sizeof *lab);
  if (!y || !lab) {
    tl_free(y);
    tl_free(lab);
    return ts_errf(err, TS_ENOMEM, "evaluate: out of memory for %lld scores", (long long)m);
  }
  double alpha[AW_MAX_FAMILIES];
  aw_alpha(F, theta, alpha);
  for (int64_t k = 0; k < m; k++) {
    int64_t b = idx ? idx[k] : k;
    const double *prow = P + b * F * Cc;
    if (f < 0)
      aw__combine_row(F, Cc, prow, alpha, y + k * Cc);
    else
      memcpy(y + k * Cc, prow + f * Cc, sizeof(double) * Cc);
    lab[k] = labels[b];
  }
  int rc = met_all(m, s->C, y, lab, threshold, out, err);
  tl_free(y);
  tl_free(lab);
  return rc;
}

int aw_eval(const aw_spec *s, const double *P, const int32_t *labels, const int64_t *idx, int64_t m,
            const double *theta, double threshold, met_scores *out, ts_err *err) {
  return aw__eval(s, P, labels, idx, m, theta, -1, threshold, out, err);
}

int aw_eval_family(const aw_spec *s, const double *P, const int32_t *labels, const int64_t *idx,
                   int64_t m, int f, double threshold, met_scores *out, ts_err *err) {
  if (f < 0 || f >= s->F)
    return ts_errf(err, TS_EINVAL, "evaluate: family %d does not exist (%d families)", f, s->F);
  return aw__eval(s, P, labels, idx, m, NULL, f, threshold, out, err);
}

int aw_fit_metrics_compute(const aw_spec *s, int64_t N, const double *P, const int32_t *labels,
                           const aw_fit_opts *o, const double *theta_before, const double *theta,
                           double threshold, aw_fit_metrics *out, ts_err *err) {
  int rc = aw_spec_check(s, err);
  if (rc) return rc;
  if (N < 1) return ts_errf(err, TS_EINVAL, "fit metrics: no labelled rows");
  int64_t *perm = tl_malloc((size_t)N * sizeof *perm);
  if (!perm)
    return ts_errf(err, TS_ENOMEM, "fit metrics: out of memory for %lld row indices", (long long)N);
  int64_t n_val;
  aw_split(N, o->validation_fraction, o->seed, perm, &n_val);
  const int64_t *train = perm + n_val;
  int64_t n_train = N - n_val;
  const int64_t *cmp = n_val > 0 ? perm : train;
  int64_t n_cmp = n_val > 0 ? n_val : n_train;
  rc = aw_eval(s, P, labels, train, n_train, theta_before, threshold, &out->before, err);
  if (!rc) rc = aw_eval(s, P, labels, train, n_train, theta, threshold, &out->after, err);
  if (!rc) rc = aw_eval(s, P, labels, perm, n_val, theta, threshold, &out->validation, err);
  if (!rc) rc = aw_eval(s, P, labels, cmp, n_cmp, NULL, threshold, &out->uniform, err);
  for (int f = 0; f < s->F && !rc; f++)
    rc = aw_eval_family(s, P, labels, cmp, n_cmp, f, threshold, &out->families[f], err);
  tl_free(perm);
  return rc;
}
