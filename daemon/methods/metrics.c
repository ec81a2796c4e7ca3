/* metrics.c - log loss, ROC AUC, accuracy and F1 (see metrics.h).
 *
 * AUC: sort (score, is_positive) pairs by score, walk the groups of equal
 * scores, and count for each group the positive/negative pairs it wins
 * (negatives strictly below) and ties (negatives in the same group, counted
 * half). This is the average-rank Mann-Whitney formula written with integer
 * counts, so it is exact and needs no rank array. */
#include "metrics.h"

#include <math.h>
#include <stdlib.h>

#include "../base/mem.h"

typedef struct met__pair {
  double s;
  int32_t pos;
} met__pair;

int met_check_labels(int64_t N, int C, const int32_t *labels, ts_err *err) {
  int hi = C < 2 ? 2 : C;
  for (int64_t i = 0; i < N; i++) {
    if (labels[i] < 0 || labels[i] >= hi) {
      if (C < 2)
        return ts_errf(err, TS_EINVAL, "labels row %lld: %d is not a binary label (0 or 1)",
                       (long long)i, labels[i]);
      return ts_errf(err, TS_EINVAL, "labels row %lld: class %d is outside [0, %d)",
                     (long long)i, labels[i], C);
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
    if (C < 2) p = labels[i] ? y[i] : 1.0 - y[i];
    else p = y[i * C + labels[i]];
    s -= log(met__clamp(p));
  }
  return s / (double)N;
}

static int met__cmp(const void *a, const void *b) {
  double x = ((const met__pair *)a)->s, y = ((const met__pair *)b)->s;
  return (x > y) - (x < y);
}

/* AUC of column `col` of y [N, stride] for "label == cls" against the rest;
 * buf holds N pairs. NaN when one side is empty. */
static double met__auc_col(int64_t N, const double *y, int stride, int col,
                           const int32_t *labels, int32_t cls, met__pair *buf) {
  double npos = 0.0;
  for (int64_t i = 0; i < N; i++) {
    buf[i].s = y[i * stride + col];
    buf[i].pos = labels[i] == cls;
    npos += buf[i].pos;
  }
  double nneg = (double)N - npos;
  if (npos == 0.0 || nneg == 0.0) return NAN;
  qsort(buf, (size_t)N, sizeof *buf, met__cmp);
  double wins = 0.0, neg_below = 0.0;
  for (int64_t i = 0; i < N;) {
    int64_t j = i;
    double pg = 0.0;
    while (j < N && buf[j].s == buf[i].s) pg += buf[j++].pos;
    double ng = (double)(j - i) - pg;
    wins += pg * neg_below + 0.5 * pg * ng;
    neg_below += ng;
    i = j;
  }
  return wins / (npos * nneg);
}

int met_auc(int64_t N, int C, const double *y, const int32_t *labels, double *out,
            ts_err *err) {
  *out = NAN;
  if (N <= 0) return 0;
  met__pair *buf = tl_malloc((size_t)N * sizeof *buf);
  if (!buf)
    return ts_errf(err, TS_ENOMEM, "out of memory for the AUC sort buffer (%lld rows)",
                   (long long)N);
  if (C < 2) {
    *out = met__auc_col(N, y, 1, 0, labels, 1, buf);
  } else {
    double sum = 0.0;
    int used = 0;
    for (int c = 0; c < C; c++) {
      double a = met__auc_col(N, y, C, c, labels, c, buf);
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

int met_accuracy_f1(int64_t N, int C, const double *y, const int32_t *labels,
                    double threshold, double *accuracy, double *f1, ts_err *err) {
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
