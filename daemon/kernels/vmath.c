/* vmath.c - scalar references of the vmath functions and the dispatcher.
 *
 * The references favour being right over being fast: libm in float where
 * that is accurate, double where float would cancel (gelu's erfc, the row
 * sums), and the stable forms of each function (sigmoid through exp(-|x|),
 * gelu through erfc so that large negative x keeps its relative accuracy,
 * GPT-2 gelu as x * sigmoid(2u), which equals 0.5x(1 + tanh u) exactly). */
#include "vmath.h"

#include <math.h>
#include <stddef.h>

/* Below these, gelu's true value is below the smallest float; clamping
 * keeps gelu(-inf) at -0 instead of -inf * 0 = NaN. */
#define VM_GELU_FLOOR (-20.0f)

void vm_exp_ref(float *x, int64_t n) {
  for (int64_t i = 0; i < n; i++) x[i] = expf(x[i]);
}

void vm_relu_ref(float *x, int64_t n) {
  for (int64_t i = 0; i < n; i++)
    if (x[i] < 0.0f) x[i] = 0.0f; /* NaN stays NaN */
}

void vm_gelu_ref(float *x, int64_t n) {
  for (int64_t i = 0; i < n; i++) {
    double v = x[i] < VM_GELU_FLOOR ? VM_GELU_FLOOR : x[i];
    x[i] = (float)(0.5 * v * erfc(-v * M_SQRT1_2));
  }
}

void vm_gelu_tanh_ref(float *x, int64_t n) {
  const float c = 0.7978845608028654f; /* sqrt(2 / pi) */
  for (int64_t i = 0; i < n; i++) {
    float v = x[i] < VM_GELU_FLOOR ? VM_GELU_FLOOR : x[i];
    float u = c * (v + 0.044715f * v * v * v);
    float e = expf(-2.0f * fabsf(u)); /* x * sigmoid(2u), the stable way */
    x[i] = v * (u >= 0.0f ? 1.0f / (1.0f + e) : e / (1.0f + e));
  }
}

void vm_elu_ref(float *x, int64_t n) {
  for (int64_t i = 0; i < n; i++)
    if (!(x[i] > 0.0f)) x[i] = expm1f(x[i]);
}

void vm_tanh_ref(float *x, int64_t n) {
  for (int64_t i = 0; i < n; i++) x[i] = tanhf(x[i]);
}

void vm_sigmoid_ref(float *x, int64_t n) {
  for (int64_t i = 0; i < n; i++) {
    float e = expf(-fabsf(x[i]));
    x[i] = x[i] >= 0.0f ? 1.0f / (1.0f + e) : e / (1.0f + e);
  }
}

/* Row maximum, or the first NaN; NaN or +inf then make the whole row NaN. */
static float row_max(const float *x, int64_t cols) {
  float m = -INFINITY;
  for (int64_t j = 0; j < cols; j++) {
    if (x[j] != x[j]) return x[j];
    if (x[j] > m) m = x[j];
  }
  return m;
}

void vm_softmax_rows_ref(float *x, int64_t rows, int64_t cols) {
  for (int64_t r = 0; r < rows; r++, x += cols) {
    float m = row_max(x, cols);
    double s = 0.0;
    for (int64_t j = 0; j < cols; j++) {
      x[j] = expf(x[j] - m);
      s += x[j];
    }
    float inv = (float)(1.0 / s);
    for (int64_t j = 0; j < cols; j++) x[j] *= inv;
  }
}

void vm_log_softmax_rows_ref(float *x, int64_t rows, int64_t cols) {
  for (int64_t r = 0; r < rows; r++, x += cols) {
    float m = row_max(x, cols);
    double s = 0.0;
    for (int64_t j = 0; j < cols; j++) s += exp((double)x[j] - m);
    float ls = (float)log(s);
    for (int64_t j = 0; j < cols; j++) x[j] = (x[j] - m) - ls;
  }
}

void vm_layernorm_rows_ref(const float *x, float *y, int64_t rows, int64_t cols, const float *gamma,
                           const float *beta, float eps) {
  for (int64_t r = 0; r < rows; r++, x += cols, y += cols) {
    double mean = 0.0, var = 0.0;
    for (int64_t j = 0; j < cols; j++) mean += x[j];
    mean /= (double)cols;
    for (int64_t j = 0; j < cols; j++) var += (x[j] - mean) * (x[j] - mean);
    var /= (double)cols;
    double inv = 1.0 / sqrt(var + eps);
    for (int64_t j = 0; j < cols; j++) {
      double v = (x[j] - mean) * inv;
      if (gamma) v *= gamma[j];
      if (beta) v += beta[j];
      y[j] = (float)v;
    }
  }
}

static const vm_ops g_scalar = {
    "scalar",
    vm_exp_ref,
    vm_relu_ref,
    vm_gelu_ref,
    vm_gelu_tanh_ref,
    vm_elu_ref,
    vm_tanh_ref,
    vm_sigmoid_ref,
    vm_softmax_rows_ref,
    vm_log_softmax_rows_ref,
    vm_layernorm_rows_ref,
};

#if defined(__x86_64__)
extern const vm_ops vm__ops_avx2; /* vmath_avx2.c */
#endif
#if defined(__aarch64__)
extern const vm_ops vm__ops_neon; /* vmath_neon.c */
#endif

const vm_ops *vm_ops_for(cpu_path p) {
  switch (p) { /* no AVX-512 table: the AVX2 one is as fast on these row sizes */
    case CPU_SCALAR: return &g_scalar;
#if defined(__x86_64__)
    case CPU_AVX2: return &vm__ops_avx2;
#endif
#if defined(__aarch64__)
    case CPU_NEON: return &vm__ops_neon;
#endif
    default: return NULL;
  }
}

static const vm_ops *g_ops; /* chosen on first use */
static const vm_ops *vm_pick(void);

const vm_ops *vm_ops_active(void) {
  return vm_pick();
}

static const vm_ops *vm_pick(void) {
  const vm_ops *o = __atomic_load_n(&g_ops, __ATOMIC_ACQUIRE);
  if (o) return o;
  for (cpu_path p = cpu_best_path(); !(o = vm_ops_for(p)); p = cpu_path_fallback(p)) {
  }
  __atomic_store_n(&g_ops, o, __ATOMIC_RELEASE);
  return o;
}

void vm_exp(float *x, int64_t n) {
  vm_pick()->exp(x, n);
}
void vm_relu(float *x, int64_t n) {
  vm_pick()->relu(x, n);
}
void vm_gelu(float *x, int64_t n) {
  vm_pick()->gelu(x, n);
}
void vm_gelu_tanh(float *x, int64_t n) {
  vm_pick()->gelu_tanh(x, n);
}
void vm_elu(float *x, int64_t n) {
  vm_pick()->elu(x, n);
}
void vm_tanh(float *x, int64_t n) {
  vm_pick()->tanh(x, n);
}
void vm_sigmoid(float *x, int64_t n) {
  vm_pick()->sigmoid(x, n);
}
void vm_softmax_rows(float *x, int64_t rows, int64_t cols) {
  vm_pick()->softmax_rows(x, rows, cols);
}
void vm_log_softmax_rows(float *x, int64_t rows, int64_t cols) {
  vm_pick()->log_softmax_rows(x, rows, cols);
}
void vm_layernorm_rows(const float *x, float *y, int64_t rows, int64_t cols, const float *gamma,
                       const float *beta, float eps) {
  vm_pick()->layernorm_rows(x, y, rows, cols, gamma, beta, eps);
}
