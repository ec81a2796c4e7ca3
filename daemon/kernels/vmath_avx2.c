/* vmath_avx2.c - AVX2+FMA versions of the vmath functions (see vmath.h).
 *
 * Everything is built on exp256_ps (vmath_avx2_inl.h). Where a formula
 * built on exp would cancel, a short series takes over near zero: tanh
 * below |x| 0.55 (Taylor to x^17, error < 1e-8 there), elu above -0.35
 * (expm1's Taylor to x^8). gelu's erf uses its Taylor series in u = t^2 on
 * t in [-0.8, 1.5], where it is accurate to ~1e-7; lanes outside that range
 * (a minority for activations of unit scale) are finished in double with
 * libm's erfc, as the reference does, and lanes above 5.5 are x itself.
 * Row reductions mask the ragged end of a row instead of running a scalar
 * tail, and layer norm sums in double so that rows with a large mean keep
 * their variance. */
#if defined(__x86_64__)
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#include "vmath.h"
#include "vmath_avx2_inl.h"

static __m256i tail_mask(int64_t n) { /* the first n (0..8) lanes */
  static const int32_t m[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
  return _mm256_loadu_si256((const __m256i *)(m + 8 - n));
}

static inline __m256 abs8(__m256 v) {
  return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v);
}

/* Applies f to x[0..n) eight at a time; masked-off lanes compute on 0. */
#define VM_MAP(name, f)                                                            \
  static void name(float *x, int64_t n) {                                          \
    int64_t i = 0;                                                                 \
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, f(_mm256_loadu_ps(x + i))); \
    if (i < n) {                                                                   \
      __m256i m = tail_mask(n - i);                                                \
      _mm256_maskstore_ps(x + i, m, f(_mm256_maskload_ps(x + i, m)));              \
    }                                                                              \
  }

static inline __m256 relu8(__m256 v) {
  return _mm256_max_ps(_mm256_setzero_ps(), v);
}

static inline __m256 sigmoid8(__m256 v) {
  __m256 e = exp256_ps(_mm256_sub_ps(_mm256_setzero_ps(), abs8(v)));
  __m256 r = _mm256_div_ps(_mm256_set1_ps(1.0f), _mm256_add_ps(_mm256_set1_ps(1.0f), e));
  __m256 neg = _mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_LT_OQ);
  return _mm256_blendv_ps(r, _mm256_mul_ps(e, r), neg);
}

static inline __m256 tanh8(__m256 v) {
  __m256 a = abs8(v);
  /* |x| < 0.55: x + x^3 P(x^2), Taylor coefficients of tanh. */
  __m256 u = _mm256_mul_ps(v, v);
  __m256 p = _mm256_set1_ps(5.9002744095e-04f);
  p = _mm256_fmadd_ps(p, u, _mm256_set1_ps(-1.4558343871e-03f));
  p = _mm256_fmadd_ps(p, u, _mm256_set1_ps(3.5921280366e-03f));
  p = _mm256_fmadd_ps(p, u, _mm256_set1_ps(-8.8632355299e-03f));
  p = _mm256_fmadd_ps(p, u, _mm256_set1_ps(2.1869488536e-02f));
  p = _mm256_fmadd_ps(p, u, _mm256_set1_ps(-5.3968253968e-02f));
  p = _mm256_fmadd_ps(p, u, _mm256_set1_ps(1.3333333333e-01f));
  p = _mm256_fmadd_ps(p, u, _mm256_set1_ps(-3.3333333333e-01f));
  __m256 small = _mm256_fmadd_ps(_mm256_mul_ps(v, u), p, v);
  /* otherwise 1 - 2 / (exp(2|x|) + 1), with the sign of x */
  __m256 e = exp256_ps(_mm256_add_ps(a, a));
  __m256 t =
      _mm256_sub_ps(_mm256_set1_ps(1.0f),
                    _mm256_div_ps(_mm256_set1_ps(2.0f), _mm256_add_ps(e, _mm256_set1_ps(1.0f))));
  __m256 big = _mm256_or_ps(t, _mm256_and_ps(v, _mm256_set1_ps(-0.0f)));
  return _mm256_blendv_ps(big, small, _mm256_cmp_ps(a, _mm256_set1_ps(0.55f), _CMP_LT_OQ));
}

