/* calib.h - calibration of predicted class probabilities: temperature
 * scaling (Guo, Pleiss, Sun and Weinberger 2017) and the expected
 * calibration error with its reliability bins.
 *
 * Layout as metrics.h: C = 1 means binary, y [N] holds the positive-class
 * probability and labels are 0/1; C >= 2 means y [N, C] holds one
 * probability row per example and labels are class indices.
 *
 * Temperature scaling acts on the log-odds of a probability, so it applies
 * to any model whose output is a probability (an AWARE-NET ensemble's
 * mixture of family probabilities included):
 *   binary:  z = logit(clamp(y)),          p = sigmoid(z / T)
 *   C >= 2:  z_c = log(clamp(y_c)),         p = softmax(z / T)
 * clamp to [MET_EPS, 1 - MET_EPS] (metrics.h), so z is finite. T = 1 leaves
 * y unchanged (up to the clamp); T > 1 softens, T < 1 sharpens. The argmax
 * (and so accuracy, and the ranking behind AUC) never changes.
 *
 * cal_temp_fit minimises the mean log loss of p over u = log T by Newton's
 * method with a backtracking line search (a gradient step where the second
 * derivative is not positive), within CAL_T_MIN <= T <= CAL_T_MAX. With
 * a = z e^{-u} (one row; t the label, p = sigmoid(a) or softmax(a)):
 *   binary:  L = softplus(a) - t a
 *            dL/du = -(p - t) a,   d2L/du2 = p (1 - p) a^2 + (p - t) a
 *   C >= 2:  L = logsumexp(a) - a_t
 *            dL/du = a_t - sum_c p_c a_c
 *            d2L/du2 = var_p(a) + sum_c p_c a_c - a_t
 * The loss is convex in 1/T, so it has one minimum over T > 0 (or none,
 * when the labels disagree with the ranking: then T goes to a bound).
 *
 * Reliability (top-label, as Guo et al.): confidence = the largest class
 * probability (binary: max(p, 1 - p)), correct = the argmax (binary:
 * p >= 0.5 -> class 1; multi-class the lowest index on ties) is the label.
 * Bin b of n_bins holds confidences in (b/n_bins, (b+1)/n_bins] (0 goes to
 * bin 0). ECE = sum_b (n_b / N) |accuracy_b - confidence_b|; MCE = the
 * largest |accuracy_b - confidence_b| over non-empty bins.
 *
 * Ownership: every array is borrowed; nothing is allocated except by
 * cal_temp_fit (the logits, freed before it returns). Thread-safe. */
#ifndef TALLYD_CALIB_H
#define TALLYD_CALIB_H

#include <stdint.h>

#include "../base/err.h"

#define CAL_T_MIN 1e-2
#define CAL_T_MAX 1e2
#define CAL_MAX_BINS 1000

/* out [N * Cc] = y with temperature T applied (out may be y). */
void cal_temp_apply(int64_t N, int C, const double *y, double T, double *out);

/* The log loss of the temperature-scaled y at u = log T (the unclamped
 * objective the fit minimises) and its first and second derivatives in u
 * (either may be NULL). z are the logits cal_logits made. */
double cal_temp_loss(int64_t N, int C, const double *z, const int32_t *labels, double u,
                     double *grad, double *hess);

/* z [N * Cc]: the logits of y (binary: logit(clamp(y)); else log(clamp(y_c))). */
void cal_logits(int64_t N, int C, const double *y, double *z);

typedef struct cal_temp_report {
  double temperature;
  int iterations;
  double loss_before; /* at T = 1 */
  double loss_after;  /* at the T found */
  double grad;        /* dL/du at the T found */
  int at_bound;       /* 1 when T stopped at CAL_T_MIN or CAL_T_MAX */
} cal_temp_report;

/* Fits T on y and labels (checked: -TS_EINVAL naming the row; N >= 1;
 * every probability finite). max_iter >= 1 Newton steps, stopping when
 * |dL/du| <= tol. -TS_ENOMEM when the logits cannot be had. */
int cal_temp_fit(int64_t N, int C, const double *y, const int32_t *labels, int max_iter, double tol,
                 cal_temp_report *rep, ts_err *err);

typedef struct cal_bin {
  int64_t count;
  double confidence; /* mean confidence in the bin (NaN when empty) */
  double accuracy;   /* fraction correct in the bin (NaN when empty) */
} cal_bin;

/* Reliability bins [n_bins] (1..CAL_MAX_BINS), ECE and MCE (NaN when N = 0).
 * Labels are assumed checked. */
void cal_reliability(int64_t N, int C, const double *y, const int32_t *labels, int n_bins,
                     cal_bin *bins, double *ece, double *mce);

#endif
