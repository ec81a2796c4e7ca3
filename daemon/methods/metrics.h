/* metrics.h - classification metrics that fit and evaluate answers report.
 *
 * Log loss, ROC AUC, accuracy and F1 of predicted probabilities against
 * labels, under the names docs/api.md gives them (`log_loss`, `auc`, `accuracy`,
 * `f1`). One layout everywhere: C = 1 means binary, y [N] holds the
 * positive-class probability and labels are 0/1; C >= 2 means y [N, C]
 * holds one probability row per example and labels are class indices.
 *
 * Conventions, chosen once so that every answer agrees:
 *  - log loss clamps the probability of the true class to [MET_EPS, 1 - MET_EPS]
 *    (the same clamp the ensemble fit trains with), no renormalisation;
 *  - AUC is the Mann-Whitney statistic P(s+ > s-) + 0.5 P(s+ = s-), computed
 *    by sorting (a radix sort, so O(N); exactly the average-rank formula); multi-class
 *    AUC is the one-vs-rest macro average over the classes that have both
 *    positives and negatives. Undefined (one class only): NaN, which the
 *    caller reports as null;
 *  - binary accuracy/F1 predict positive when p >= threshold (inclusive);
 *    multi-class uses argmax (lowest index on ties) and macro F1 over the
 *    classes present in the labels or the predictions; an F1 with no true
 *    and no predicted positives is 0 (scikit-learn's zero_division=0).
 *
 * Ownership: every array is borrowed; the only allocations are a sort buffer
 * of 2N keys inside met_auc / met_all and C counters in
 * met_accuracy_f1, freed before return. */
#ifndef TALLYD_METRICS_H
#define TALLYD_METRICS_H

#include <stdint.h>

#include "../base/err.h"

#define MET_EPS 1e-7

typedef struct met_scores {
  int64_t n; /* rows scored */
  double log_loss, auc, accuracy, f1;
} met_scores;

/* -TS_EINVAL naming the first row whose label is not 0/1 (C = 1) or in [0, C). */
int met_check_labels(int64_t N, int C, const int32_t *labels, ts_err *err);

/* Mean log loss. Labels are assumed checked. */
double met_log_loss(int64_t N, int C, const double *y, const int32_t *labels);

/* ROC AUC (binary) or one-vs-rest macro AUC; *out = NaN when undefined.
 * Scores must be finite (met_all checks). -TS_ENOMEM when the sort buffer
 * (2N keys) cannot be had. Labels are assumed checked. */
int met_auc(int64_t N, int C, const double *y, const int32_t *labels, double *out, ts_err *err);

/* Accuracy and F1 (binary at threshold; multi-class argmax + macro F1, which
 * needs C counters: -TS_ENOMEM when they cannot be had). Labels assumed checked. */
int met_accuracy_f1(int64_t N, int C, const double *y, const int32_t *labels, double threshold,
                    double *accuracy, double *f1, ts_err *err);

/* All four, after checking labels and that every probability is finite
 * (-TS_EINVAL naming the row otherwise). N = 0 gives NaN everywhere. */
int met_all(int64_t N, int C, const double *y, const int32_t *labels, double threshold,
            met_scores *out, ts_err *err);

#endif
