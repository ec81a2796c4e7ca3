/* calib.c - temperature scaling and reliability bins (see calib.h). */
#include "calib.h"

#include <math.h>
#include <string.h>

#include "../base/mem.h"
#include "metrics.h"

static double cal__clamp(double p) {
  if (!(p >= MET_EPS)) return MET_EPS;
  if (p > 1.0 - MET_EPS) return 1.0 - MET_EPS;
  return p;
}

static double cal__softplus(double a) {
  return (a > 0 ? a : 0) + log1p(exp(-fabs(a)));
}

static double cal__sigmoid(double a) {
  if (a >= 0) return 1.0 / (1.0 + exp(-a));
  double e = exp(a);
  return e / (1.0 + e);
}

void cal_logits(int64_t N, int C, const double *y, double *z) {
  if (C < 2) {
    for (int64_t i = 0; i < N; i++) {
      double p = cal__clamp(y[i]);
      z[i] = log(p) - log1p(-p);
    }
    return;
  }
  for (int64_t i = 0; i < N * C; i++) z[i] = log(cal__clamp(y[i]));
}

void cal_temp_apply(int64_t N, int C, const double *y, double T, double *out) {
  double s = 1.0 / T;
  if (C < 2) {
    for (int64_t i = 0; i < N; i++) {
      double p = cal__clamp(y[i]);
      out[i] = cal__sigmoid((log(p) - log1p(-p)) * s);
    }
    return;
  }
  for (int64_t i = 0; i < N; i++) {
    const double *r = y + i * C;
    double *o = out + i * C, mx = -INFINITY;
    for (int c = 0; c < C; c++) {
      o[c] = log(cal__clamp(r[c])) * s;
      if (o[c] > mx) mx = o[c];
    }
    double sum = 0;
    for (int c = 0; c < C; c++) sum += (o[c] = exp(o[c] - mx));
    for (int c = 0; c < C; c++) o[c] /= sum;
  }
}

double cal_temp_loss(int64_t N, int C, const double *z, const int32_t *labels, double u,
                     double *grad, double *hess) {
  double s = exp(-u), L = 0, g = 0, h = 0;
  if (C < 2) {
    for (int64_t i = 0; i < N; i++) {
      double a = z[i] * s, t = labels[i] ? 1.0 : 0.0, p = cal__sigmoid(a);
      L += cal__softplus(a) - t * a;
      g += -(p - t) * a;
      h += p * (1 - p) * a * a + (p - t) * a;
    }
  } else {
    for (int64_t i = 0; i < N; i++) {
      const double *r = z + i * C;
      double mx = -INFINITY, sum = 0, mean = 0, sq = 0;
      for (int c = 0; c < C; c++)
        if (r[c] * s > mx) mx = r[c] * s;
      for (int c = 0; c < C; c++) sum += exp(r[c] * s - mx);
      double lse = mx + log(sum);
      for (int c = 0; c < C; c++) {
        double a = r[c] * s, p = exp(a - lse);
        mean += p * a;
        sq += p * a * a;
      }
      double at = r[labels[i]] * s, var = sq - mean * mean;
      L += lse - at;
      g += at - mean;
      h += (var > 0 ? var : 0) + mean - at;
    }
  }
  double n = N > 0 ? (double)N : 1.0;
  if (grad) *grad = g / n;
  if (hess) *hess = h / n;
  return L / n;
}

int cal_temp_fit(int64_t N, int C, const double *y, const int32_t *labels, int max_iter, double tol,
                 cal_temp_report *rep, ts_err *err) {
  if (N < 1) return ts_errf(err, TS_EINVAL, "temperature scaling: no labelled rows");
  if (max_iter < 1) return ts_errf(err, TS_EINVAL, "temperature scaling: max_iter must be >= 1");
  int rc = met_check_labels(N, C, labels, err);
  if (rc) return rc;
  int Cc = C < 2 ? 1 : C;
  for (int64_t i = 0; i < N * Cc; i++)
    if (!isfinite(y[i]))
      return ts_errf(err, TS_EINVAL, "temperature scaling: row %lld: probability is not finite",
                     (long long)(i / Cc));
  double *z = tl_malloc(sizeof(double) * (size_t)N * (size_t)Cc);
  if (!z)
    return ts_errf(err, TS_ENOMEM, "temperature scaling: out of memory for %lld rows",
                   (long long)N);
  cal_logits(N, C, y, z);
  const double ulo = log(CAL_T_MIN), uhi = log(CAL_T_MAX);
  double u = 0, g, h;
  double L = cal_temp_loss(N, C, z, labels, u, &g, &h);
  memset(rep, 0, sizeof *rep);
  rep->loss_before = L;
  int it = 0;
  while (it < max_iter && fabs(g) > tol) {
    it++;
    double step = h > 1e-12 ? -g / h : -g;
    if (step > 2) step = 2; /* at most a factor e^2 in T per step */
    if (step < -2) step = -2;
    if (u + step > uhi) step = uhi - u;
    if (u + step < ulo) step = ulo - u;
    if (step == 0) break; /* at a bound, pushed outwards */
    double un = u, Ln = L, gn = g, hn = h;
    int ok = 0;
    for (int k = 0; k < 60; k++) {
      un = u + step;
      Ln = cal_temp_loss(N, C, z, labels, un, &gn, &hn);
      if (Ln <= L + 1e-4 * step * g || fabs(step) < 1e-15) {
        ok = 1;
        break;
      }
      step *= 0.5;
    }
    if (!ok || un == u) break;
    u = un;
    L = Ln;
    g = gn;
    h = hn;
  }
  tl_free(z);
  rep->temperature = exp(u);
  rep->iterations = it;
  rep->loss_after = L;
  rep->grad = g;
  /* stopped at a bound with the loss still falling beyond it */
  rep->at_bound = (u <= ulo + 1e-9 && g > tol) || (u >= uhi - 1e-9 && g < -tol);
  return 0;
}

void cal_reliability(int64_t N, int C, const double *y, const int32_t *labels, int n_bins,
                     cal_bin *bins, double *ece, double *mce) {
  for (int b = 0; b < n_bins; b++) {
    bins[b].count = 0;
    bins[b].confidence = 0;
    bins[b].accuracy = 0;
  }
  for (int64_t i = 0; i < N; i++) {
    double conf;
    int pred;
    if (C < 2) {
      pred = y[i] >= 0.5;
      conf = pred ? y[i] : 1.0 - y[i];
    } else {
      const double *r = y + i * C;
      pred = 0;
      for (int c = 1; c < C; c++)
        if (r[c] > r[pred]) pred = c;
      conf = r[pred];
    }
    int b = (int)ceil(conf * n_bins) - 1;
    if (b < 0) b = 0;
    if (b >= n_bins) b = n_bins - 1;
    bins[b].count++;
    bins[b].confidence += conf;
    bins[b].accuracy += pred == labels[i] ? 1.0 : 0.0;
  }
  double e = 0, m = 0;
  for (int b = 0; b < n_bins; b++) {
    if (!bins[b].count) {
      bins[b].confidence = bins[b].accuracy = NAN;
      continue;
    }
    bins[b].confidence /= (double)bins[b].count;
    bins[b].accuracy /= (double)bins[b].count;
    double gap = fabs(bins[b].accuracy - bins[b].confidence);
    e += (double)bins[b].count / (double)N * gap;
    if (gap > m) m = gap;
  }
  *ece = N > 0 ? e : NAN;
  *mce = N > 0 ? m : NAN;
}
