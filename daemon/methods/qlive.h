/* qlive.h - quantile predictions scored as their outcomes arrive: a rolling
 * tracker of coverage, pinball loss and WIS over the last W observed rows,
 * and adaptive conformal inference (ACI; Gibbs and Candes, "Adaptive
 * Conformal Inference Under Distribution Shift", NeurIPS 2021).
 *
 * ACI, for each central interval (levels tau_lo = a/2, tau_hi = 1 - a/2,
 * target miscoverage a): a working level a_t moves after every observed row
 *
 *   a_{t+1} = a_t + gamma (a - err_t),   err_t = 1 if y_t was outside the
 *                                        interval served for row t, else 0
 *
 * and the interval served at level a_t is CQR's (Romano et al. 2019) with the
 * rank taken at a_t instead of a:
 *
 *   [q_lo - Q(a_t), q_hi + Q(a_t)],  Q(a_t) = the ceil((1 - a_t)(n + 1))-th
 *   smallest of the n latest scores E_i = max(q_lo(x_i) - y_i, y_i - q_hi(x_i))
 *
 * The n scores start as those of the last n calibration rows; each observed
 * row whose raw aggregate is known adds its score and the oldest leaves
 * (the quantile function refitted on recent data, as Gibbs and Candes
 * allow), so that after a shift the scores follow within n rows and a_t
 * corrects the coverage meanwhile.
 *
 * A rank beyond n (a_t too small) is +infinity when infinite intervals are
 * allowed, else the largest score, and then a_t is kept >= 0 (below it every
 * level serves the same interval, and a_t would drift without bound); a rank
 * below 1 (a_t >= 1) is the smallest score. a_t is always kept within
 * [-1, 2]. Over any T rows the miscoverage rate is within (max(a_1, 1 - a_1)
 * + gamma) / (gamma T) of a (Gibbs and Candes, Proposition 4.1), whatever
 * the data do.
 *
 * Ownership: the structures own their arrays (freed by the _free calls);
 * nothing here locks: the caller serialises updates. */
#ifndef TALLYD_QLIVE_H
#define TALLYD_QLIVE_H

#include <stdint.h>

#include "../base/err.h"

/* ---- rolling tracker ---- */

typedef struct ql_track {
  int K, n_int, median;
  const double *levels; /* [K] borrowed */
  int *lo, *hi;         /* [n_int] level indices */
  double *alpha;        /* [n_int] 2 tau of the lower level */
  int64_t window;       /* W rows kept */
  int64_t filled, pos;  /* rows in the window; next slot */
  int64_t total;        /* rows ever observed */
  unsigned char *cover; /* [W, n_int] 1 = inside */
  double *pinball;      /* [W] mean pinball over the K levels */
  double *wis;          /* [W] Bracher WIS (NaN without a median level) */
  int64_t *cover_count; /* [n_int] inside, over the window */
  double pin_sum, wis_sum;
} ql_track;

/* levels [K] strictly increasing (borrowed: must outlive t); window >= 1. */
int ql_track_init(ql_track *t, int K, const double *levels, int64_t window, ts_err *err);
void ql_track_free(ql_track *t);
/* One row: its K served quantiles and the observed y (both finite or q
 * holding +-inf for unbounded intervals; y must be finite). */
void ql_track_add(ql_track *t, const float *q, double y);
/* Rolling means over the rows in the window (NaN when empty): coverage
 * [n_int], pinball, WIS. Any pointer may be NULL. */
void ql_track_get(const ql_track *t, double *coverage, double *pinball, double *wis);

/* ---- adaptive conformal inference ---- */

typedef struct ql_aci {
  int K, n_int;
  int *lo, *hi;    /* [n_int] */
  double *alpha;   /* [n_int] target a */
  double *alpha_t; /* [n_int] working a_t */
  int64_t *misses; /* [n_int] rows outside, ever */
  int64_t n;       /* scores per interval: the last n rows */
  float *ring;     /* [n_int, n] in arrival order, the oldest at pos */
  float *sorted;   /* [n_int, n] the same, ascending */
  int64_t pos;
  double gamma;
  int allow_inf;
  int64_t t;      /* rows observed */
  int64_t pushed; /* scores of observed rows taken in */
} ql_aci;

/* The conformity scores of the last min(n, window) of n calibration rows:
 * Q [n, K] the raw aggregate (the quantity the corrections apply to) and
 * y [n]; every a_t starts at its a. gamma in (0, 1], window >= 1.
 * -TS_EINVAL without a central interval or rows, or for a score that is not
 * finite. */
int ql_aci_init(ql_aci *a, int K, const double *levels, int64_t n, const float *Q, const float *y,
                int64_t window, double gamma, int allow_inf, ts_err *err);
/* The same from stored scores [n_int, n] in arrival order (copied);
 * -TS_EINVAL unless n_int is the number of central intervals the levels
 * form, or for a score that is not finite. */
int ql_aci_init_scores(ql_aci *a, int K, const double *levels, int64_t n_int, int64_t n,
                       const float *scores, double gamma, int allow_inf, ts_err *err);
void ql_aci_free(ql_aci *a);
/* Q(a_t) of interval i: a score, +inf, or the clamps above. */
double ql_aci_width(const ql_aci *a, int i);
/* lower [K], upper [K] as qa_cqr_apply takes them: lower[lo_i] = upper[hi_i]
 * = Q(a_t) of interval i, 0 elsewhere. */
void ql_aci_corrections(const ql_aci *a, double *lower, double *upper);
/* One observed row against the K quantiles that were served for it:
 * err_i = y outside [q_lo_i, q_hi_i]; a_t moves as above. */
void ql_aci_observe(ql_aci *a, const float *served, double y);
/* The row's conformity scores against its raw aggregate q [K] replace the
 * oldest scores (a row whose score is not finite is skipped). */
void ql_aci_push(ql_aci *a, const float *raw, double y);
/* The scores of interval i in arrival order, oldest first, into out [n]. */
void ql_aci_scores_in_order(const ql_aci *a, int i, float *out);

#endif
