/* vmath.h - elementwise activations and row-wise softmax / layer norm over
 * float arrays, for the mlp and transformer model kinds.
 *
 * Each function has a plain scalar reference (vm_*_ref) that the tests trust
 * and a dispatched fast path (vm_*) chosen once per process from
 * cpu_best_path() (AVX2+FMA, NEON, or the reference). The fast paths agree
 * with the references to a few ulp (exp, tanh, sigmoid, elu) or ~1e-6
 * relative (gelu); NaN inputs give NaN outputs, and the limits at +-inf are
 * the mathematical ones (gelu(-inf) = -0, elu(-inf) = -1, tanh(+-inf) = +-1).
 *
 * Every function works in place on caller-owned memory and allocates
 * nothing. vm_layernorm_rows reads x and writes y, which may be the same
 * array; gamma and beta may be NULL (1 and 0). A softmax row containing
 * +inf or NaN, or only -inf, comes out all NaN (as in PyTorch). */
#ifndef TALLYD_VMATH_H
#define TALLYD_VMATH_H

#include <stdint.h>

#include "../base/cpu.h"

void vm_exp(float *x, int64_t n);
void vm_relu(float *x, int64_t n);
void vm_gelu(float *x, int64_t n);      /* x * 0.5 * (1 + erf(x / sqrt 2)) */
void vm_gelu_tanh(float *x, int64_t n); /* GPT-2: 0.5x(1 + tanh(sqrt(2/pi)(x + 0.044715x^3))) */
void vm_elu(float *x, int64_t n);       /* alpha 1: x > 0 ? x : exp(x) - 1 */
void vm_tanh(float *x, int64_t n);
void vm_sigmoid(float *x, int64_t n);
/* Each row of x[rows, cols] (contiguous) becomes its softmax / log-softmax,
 * computed stably (the row maximum is subtracted first). */
void vm_softmax_rows(float *x, int64_t rows, int64_t cols);
void vm_log_softmax_rows(float *x, int64_t rows, int64_t cols);
/* y = (x - mean) / sqrt(var + eps) * gamma + beta per row, var biased (as
 * torch.nn.LayerNorm). */
void vm_layernorm_rows(const float *x, float *y, int64_t rows, int64_t cols, const float *gamma,
                       const float *beta, float eps);

void vm_exp_ref(float *x, int64_t n);
void vm_relu_ref(float *x, int64_t n);
void vm_gelu_ref(float *x, int64_t n);
void vm_gelu_tanh_ref(float *x, int64_t n);
void vm_elu_ref(float *x, int64_t n);
void vm_tanh_ref(float *x, int64_t n);
void vm_sigmoid_ref(float *x, int64_t n);
void vm_softmax_rows_ref(float *x, int64_t rows, int64_t cols);
void vm_log_softmax_rows_ref(float *x, int64_t rows, int64_t cols);
void vm_layernorm_rows_ref(const float *x, float *y, int64_t rows, int64_t cols, const float *gamma,
                           const float *beta, float eps);

/* One path's implementations, so that tests and benchmarks can run a path
 * that is not the best one. */
typedef struct vm_ops {
  const char *name;
  void (*exp)(float *x, int64_t n);
  void (*relu)(float *x, int64_t n);
  void (*gelu)(float *x, int64_t n);
  void (*gelu_tanh)(float *x, int64_t n);
  void (*elu)(float *x, int64_t n);
  void (*tanh)(float *x, int64_t n);
  void (*sigmoid)(float *x, int64_t n);
  void (*softmax_rows)(float *x, int64_t rows, int64_t cols);
  void (*log_softmax_rows)(float *x, int64_t rows, int64_t cols);
  void (*layernorm_rows)(const float *x, float *y, int64_t rows, int64_t cols, const float *gamma,
                         const float *beta, float eps);
} vm_ops;

/* The table for path p, or NULL when this build does not compile it. The
 * caller checks that the CPU runs it (cpu_has_avx2_fma, cpu_has_neon). */
const vm_ops *vm_ops_for(cpu_path p);
/* The table the vm_* entry points use: the first of cpu_best_path() and its
 * fallbacks (cpu_path_fallback) that has one. */
const vm_ops *vm_ops_active(void);

#endif
