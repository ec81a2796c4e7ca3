/* qlive.c - rolling scores of served quantiles and adaptive conformal
 * inference (see qlive.h). */
#include "qlive.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "../base/mem.h"
#include "qagg.h"

/* ---- rolling tracker ---------------------------------------------------- */

int ql_track_init(ql_track *t, int K, const double *levels, int64_t window, ts_err *err) {
  memset(t, 0, sizeof *t);
  if (window < 1) return ts_errf(err, TS_EINVAL, "rolling window must be >= 1 rows");
  int half = K / 2 + 1;
  t->lo = tl_calloc((size_t)half * 2, sizeof(int));
  t->alpha = tl_calloc((size_t)half, sizeof(double));
  if (!t->lo || !t->alpha) {
    ql_track_free(t);
    return ts_errf(err, TS_ENOMEM, "out of memory");
  }
  t->hi = t->lo + half;
  int rc = qa_central_intervals(K, levels, t->lo, t->hi, t->alpha, &t->n_int, &t->median, err);
  if (rc) {
    ql_track_free(t);
    return rc;
  }
  t->K = K;
  t->levels = levels;
  t->window = window;
  size_t ni = (size_t)(t->n_int ? t->n_int : 1);
  t->cover = tl_calloc((size_t)window * ni, 1);
  t->pinball = tl_calloc((size_t)window, sizeof(double));
  t->wis = tl_calloc((size_t)window, sizeof(double));
  t->cover_count = tl_calloc(ni, sizeof(int64_t));
  if (!t->cover || !t->pinball || !t->wis || !t->cover_count) {
    ql_track_free(t);
    return ts_errf(err, TS_ENOMEM, "out of memory for a rolling window of %lld rows",
                   (long long)window);
  }
  return 0;
}

void ql_track_free(ql_track *t) {
  tl_free(t->lo);
  tl_free(t->alpha);
  tl_free(t->cover);
  tl_free(t->pinball);
  tl_free(t->wis);
  tl_free(t->cover_count);
  memset(t, 0, sizeof *t);
}

void ql_track_add(ql_track *t, const float *q, double y) {
  int64_t p = t->pos;
  unsigned char *cv = t->cover + p * t->n_int;
  if (t->filled == t->window) { /* the oldest row leaves */
    for (int i = 0; i < t->n_int; i++) t->cover_count[i] -= cv[i];
    t->pin_sum -= t->pinball[p];
    if (t->median >= 0) t->wis_sum -= t->wis[p];
  } else {
    t->filled++;
  }
  for (int i = 0; i < t->n_int; i++) {
    cv[i] = q[t->lo[i]] <= y && y <= q[t->hi[i]];
    t->cover_count[i] += cv[i];
  }
  double pin = 0;
  for (int k = 0; k < t->K; k++) pin += qa_pinball(t->levels[k], y, q[k]);
  t->pinball[p] = pin / t->K;
  t->pin_sum += t->pinball[p];
  if (t->median >= 0) {
    t->wis[p] = qa_wis_bracher(t->n_int, t->lo, t->hi, t->alpha, t->median, q, y);
    t->wis_sum += t->wis[p];
  } else {
    t->wis[p] = NAN;
  }
  t->total++;
  t->pos = (p + 1) % t->window;
  if (t->pos == 0 && isfinite(t->pin_sum)) { /* once a window: sums afresh, no drift */
    double ps = 0, ws = 0;
    for (int64_t r = 0; r < t->filled; r++) {
      ps += t->pinball[r];
      if (t->median >= 0) ws += t->wis[r];
    }
    t->pin_sum = ps;
    t->wis_sum = ws;
  }
}

void ql_track_get(const ql_track *t, double *coverage, double *pinball, double *wis) {
  double n = (double)t->filled;
  if (coverage)
    for (int i = 0; i < t->n_int; i++)
      coverage[i] = t->filled ? (double)t->cover_count[i] / n : NAN;
  if (!t->filled || !isfinite(t->pin_sum)) {
    /* an infinite loss that left the window leaves inf - inf = NaN behind:
     * recount (rare: only with unbounded intervals) */
    double ps = 0, ws = 0;
    for (int64_t r = 0; r < t->filled; r++) {
      ps += t->pinball[r];
      if (t->median >= 0) ws += t->wis[r];
    }
    if (pinball) *pinball = t->filled ? ps / n : NAN;
    if (wis) *wis = t->filled && t->median >= 0 ? ws / n : NAN;
    return;
  }
  if (pinball) *pinball = t->pin_sum / n;
  if (wis) *wis = t->median >= 0 ? t->wis_sum / n : NAN;
}

