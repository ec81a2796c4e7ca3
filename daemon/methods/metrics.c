/* metrics.c - log loss, ROC AUC, accuracy and F1 (see metrics.h).
 *
 * AUC: sort the positives' and the negatives' scores apart (radix sort on
 * order-preserving integer keys, O(N)), then merge: each positive wins over
 * the negatives strictly below it and ties, counted half, with the equal
 * ones. This is the average-rank Mann-Whitney formula written with integer
 * counts, so it is exact and needs no rank array. */
#include "metrics.h"

#include <math.h>
#include <string.h>

#include "../base/mem.h"

int met_check_labels(int64_t N, int C, const int32_t *labels, ts_err *err) {
  int hi = C < 2 ? 2 : C;
  for (int64_t i = 0; i < N; i++) {
    if (labels[i] < 0 || labels[i] >= hi) {
      if (C < 2)
        return ts_errf(err, TS_EINVAL, "labels row %lld: %d is not a binary label (0 or 1)",
                       (long long)i, labels[i]);
      return ts_errf(err, TS_EINVAL, "labels row %lld: class %d is outside [0, %d)", (long long)i,
                     labels[i], C);
    }
  }
  return 0;
}

static double met__clamp(double p) {
  if (p < MET_EPS) return MET_EPS;
  if (p > 1.0 - MET_EPS) return 1.0 - MET_EPS;
  return p;
}

double met_log_loss(int64_t N, int C, const double *y, const int32_t *labels) {
  if (N <= 0) return NAN;
  double s = 0.0;
  for (int64_t i = 0; i < N; i++) {
    double p;
    if (C < 2)
      p = labels[i] ? y[i] : 1.0 - y[i];
    else
      p = y[i * C + labels[i]];
    s -= log(met__clamp(p));
  }
  return s / (double)N;
}

/* Orders like the doubles it encodes (finite values; -0 is folded into +0
 * first so that equal scores give equal keys). */
static inline uint64_t met__key(double v) {
  v += 0.0; /* -0.0 + 0.0 = +0.0 */
  uint64_t u;
  memcpy(&u, &v, sizeof u);
  return (u >> 63) ? ~u : (u | 0x8000000000000000ull);
}

/* LSD radix sort, one byte per pass; passes where every key has the same
 * byte (the sign and exponent bytes of probabilities, mostly) are skipped. */
static void met__radix(uint64_t *a, uint64_t *tmp, int64_t n) {
  int64_t cnt[8][256];
  memset(cnt, 0, sizeof cnt);
  for (int64_t i = 0; i < n; i++)
    for (int d = 0; d < 8; d++) cnt[d][(a[i] >> (8 * d)) & 255]++;
  uint64_t *src = a, *dst = tmp;
  for (int d = 0; d < 8; d++) {
    if (n == 0 || cnt[d][(src[0] >> (8 * d)) & 255] == n) continue;
    int64_t pos = 0;
    for (int k = 0; k < 256; k++) {
      int64_t c = cnt[d][k];
      cnt[d][k] = pos;
      pos += c;
    }
    for (int64_t i = 0; i < n; i++) dst[cnt[d][(src[i] >> (8 * d)) & 255]++] = src[i];
    uint64_t *t = src;
    src = dst;
    dst = t;
  }
  if (src != a) memcpy(a, src, (size_t)n * sizeof *a);
}

/* AUC of column `col` of y [N, stride] for "label == cls" against the rest:
 * positive and negative keys are sorted apart (buf, tmp: N keys each), then
 * one merge counts for each positive the negatives below it and those tied
 * with it. NaN when one side is empty. */
static double met__auc_col(int64_t N, const double *y, int stride, int col, const int32_t *labels,
                           int32_t cls, uint64_t *buf, uint64_t *tmp) {
  int64_t np = 0, nn = 0;
  for (int64_t i = 0; i < N; i++) {
    uint64_t k = met__key(y[i * stride + col]);
    if (labels[i] == cls)
      buf[np++] = k;
    else
      buf[N - 1 - nn++] = k;
  }
  if (np == 0 || nn == 0) return NAN;
  uint64_t *pk = buf, *nk = buf + np;
  met__radix(pk, tmp, np);
  met__radix(nk, tmp, nn);
  double wins = 0.0;
  int64_t j = 0;
  for (int64_t i = 0; i < np;) {
    uint64_t v = pk[i];
    int64_t gp = 0;
    while (i < np && pk[i] == v) i++, gp++;
    while (j < nn && nk[j] < v) j++;
    int64_t k = j;
    while (k < nn && nk[k] == v) k++;
    wins += (double)gp * ((double)j + 0.5 * (double)(k - j));
  }
  return wins / ((double)np * (double)nn);
}

