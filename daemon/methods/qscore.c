/* qscore.c - scores for quantile predictions (pinball, interval score, WIS,
 * coverage) and conformal calibration of the intervals (CQR, Romano,
 * Patterson and Candes 2019). Everything here is plain double arithmetic on
 * rows of K levels; the rules for applying a CQR correction are in qagg.h. */
#include "qagg.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "../base/mem.h"

double qa_pinball(double tau, double y, double q) {
  double d = y - q;
  return d >= 0 ? tau * d : (tau - 1.0) * d;
}

double qa_interval_score(double alpha, double l, double u, double y) {
  double s = u - l;
  if (y < l) s += (2.0 / alpha) * (l - y);
  if (y > u) s += (2.0 / alpha) * (y - u);
  return s;
}

int qa_central_intervals(int K, const double *levels, int *lo, int *hi, double *alpha, int *n_int,
                         int *median_index, ts_err *err) {
  if (K < 1 || K > QA_MAX_K || !levels)
    return ts_errf(err, TS_EINVAL, "levels: K must be in [1, %d], got %d", QA_MAX_K, K);
  int n = 0, med = -1;
  for (int i = 0; i < K; i++) {
    double t = levels[i];
    if (fabs(t - 0.5) <= QA_LEVEL_TOL) {
      med = i;
      continue;
    }
    if (t > 0.5) continue;
    for (int j = i + 1; j < K; j++)
      if (fabs(levels[j] - (1.0 - t)) <= QA_LEVEL_TOL) {
        lo[n] = i;
        hi[n] = j;
        alpha[n] = 2.0 * t;
        n++;
        break;
      }
  }
  *n_int = n;
  *median_index = med;
  return 0;
}

double qa_wis_bracher(int n_int, const int *lo, const int *hi, const double *alpha,
                      int median_index, const float *q, double y) {
  double s = 0.5 * fabs(y - (double)q[median_index]);
  for (int i = 0; i < n_int; i++)
    s += 0.5 * alpha[i] * qa_interval_score(alpha[i], q[lo[i]], q[hi[i]], y);
  return s / (n_int + 0.5);
}

double qa_wis_pinball(int K, const double *levels, const float *q, double y) {
  double s = 0.0;
  for (int k = 0; k < K; k++) s += qa_pinball(levels[k], y, q[k]);
  return 2.0 * s / K;
}

void qa_metrics_free(qa_metrics *m) {
  if (!m) return;
  tl_free(m->nominal);
  tl_free(m->lo);
  memset(m, 0, sizeof *m);
}

int qa_metrics_compute(int K, const double *levels, int64_t N, const float *Q, const float *y,
                       qa_metrics *m, ts_err *err) {
  memset(m, 0, sizeof *m);
  if (N < 1)
    return ts_errf(err, TS_EINVAL, "metrics: need at least one row, got %lld", (long long)N);
  int half = K / 2 + 1;
  m->nominal = tl_calloc((size_t)half * 3, sizeof(double));
  m->lo = tl_calloc((size_t)half * 2, sizeof(int));
  if (!m->nominal || !m->lo) {
    qa_metrics_free(m);
    return ts_errf(err, TS_ENOMEM, "metrics: out of memory");
  }
  m->interval_score = m->nominal + half;
  m->coverage = m->nominal + 2 * half;
  m->hi = m->lo + half;
  double *alpha = m->nominal; /* holds alpha until the end */
  int med;
  int rc = qa_central_intervals(K, levels, m->lo, m->hi, alpha, &m->n_int, &med, err);
  if (rc) {
    qa_metrics_free(m);
    return rc;
  }
  m->n = N;
  double pin = 0.0, wis = 0.0;
  for (int64_t r = 0; r < N; r++) {
    const float *q = Q + r * K;
    double yr = y[r];
    for (int k = 0; k < K; k++) pin += qa_pinball(levels[k], yr, q[k]);
    if (med >= 0) wis += qa_wis_bracher(m->n_int, m->lo, m->hi, alpha, med, q, yr);
    for (int i = 0; i < m->n_int; i++) {
      double l = q[m->lo[i]], u = q[m->hi[i]];
      m->interval_score[i] += qa_interval_score(alpha[i], l, u, yr);
      m->coverage[i] += (l <= yr && yr <= u) ? 1.0 : 0.0;
    }
  }
  m->mean_pinball = pin / ((double)N * K);
  m->wis = med >= 0 ? wis / (double)N : NAN;
  for (int i = 0; i < m->n_int; i++) {
    m->interval_score[i] /= (double)N;
    m->coverage[i] /= (double)N;
    m->nominal[i] = 1.0 - alpha[i];
  }
  return 0;
}

/* ------------------------------------------------------------------ CQR */

