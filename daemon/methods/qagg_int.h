/* qagg_int.h - internal to the quantile aggregator's files (qagg.c,
 * qagg_f64.c, qagg_f32.c): the shapes and row math they share. qagg.h is
 * the module's public face. */
#ifndef TALLYD_QAGG_INT_H
#define TALLYD_QAGG_INT_H

#include <stdint.h>

#include "qagg.h"

/* Layer i of the local network: in and out widths. */
void qa__layer_dims(const qa_spec *s, int i, int64_t *in, int64_t *out);
/* The softmax groups of the logits: coarse one group of M (stride 1);
 * medium K groups of M with stride K; fine K groups of M*K with stride K. */
void qa__group_shape(const qa_spec *s, int64_t *ngroups, int64_t *len, int64_t *stride);
/* w = softmax of logit within each group (double). */
void qa__softmax_f64(const qa_spec *s, const double *logit, double *w);
/* Loss of one row and g = d(row's share of the loss)/dq, where the pinball
 * part is scaled by cp = 1/(n K) and the penalty by cn = lambda/(n pairs);
 * *pin and *pen are the row's unscaled pinball and penalty sums. */
void qa__row_loss(int K, const double *tau, double y, const double *q, double cp, double cn,
                  double margin, double *pin, double *pen, double *g);

#endif