int met_auc(int64_t N, int C, const double *y, const int32_t *labels, double *out, ts_err *err) {
  *out = NAN;
  if (N <= 0) return 0;
  uint64_t *buf = tl_malloc((size_t)N * 2 * sizeof *buf);
  if (!buf)
    return ts_errf(err, TS_ENOMEM, "out of memory for the AUC sort buffer (%lld rows)",
                   (long long)N);
  if (C < 2) {
    *out = met__auc_col(N, y, 1, 0, labels, 1, buf, buf + N);
  } else {
    double sum = 0.0;
    int used = 0;
    for (int c = 0; c < C; c++) {
      double a = met__auc_col(N, y, C, c, labels, c, buf, buf + N);
      if (!isnan(a)) {
        sum += a;
        used++;
      }
    }
    if (used) *out = sum / used;
  }
  tl_free(buf);
  return 0;
}

static int met__argmax(const double *row, int C) {
  int best = 0;
  for (int c = 1; c < C; c++)
    if (row[c] > row[best]) best = c;
  return best;
}

static double met__f1(double tp, double fp, double fn) {
  double d = 2.0 * tp + fp + fn;
  return d > 0.0 ? 2.0 * tp / d : 0.0;
}

int met_accuracy_f1(int64_t N, int C, const double *y, const int32_t *labels, double threshold,
                    double *accuracy, double *f1, ts_err *err) {
  if (N <= 0) {
    *accuracy = *f1 = NAN;
    return 0;
  }
  if (C < 2) {
    double tp = 0, fp = 0, fn = 0, right = 0;
    for (int64_t i = 0; i < N; i++) {
      int pred = y[i] >= threshold, t = labels[i] != 0;
      right += pred == t;
      tp += pred && t;
      fp += pred && !t;
      fn += !pred && t;
    }
    *accuracy = right / (double)N;
    *f1 = met__f1(tp, fp, fn);
    return 0;
  }
  double *cnt = tl_calloc((size_t)C * 3, sizeof *cnt); /* tp, fp, fn per class */
  if (!cnt) return ts_errf(err, TS_ENOMEM, "out of memory for F1 counts (%d classes)", C);
  double right = 0.0;
  for (int64_t i = 0; i < N; i++) {
    int p = met__argmax(y + i * C, C), t = labels[i];
    if (p == t) {
      right += 1.0;
      cnt[3 * p] += 1.0;
    } else {
      cnt[3 * p + 1] += 1.0;
      cnt[3 * t + 2] += 1.0;
    }
  }
  *accuracy = right / (double)N;
  double fsum = 0.0;
  int present = 0;
  for (int c = 0; c < C; c++) {
    double tp = cnt[3 * c], fp = cnt[3 * c + 1], fn = cnt[3 * c + 2];
    if (tp + fp + fn > 0) {
      fsum += met__f1(tp, fp, fn);
      present++;
    }
  }
  tl_free(cnt);
  *f1 = present ? fsum / present : 0.0;
  return 0;
}

int met_all(int64_t N, int C, const double *y, const int32_t *labels, double threshold,
            met_scores *out, ts_err *err) {
  int Cc = C < 2 ? 1 : C;
  out->n = N < 0 ? 0 : N;
  out->log_loss = out->auc = out->accuracy = out->f1 = NAN;
  if (N <= 0) return 0;
  int rc = met_check_labels(N, C, labels, err);
  if (rc) return rc;
  for (int64_t i = 0; i < N; i++)
    for (int c = 0; c < Cc; c++)
      if (!isfinite(y[i * Cc + c]))
        return ts_errf(err, TS_EINVAL, "prediction row %lld, class %d: not a finite number",
                       (long long)i, c);
  out->log_loss = met_log_loss(N, C, y, labels);
  rc = met_accuracy_f1(N, C, y, labels, threshold, &out->accuracy, &out->f1, err);
  if (rc) return rc;
  return met_auc(N, C, y, labels, &out->auc, err);
}