static const char *const cqr_names[] = {"symmetric", "asymmetric", "per_quantile"};

const char *qa_cqr_mode_name(qa_cqr_mode m) {
  return (unsigned)m < 3 ? cqr_names[m] : "?";
}

int qa_cqr_mode_from_name(const char *name, qa_cqr_mode *out) {
  for (int i = 0; i < 3; i++)
    if (name && strcmp(name, cqr_names[i]) == 0) {
      *out = (qa_cqr_mode)i;
      return 0;
    }
  return -TS_EINVAL;
}

static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

/* The ceil(p (n + 1))-th smallest of e[n] (sorted in place) into *out;
 * +inf or an error when that rank exceeds n. */
static int kth_rank(double *e, int64_t n, double p, int allow_inf, double tau, double *out,
                    ts_err *err) {
  int64_t rank = (int64_t)ceil(p * (double)(n + 1) - 1e-9);
  if (rank < 1) rank = 1;
  if (rank > n) {
    if (allow_inf) {
      *out = INFINITY;
      return 0;
    }
    return ts_errf(
        err, TS_EINVAL,
        "conformal: too few calibration rows (n=%lld) for a finite correction at level %g: "
        "rank %lld > n; use more rows or allow infinite corrections",
        (long long)n, tau, (long long)rank);
  }
  qsort(e, (size_t)n, sizeof(double), cmp_double);
  *out = e[rank - 1];
  return 0;
}

int qa_cqr_fit(qa_cqr_mode mode, int K, const double *levels, int64_t n, const float *Q,
               const float *y, int allow_inf, double *lower, double *upper, ts_err *err) {
  if (n < 1)
    return ts_errf(err, TS_EINVAL, "conformal: needs calibration rows, got %lld", (long long)n);
  if ((unsigned)mode > QA_CQR_PER_QUANTILE)
    return ts_errf(err, TS_EINVAL, "conformal: unknown mode %d", (int)mode);
  int lo[QA_MAX_K / 2 + 1], hi[QA_MAX_K / 2 + 1], nint, med;
  double alpha[QA_MAX_K / 2 + 1];
  int rc = qa_central_intervals(K, levels, lo, hi, alpha, &nint, &med, err);
  if (rc) return rc;
  if (mode != QA_CQR_PER_QUANTILE && nint == 0)
    return ts_errf(err, TS_EINVAL,
                   "conformal: the levels form no central interval (pairs tau, 1 - tau)");
  for (int k = 0; k < K; k++) lower[k] = upper[k] = 0.0;
  double *e = tl_malloc((size_t)n * sizeof(double));
  if (!e)
    return ts_errf(err, TS_ENOMEM, "conformal: out of memory for %lld residuals", (long long)n);
  if (mode == QA_CQR_PER_QUANTILE) {
    for (int k = 0; k < K && rc == 0; k++) {
      double t = levels[k];
      if (fabs(t - 0.5) <= QA_LEVEL_TOL) continue;
      for (int64_t i = 0; i < n; i++) {
        double qk = Q[i * K + k];
        e[i] = t > 0.5 ? (double)y[i] - qk : qk - (double)y[i];
      }
      rc =
          kth_rank(e, n, t > 0.5 ? t : 1.0 - t, allow_inf, t, t > 0.5 ? &upper[k] : &lower[k], err);
    }
  } else {
    for (int j = 0; j < nint && rc == 0; j++) {
      int l = lo[j], h = hi[j];
      double a = alpha[j];
      if (mode == QA_CQR_SYMMETRIC) {
        for (int64_t i = 0; i < n; i++) {
          double el = Q[i * K + l] - (double)y[i], eh = (double)y[i] - Q[i * K + h];
          e[i] = el > eh ? el : eh;
        }
        double qv;
        rc = kth_rank(e, n, 1.0 - a, allow_inf, levels[l], &qv, err);
        lower[l] = upper[h] = qv;
      } else {
        for (int64_t i = 0; i < n; i++) e[i] = Q[i * K + l] - (double)y[i];
        rc = kth_rank(e, n, 1.0 - a / 2, allow_inf, levels[l], &lower[l], err);
        if (rc) break;
        for (int64_t i = 0; i < n; i++) e[i] = (double)y[i] - Q[i * K + h];
        rc = kth_rank(e, n, 1.0 - a / 2, allow_inf, levels[h], &upper[h], err);
      }
    }
  }
  tl_free(e);
  return rc;
}

void qa_cqr_apply(int K, const double *lower, const double *upper, int64_t B, float *Q) {
  for (int64_t b = 0; b < B; b++)
    for (int k = 0; k < K; k++) Q[b * K + k] = (float)((double)Q[b * K + k] - lower[k] + upper[k]);
}
