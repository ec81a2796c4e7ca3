/* vmath_neon.c - AArch64 NEON versions of the vmath functions that models
 * spend their time in (exp, relu, sigmoid, GPT-2 gelu, softmax,
 * log-softmax). The others (erf gelu, elu, tanh, layer norm) use the scalar
 * references on this path. Ragged ends go through the references too.
 *
 * exp4 is exp256_ps (vmath_avx2_inl.h) four lanes wide: the same clamps,
 * Cody-Waite reduction, Cephes polynomial and two-step scaling. NEON's
 * FMIN/FMAX propagate NaN whichever operand holds it. */
#if defined(__aarch64__)
#include <arm_neon.h>
#include <math.h>
#include <stdint.h>

#include "vmath.h"

static inline float32x4_t exp4(float32x4_t x) {
  x = vminq_f32(x, vdupq_n_f32(88.8f));
  x = vmaxq_f32(x, vdupq_n_f32(-104.0f));
  float32x4_t fn = vrndnq_f32(vmulq_f32(x, vdupq_n_f32(1.44269504088896341f)));
  float32x4_t r = vfmsq_f32(x, fn, vdupq_n_f32(0.693359375f));
  r = vfmsq_f32(r, fn, vdupq_n_f32(-2.12194440e-4f));
  float32x4_t p = vdupq_n_f32(1.9875691500e-4f);
  p = vfmaq_f32(vdupq_n_f32(1.3981999507e-3f), p, r);
  p = vfmaq_f32(vdupq_n_f32(8.3334519073e-3f), p, r);
  p = vfmaq_f32(vdupq_n_f32(4.1665795894e-2f), p, r);
  p = vfmaq_f32(vdupq_n_f32(1.6666665459e-1f), p, r);
  p = vfmaq_f32(vdupq_n_f32(5.0000001201e-1f), p, r);
  p = vfmaq_f32(vaddq_f32(r, vdupq_n_f32(1.0f)), p, vmulq_f32(r, r));
  int32x4_t n = vcvtq_s32_f32(fn);
  int32x4_t n1 = vshrq_n_s32(n, 1), n2 = vsubq_s32(n, n1);
  int32x4_t bias = vdupq_n_s32(127);
  float32x4_t s1 = vreinterpretq_f32_s32(vshlq_n_s32(vaddq_s32(n1, bias), 23));
  float32x4_t s2 = vreinterpretq_f32_s32(vshlq_n_s32(vaddq_s32(n2, bias), 23));
  return vmulq_f32(vmulq_f32(p, s1), s2);
}

static inline float32x4_t sigmoid4(float32x4_t v) {
  float32x4_t one = vdupq_n_f32(1.0f);
  float32x4_t e = exp4(vnegq_f32(vabsq_f32(v)));
  float32x4_t r = vdivq_f32(one, vaddq_f32(one, e));
  return vbslq_f32(vcltq_f32(v, vdupq_n_f32(0.0f)), vmulq_f32(e, r), r);
}

static inline float32x4_t relu4(float32x4_t v) {
  return vmaxq_f32(vdupq_n_f32(0.0f), v);
}

static inline float32x4_t gelu_tanh4(float32x4_t v) {
  v = vmaxq_f32(vdupq_n_f32(-20.0f), v); /* as vmath.c; NaN passes */
  float32x4_t v3 = vmulq_f32(vmulq_f32(v, v), v);
  float32x4_t u =
      vmulq_f32(vdupq_n_f32(0.7978845608028654f), vfmaq_f32(v, vdupq_n_f32(0.044715f), v3));
  return vmulq_f32(v, sigmoid4(vaddq_f32(u, u)));
}

#define VM_MAP(name, f, ref)                                          \
  static void name(float *x, int64_t n) {                             \
    int64_t i = 0;                                                    \
    for (; i + 4 <= n; i += 4) vst1q_f32(x + i, f(vld1q_f32(x + i))); \
    ref(x + i, n - i);                                                \
  }

VM_MAP(exp_neon, exp4, vm_exp_ref)
VM_MAP(relu_neon, relu4, vm_relu_ref)
VM_MAP(sigmoid_neon, sigmoid4, vm_sigmoid_ref)
VM_MAP(gelu_tanh_neon, gelu_tanh4, vm_gelu_tanh_ref)

/* Row maximum; NaN if the row holds one (FMAX/FMAXV propagate it). */
static float row_max(const float *x, int64_t cols) {
  float32x4_t m = vdupq_n_f32(-INFINITY);
  int64_t j = 0;
  for (; j + 4 <= cols; j += 4) m = vmaxq_f32(m, vld1q_f32(x + j));
  float r = vmaxvq_f32(m);
  for (; j < cols; j++) {
    if (x[j] != x[j]) return x[j];
    if (x[j] > r) r = x[j]; /* a NaN r stays NaN */
  }
  return r;
}

static void softmax_rows_neon(float *x, int64_t rows, int64_t cols) {
  for (int64_t r = 0; r < rows; r++, x += cols) {
    float mx = row_max(x, cols);
    float32x4_t m = vdupq_n_f32(mx), s = vdupq_n_f32(0.0f);
    int64_t j = 0;
    for (; j + 4 <= cols; j += 4) {
      float32x4_t e = exp4(vsubq_f32(vld1q_f32(x + j), m));
      vst1q_f32(x + j, e);
      s = vaddq_f32(s, e);
    }
    float sum = vaddvq_f32(s);
    for (; j < cols; j++) {
      x[j] = expf(x[j] - mx);
      sum += x[j];
    }
    float inv = 1.0f / sum;
    for (j = 0; j + 4 <= cols; j += 4) vst1q_f32(x + j, vmulq_n_f32(vld1q_f32(x + j), inv));
    for (; j < cols; j++) x[j] *= inv;
  }
}

static void log_softmax_rows_neon(float *x, int64_t rows, int64_t cols) {
  for (int64_t r = 0; r < rows; r++, x += cols) {
    float mx = row_max(x, cols);
    float32x4_t m = vdupq_n_f32(mx), s = vdupq_n_f32(0.0f);
    int64_t j = 0;
    for (; j + 4 <= cols; j += 4) s = vaddq_f32(s, exp4(vsubq_f32(vld1q_f32(x + j), m)));
    float sum = vaddvq_f32(s);
    for (; j < cols; j++) sum += expf(x[j] - mx);
    float ls = logf(sum);
    float32x4_t l = vdupq_n_f32(ls);
    for (j = 0; j + 4 <= cols; j += 4)
      vst1q_f32(x + j, vsubq_f32(vsubq_f32(vld1q_f32(x + j), m), l));
    for (; j < cols; j++) x[j] = (x[j] - mx) - ls;
  }
}

const vm_ops vm__ops_neon = {
    "neon",
    exp_neon,
    relu_neon,
    vm_gelu_ref,
    gelu_tanh_neon,
    vm_elu_ref,
    vm_tanh_ref,
    sigmoid_neon,
    softmax_rows_neon,
    log_softmax_rows_neon,
    vm_layernorm_rows_ref,
};

#endif
