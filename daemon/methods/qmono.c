/* qmono.c - monotone (non-crossing) steps for a row of predicted quantiles.
 *
 * Sorting and isotonic regression can only lower WIS (Fakoor et al., and
 * tests/unit/test_qagg.c checks it on random rows); the median-anchored step
 * keeps the median and makes each side monotone away from it. */
#include "qagg.h"

#include <stdlib.h>

/* Pool-adjacent-violators with equal weights. Block means live in v[0..nb)
 * while the blocks are built (block b starts at or after position b, so a
 * mean never overwrites an input not yet read), lengths in len[]; the
 * blocks are then expanded from the right. */
void qa_isotonic(int n, double *v) {
  int len[QA_MAX_K];
  int nb = 0;
  for (int i = 0; i < n; i++) {
    double m = v[i];
    int l = 1;
    while (nb > 0 && v[nb - 1] > m) {
      nb--;
      m = (v[nb] * len[nb] + m * l) / (double)(len[nb] + l);
      l += len[nb];
    }
    v[nb] = m;
    len[nb] = l;
    nb++;
  }
  int pos = n;
  for (int b = nb - 1; b >= 0; b--) {
    double m = v[b];
    for (int t = 0; t < len[b]; t++) v[--pos] = m;
  }
}

static int cmp_float(const void *a, const void *b) {
  float x = *(const float *)a, y = *(const float *)b;
  return (x > y) - (x < y);
}

int qa_monotone_apply(qa_monotone m, int K, int median_index, float *q, ts_err *err) {
  if (K < 1 || K > QA_MAX_K)
    return ts_errf(err, TS_EINVAL, "monotone: K must be in [1, %d], got %d", QA_MAX_K, K);
  switch (m) {
    case QA_MONO_NONE: return 0;
    case QA_MONO_SORT: qsort(q, (size_t)K, sizeof(float), cmp_float); return 0;
    case QA_MONO_ISOTONIC: {
      double v[QA_MAX_K];
      for (int k = 0; k < K; k++) v[k] = q[k];
      qa_isotonic(K, v);
      for (int k = 0; k < K; k++) q[k] = (float)v[k];
      return 0;
    }
    case QA_MONO_MEDIAN:
      if (median_index < 0 || median_index >= K)
        return ts_errf(
            err, TS_EINVAL,
            "monotone 'median': the levels have no median (0.5) level; median index %d of K=%d",
            median_index, K);
      for (int k = median_index - 1; k >= 0; k--)
        if (q[k + 1] < q[k]) q[k] = q[k + 1];
      for (int k = median_index + 1; k < K; k++)
        if (q[k - 1] > q[k]) q[k] = q[k - 1];
      return 0;
  }
  return ts_errf(err, TS_EINVAL, "monotone: unknown mode %d", (int)m);
}

typedef struct mono_ctx {
  qa_monotone m;
  int K, median;
  float *Q;
} mono_ctx;

static void mono_rows(void *arg, int64_t b0, int64_t b1) {
  mono_ctx *c = arg;
  for (int64_t b = b0; b < b1; b++) qa_monotone_apply(c->m, c->K, c->median, c->Q + b * c->K, NULL);
}

int qa_monotone_rows(pool_t *pool, qa_monotone m, int64_t B, int K, int median_index, float *Q,
                     ts_err *err) {
  if ((unsigned)m > QA_MONO_MEDIAN)
    return ts_errf(err, TS_EINVAL, "monotone: unknown mode %d", (int)m);
  if (K < 1 || K > QA_MAX_K)
    return ts_errf(err, TS_EINVAL, "monotone: K must be in [1, %d], got %d", QA_MAX_K, K);
  if (m == QA_MONO_MEDIAN && (median_index < 0 || median_index >= K))
    return ts_errf(
        err, TS_EINVAL,
        "monotone 'median': the levels have no median (0.5) level; median index %d of K=%d",
        median_index, K);
  /* Every row is now valid, so the parallel rows cannot fail. */
  if (m == QA_MONO_NONE || B <= 0) return 0;
  mono_ctx c = {m, K, median_index, Q};
  pool_parallel_for(pool, B, 512, mono_rows, &c);
  return 0;
}