static inline __m256 elu8(__m256 v) {
  /* expm1 near 0 by Taylor to x^8; exp(x) - 1 below -0.35 loses < 2 bits. */
  __m256 p = _mm256_set1_ps(1.0f / 40320);
  p = _mm256_fmadd_ps(p, v, _mm256_set1_ps(1.0f / 5040));
  p = _mm256_fmadd_ps(p, v, _mm256_set1_ps(1.0f / 720));
  p = _mm256_fmadd_ps(p, v, _mm256_set1_ps(1.0f / 120));
  p = _mm256_fmadd_ps(p, v, _mm256_set1_ps(1.0f / 24));
  p = _mm256_fmadd_ps(p, v, _mm256_set1_ps(1.0f / 6));
  p = _mm256_fmadd_ps(p, v, _mm256_set1_ps(0.5f));
  __m256 small = _mm256_fmadd_ps(_mm256_mul_ps(v, v), p, v);
  __m256 big = _mm256_sub_ps(exp256_ps(v), _mm256_set1_ps(1.0f));
  __m256 neg = _mm256_blendv_ps(big, small, _mm256_cmp_ps(v, _mm256_set1_ps(-0.35f), _CMP_GT_OQ));
  return _mm256_blendv_ps(neg, v, _mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_GT_OQ));
}

static inline __m256 gelu_tanh8(__m256 v) {
  v = _mm256_max_ps(_mm256_set1_ps(-20.0f), v); /* keeps NaN; see vmath.c */
  __m256 c = _mm256_set1_ps(0.7978845608028654f);
  __m256 v3 = _mm256_mul_ps(_mm256_mul_ps(v, v), v);
  __m256 u = _mm256_mul_ps(c, _mm256_fmadd_ps(_mm256_set1_ps(0.044715f), v3, v));
  return _mm256_mul_ps(v, sigmoid8(_mm256_add_ps(u, u)));
}

/* gelu on the lanes where the erf series is accurate; *rest gets the mask
 * of lanes the caller must finish in scalar. */
static inline __m256 gelu8_part(__m256 v, int *rest) {
  static const float a[16] = {
      1.0000000000e+00f, -3.3333333333e-01f, 1.0000000000e-01f, -2.3809523810e-02f,
      4.6296296296e-03f, -7.5757575758e-04f, 1.0683760684e-04f, -1.3227513228e-05f,
      1.4589169001e-06f, -1.4503852223e-07f, 1.3122532964e-08f, -1.0892221037e-09f,
      8.3507027951e-11f, -5.9477940136e-12f, 3.9554295165e-13f, -2.4668270103e-14f};
  __m256 t = _mm256_mul_ps(v, _mm256_set1_ps(0.70710678118654752f));
  __m256 u = _mm256_mul_ps(t, t);
  __m256 p = _mm256_set1_ps(a[15]);
  for (int k = 14; k >= 0; k--) p = _mm256_fmadd_ps(p, u, _mm256_set1_ps(a[k]));
  __m256 erf = _mm256_mul_ps(_mm256_mul_ps(t, p), _mm256_set1_ps(1.1283791670955126f));
  __m256 half_v = _mm256_mul_ps(_mm256_set1_ps(0.5f), v);
  __m256 g = _mm256_fmadd_ps(half_v, erf, half_v);
  __m256 in = _mm256_and_ps(_mm256_cmp_ps(t, _mm256_set1_ps(-0.8f), _CMP_GE_OQ),
                            _mm256_cmp_ps(t, _mm256_set1_ps(1.5f), _CMP_LE_OQ));
  __m256 big = _mm256_cmp_ps(v, _mm256_set1_ps(5.5f), _CMP_GT_OQ);
  g = _mm256_blendv_ps(g, v, big);
  *rest = ~_mm256_movemask_ps(_mm256_or_ps(in, big)) & 0xFF;
  return g;
}