/* ---- adaptive conformal inference ---------------------------------------- */

static int ql__aci_alloc(ql_aci *a, int K, const double *levels, int64_t n, double gamma,
                         int allow_inf, ts_err *err) {
  memset(a, 0, sizeof *a);
  if (!(gamma > 0 && gamma <= 1))
    return ts_errf(err, TS_EINVAL, "adaptive: gamma must be in (0, 1], got %g", gamma);
  if (n < 1) return ts_errf(err, TS_EINVAL, "adaptive: no calibration rows");
  int half = K / 2 + 1, med;
  a->lo = tl_calloc((size_t)half * 2, sizeof(int));
  a->alpha = tl_calloc((size_t)half * 2, sizeof(double));
  a->misses = tl_calloc((size_t)half, sizeof(int64_t));
  if (!a->lo || !a->alpha || !a->misses) {
    ql_aci_free(a);
    return ts_errf(err, TS_ENOMEM, "out of memory");
  }
  a->hi = a->lo + half;
  a->alpha_t = a->alpha + half;
  int rc = qa_central_intervals(K, levels, a->lo, a->hi, a->alpha, &a->n_int, &med, err);
  if (!rc && a->n_int == 0)
    rc = ts_errf(err, TS_EINVAL,
                 "adaptive: the levels form no central interval (pairs tau, 1 - tau)");
  if (rc) {
    ql_aci_free(a);
    return rc;
  }
  a->ring = tl_malloc(sizeof(float) * (size_t)n * (size_t)a->n_int);
  a->sorted = tl_malloc(sizeof(float) * (size_t)n * (size_t)a->n_int);
  if (!a->ring || !a->sorted) {
    ql_aci_free(a);
    return ts_errf(err, TS_ENOMEM, "out of memory for %lld conformity scores", (long long)n);
  }
  for (int i = 0; i < a->n_int; i++) a->alpha_t[i] = a->alpha[i];
  a->K = K;
  a->n = n;
  a->gamma = gamma;
  a->allow_inf = allow_inf;
  return 0;
}

static int ql__cmp_float(const void *x, const void *y) {
  float a = *(const float *)x, b = *(const float *)y;
  return a < b ? -1 : a > b;
}

static void ql__sort_all(ql_aci *a) {
  memcpy(a->sorted, a->ring, sizeof(float) * (size_t)a->n * (size_t)a->n_int);
  for (int i = 0; i < a->n_int; i++)
    qsort(a->sorted + (int64_t)i * a->n, (size_t)a->n, sizeof(float), ql__cmp_float);
}

static double ql__score(const ql_aci *a, int i, const float *q, double y) {
  double e1 = (double)q[a->lo[i]] - y, e2 = y - (double)q[a->hi[i]];
  return e1 > e2 ? e1 : e2;
}

int ql_aci_init(ql_aci *a, int K, const double *levels, int64_t n, const float *Q, const float *y,
                int64_t window, double gamma, int allow_inf, ts_err *err) {
  if (window < 1) return ts_errf(err, TS_EINVAL, "adaptive: the score window must be >= 1 rows");
  int64_t m = n < window ? n : window, first = n - m;
  int rc = ql__aci_alloc(a, K, levels, m, gamma, allow_inf, err);
  if (rc) return rc;
  for (int i = 0; i < a->n_int; i++) {
    float *s = a->ring + (int64_t)i * m;
    for (int64_t r = 0; r < m; r++) {
      double e = ql__score(a, i, Q + (first + r) * K, y[first + r]);
      s[r] = (float)e;
      if (!isfinite(s[r])) {
        ql_aci_free(a);
        return ts_errf(err, TS_EINVAL,
                       "adaptive: row %lld: the conformity score is not finite (values too large "
                       "in magnitude)",
                       (long long)(first + r));
      }
    }
  }
  ql__sort_all(a);
  return 0;
}

