/* vmath_avx2_inl.h - the vectorised single-precision exp, shared by
 * vmath_avx2.c and other AVX2 kernels (attention). Internal: include it only
 * from files compiled with -mavx2 -mfma (named *_avx2.c).
 *
 * exp(x) = 2^n * p(r) with n = round(x / ln 2) and r = x - n ln 2 computed
 * in two parts (Cody-Waite), |r| <= ln2 / 2; p is the Cephes expf
 * polynomial (about 1 ulp). 2^n is applied as 2^(n/2) * 2^(n - n/2) so that
 * results in the subnormal range and the overflow to +inf come out right.
 * x is clamped to [-104, 88.8] first, which keeps n in range and keeps
 * NaN: the clamps are written so that a NaN operand passes through. */
#ifndef TALLYD_VMATH_AVX2_INL_H
#define TALLYD_VMATH_AVX2_INL_H

#if defined(__x86_64__) && defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

static inline __m256 exp256_ps(__m256 x) {
  /* min/max return their second operand when either is NaN. */
  x = _mm256_min_ps(_mm256_set1_ps(88.8f), x);
  x = _mm256_max_ps(_mm256_set1_ps(-104.0f), x);
  __m256 fn = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                              _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(fn, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(fn, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  __m256i n = _mm256_cvtps_epi32(fn);
  __m256i n1 = _mm256_srai_epi32(n, 1), n2 = _mm256_sub_epi32(n, n1);
  __m256i bias = _mm256_set1_epi32(127);
  __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, bias), 23));
  __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, bias), 23));
  return _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
}

#endif
#endif