static float gelu1(float x) {
  double v = x < -20.0f ? -20.0 : x;
  return (float)(0.5 * v * erfc(-v * M_SQRT1_2));
}

static void gelu_avx2(float *x, int64_t n) {
  for (int64_t i = 0; i < n; i += 8) {
    int64_t w = n - i < 8 ? n - i : 8;
    __m256i m = tail_mask(w);
    __m256 v = _mm256_maskload_ps(x + i, m);
    int rest;
    __m256 g = gelu8_part(v, &rest);
    _mm256_maskstore_ps(x + i, m, g);
    if (rest) {
      float in[8];
      _mm256_storeu_ps(in, v);
      for (int64_t l = 0; l < w; l++)
        if (rest >> l & 1) x[i + l] = gelu1(in[l]);
    }
  }
}

VM_MAP(exp_avx2, exp256_ps)
VM_MAP(relu_avx2, relu8)
VM_MAP(gelu_tanh_avx2, gelu_tanh8)
VM_MAP(elu_avx2, elu8)
VM_MAP(tanh_avx2, tanh8)
VM_MAP(sigmoid_avx2, sigmoid8)

static float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

static float hmax8(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

/* Row maximum. A NaN in the row need not show here: its exp is NaN, so the
 * row's sum, and with it every output of the row, is NaN anyway. */
static float row_max(const float *x, int64_t cols) {
  __m256 m = _mm256_set1_ps(-INFINITY);
  int64_t j = 0;
  for (; j + 8 <= cols; j += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(x + j));
  if (j < cols) {
    __m256i mk = tail_mask(cols - j);
    m = _mm256_max_ps(m, _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), _mm256_maskload_ps(x + j, mk),
                                          _mm256_castsi256_ps(mk)));
  }
  return hmax8(m);
}

static void softmax_rows_avx2(float *x, int64_t rows, int64_t cols) {
  for (int64_t r = 0; r < rows; r++, x += cols) {
    __m256 m = _mm256_set1_ps(row_max(x, cols)), s = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= cols; j += 8) {
      __m256 e = exp256_ps(_mm256_sub_ps(_mm256_loadu_ps(x + j), m));
      _mm256_storeu_ps(x + j, e);
      s = _mm256_add_ps(s, e);
    }
    __m256i mk = tail_mask(cols - j);
    if (j < cols) {
      __m256 e = exp256_ps(_mm256_sub_ps(_mm256_maskload_ps(x + j, mk), m));
      e = _mm256_and_ps(e, _mm256_castsi256_ps(mk));
      _mm256_maskstore_ps(x + j, mk, e);
      s = _mm256_add_ps(s, e);
    }
    __m256 inv = _mm256_set1_ps(1.0f / hsum8(s));
    for (j = 0; j + 8 <= cols; j += 8)
      _mm256_storeu_ps(x + j, _mm256_mul_ps(_mm256_loadu_ps(x + j), inv));
    if (j < cols) _mm256_maskstore_ps(x + j, mk, _mm256_mul_ps(_mm256_maskload_ps(x + j, mk), inv));
  }
}

static void log_softmax_rows_avx2(float *x, int64_t rows, int64_t cols) {
  for (int64_t r = 0; r < rows; r++, x += cols) {
    __m256 m = _mm256_set1_ps(row_max(x, cols)), s = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= cols; j += 8)
      s = _mm256_add_ps(s, exp256_ps(_mm256_sub_ps(_mm256_loadu_ps(x + j), m)));
    __m256i mk = tail_mask(cols - j);
    if (j < cols) {
      __m256 e = exp256_ps(_mm256_sub_ps(_mm256_maskload_ps(x + j, mk), m));
      s = _mm256_add_ps(s, _mm256_and_ps(e, _mm256_castsi256_ps(mk)));
    }
    __m256 ls = _mm256_set1_ps(logf(hsum8(s)));
    for (j = 0; j + 8 <= cols; j += 8)
      _mm256_storeu_ps(x + j, _mm256_sub_ps(_mm256_sub_ps(_mm256_loadu_ps(x + j), m), ls));
    if (j < cols)
      _mm256_maskstore_ps(x + j, mk,
                          _mm256_sub_ps(_mm256_sub_ps(_mm256_maskload_ps(x + j, mk), m), ls));
  }
}