int ql_aci_init_scores(ql_aci *a, int K, const double *levels, int64_t n_int, int64_t n,
                       const float *scores, double gamma, int allow_inf, ts_err *err) {
  int rc = ql__aci_alloc(a, K, levels, n, gamma, allow_inf, err);
  if (rc) return rc;
  if (n_int != a->n_int) {
    rc = ts_errf(err, TS_EINVAL,
                 "adaptive: %lld intervals of stored scores; the levels form %d central intervals",
                 (long long)n_int, a->n_int);
    ql_aci_free(a);
    return rc;
  }
  for (int64_t i = 0; i < n * a->n_int; i++)
    if (!isfinite(scores[i])) {
      ql_aci_free(a);
      return ts_errf(err, TS_EINVAL, "adaptive: stored score %lld is not finite", (long long)i);
    }
  memcpy(a->ring, scores, sizeof(float) * (size_t)n * (size_t)a->n_int);
  ql__sort_all(a);
  return 0;
}

void ql_aci_free(ql_aci *a) {
  tl_free(a->lo);
  tl_free(a->alpha);
  tl_free(a->misses);
  tl_free(a->ring);
  tl_free(a->sorted);
  memset(a, 0, sizeof *a);
}

double ql_aci_width(const ql_aci *a, int i) {
  double r = ceil((1.0 - a->alpha_t[i]) * (double)(a->n + 1) - 1e-9);
  const float *s = a->sorted + (int64_t)i * a->n;
  if (r > (double)a->n) return a->allow_inf ? INFINITY : s[a->n - 1];
  if (r < 1) return s[0];
  return s[(int64_t)r - 1];
}

void ql_aci_corrections(const ql_aci *a, double *lower, double *upper) {
  for (int k = 0; k < a->K; k++) lower[k] = upper[k] = 0;
  for (int i = 0; i < a->n_int; i++) lower[a->lo[i]] = upper[a->hi[i]] = ql_aci_width(a, i);
}

void ql_aci_observe(ql_aci *a, const float *served, double y) {
  for (int i = 0; i < a->n_int; i++) {
    int miss = !(served[a->lo[i]] <= y && y <= served[a->hi[i]]);
    a->misses[i] += miss;
    double v = a->alpha_t[i] + a->gamma * (a->alpha[i] - (double)miss);
    double floor_ = a->allow_inf ? -1.0 : 0.0;
    a->alpha_t[i] = v < floor_ ? floor_ : v > 2.0 ? 2.0 : v;
  }
  a->t++;
}

/* First index in s[0..n) whose value is >= v (or > v with after). */
static int64_t ql__bound(const float *s, int64_t n, float v, int after) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    int64_t m = lo + (hi - lo) / 2;
    if (after ? s[m] <= v : s[m] < v)
      lo = m + 1;
    else
      hi = m;
  }
  return lo;
}

void ql_aci_push(ql_aci *a, const float *raw, double y) {
  float e[QA_MAX_K / 2 + 1];
  for (int i = 0; i < a->n_int; i++) {
    e[i] = (float)ql__score(a, i, raw, y);
    if (!isfinite(e[i])) return;
  }
  for (int i = 0; i < a->n_int; i++) {
    float *ring = a->ring + (int64_t)i * a->n, *s = a->sorted + (int64_t)i * a->n;
    float old = ring[a->pos];
    ring[a->pos] = e[i];
    int64_t at = ql__bound(s, a->n, old, 0); /* the old score: s[at] == old */
    memmove(s + at, s + at + 1, sizeof(float) * (size_t)(a->n - 1 - at));
    int64_t to = ql__bound(s, a->n - 1, e[i], 1);
    memmove(s + to + 1, s + to, sizeof(float) * (size_t)(a->n - 1 - to));
    s[to] = e[i];
  }
  a->pos = (a->pos + 1) % a->n;
  a->pushed++;
}

void ql_aci_scores_in_order(const ql_aci *a, int i, float *out) {
  const float *ring = a->ring + (int64_t)i * a->n;
  int64_t k = a->n - a->pos;
  memcpy(out, ring + a->pos, sizeof(float) * (size_t)k);
  memcpy(out + k, ring, sizeof(float) * (size_t)a->pos);
}
