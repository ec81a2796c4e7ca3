/* optim.h - the Adam optimiser (with the AMSGrad option) that every fit uses.
 *
 * Parameters and gradients are double arrays owned by the caller; the
 * optimiser owns its moment buffers. Weight decay is decoupled (AdamW:
 * p -= lr * wd * p) when `decoupled` is set, else added to the gradient (L2). */
#ifndef TALLYD_OPTIM_H
#define TALLYD_OPTIM_H

#include <stdint.h>

#include "../base/err.h"

typedef struct opt_adam {
  double lr, beta1, beta2, eps, weight_decay;
  int amsgrad, decoupled;
  int64_t n, t;
  double *m, *v, *vmax;
} opt_adam;

/* beta1 0.9, beta2 0.999, eps 1e-8. */
int opt_adam_init(opt_adam *o, int64_t n, double lr, double weight_decay, int amsgrad,
                  int decoupled, ts_err *err);
void opt_adam_step(opt_adam *o, double *params, const double *grad);
void opt_adam_free(opt_adam *o);

#endif