/* Adds the eight lanes of v (as doubles) into acc0/acc1. */
static inline void add_pd(__m256 v, __m256d *acc0, __m256d *acc1) {
  *acc0 = _mm256_add_pd(*acc0, _mm256_cvtps_pd(_mm256_castps256_ps128(v)));
  *acc1 = _mm256_add_pd(*acc1, _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
}

static double hsum_pd(__m256d a, __m256d b) {
  double t[4];
  _mm256_storeu_pd(t, _mm256_add_pd(a, b));
  return (t[0] + t[1]) + (t[2] + t[3]);
}

static void layernorm_rows_avx2(const float *x, float *y, int64_t rows, int64_t cols,
                                const float *gamma, const float *beta, float eps) {
  int64_t cv = cols & ~(int64_t)7;
  __m256i mk = tail_mask(cols - cv);
  for (int64_t r = 0; r < rows; r++, x += cols, y += cols) {
    __m256d a0 = _mm256_setzero_pd(), a1 = _mm256_setzero_pd();
    for (int64_t j = 0; j < cv; j += 8) add_pd(_mm256_loadu_ps(x + j), &a0, &a1);
    if (cv < cols) add_pd(_mm256_maskload_ps(x + cv, mk), &a0, &a1);
    double mean = hsum_pd(a0, a1) / (double)cols;
    /* Deviations in double: x - mean is exact enough there for any row. */
    __m256d md = _mm256_set1_pd(mean), v0 = _mm256_setzero_pd(), v1 = _mm256_setzero_pd();
    for (int64_t j = 0; j < cols; j += 8) {
      __m256 xv = j < cv ? _mm256_loadu_ps(x + j) : _mm256_maskload_ps(x + j, mk);
      __m256d d0 = _mm256_sub_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(xv)), md);
      __m256d d1 = _mm256_sub_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(xv, 1)), md);
      if (j >= cv) { /* zero the deviations of masked-off lanes */
        __m256i lo = _mm256_cvtepi32_epi64(_mm256_castsi256_si128(mk));
        __m256i hi = _mm256_cvtepi32_epi64(_mm256_extracti128_si256(mk, 1));
        d0 = _mm256_and_pd(d0, _mm256_castsi256_pd(lo));
        d1 = _mm256_and_pd(d1, _mm256_castsi256_pd(hi));
      }
      v0 = _mm256_fmadd_pd(d0, d0, v0);
      v1 = _mm256_fmadd_pd(d1, d1, v1);
    }
    double var = hsum_pd(v0, v1) / (double)cols;
    __m256 mf = _mm256_set1_ps((float)mean), inv = _mm256_set1_ps((float)(1.0 / sqrt(var + eps)));
    for (int64_t j = 0; j < cols; j += 8) {
      int full = j < cv;
      __m256 xv = full ? _mm256_loadu_ps(x + j) : _mm256_maskload_ps(x + j, mk);
      __m256 v = _mm256_mul_ps(_mm256_sub_ps(xv, mf), inv);
      if (gamma)
        v = _mm256_mul_ps(v, full ? _mm256_loadu_ps(gamma + j) : _mm256_maskload_ps(gamma + j, mk));
      if (beta)
        v = _mm256_add_ps(v, full ? _mm256_loadu_ps(beta + j) : _mm256_maskload_ps(beta + j, mk));
      if (full)
        _mm256_storeu_ps(y + j, v);
      else
        _mm256_maskstore_ps(y + j, mk, v);
    }
  }
}

const vm_ops vm__ops_avx2 = {
    "avx2+fma",          exp_avx2,
    relu_avx2,           gelu_avx2,
    gelu_tanh_avx2,      elu_avx2,
    tanh_avx2,           sigmoid_avx2,
    softmax_rows_avx2,   log_softmax_rows_avx2,
    layernorm_rows_avx2,
};

#endif
