/* attn_avx2.c - the AVX2+FMA tile kernels of the tiled attention driver.
 *
 * What attn.c's driver needs per tile (attn_kern in attn_kern.h):
 *   qk   S = Q K^T over a 48 x 64 tile, register-blocked 6 rows x 16 keys
 *        (12 accumulators, the K tile already transposed by the driver);
 *   pv   O += P V, register-blocked 6 rows x 16 value columns;
 *   rows exp / softplus / LSSAR weight, 8 lanes at a time, with vector
 *        exp and log (Cephes polynomials, ~1 ulp) and log1p(u) for u in (0, 1]
 *        as 2 atanh(u / (2 + u)), accurate for tiny u where log(1 + u) is not.
 * Compiled with -mavx2 -mfma (the Makefile's *_avx2.c rule) and chosen at run
 * time by cpu_best_path(); the scalar kernels in attn.c are the reference. */
#include "attn_kern.h"
#include "vmath_avx2_inl.h"

#if defined(__x86_64__)
#include <immintrin.h>
#include <math.h>

#define AI static inline __attribute__((always_inline))

/* exp(x) (vmath's exp256_ps), exactly 0 below -87.3 where float would go
 * subnormal: the attention sums then never carry subnormal operands. */
AI __m256 v_exp(__m256 x) {
  __m256 under = _mm256_cmp_ps(x, _mm256_set1_ps(-87.33654f), _CMP_LT_OQ);
  return _mm256_andnot_ps(under, exp256_ps(x));
}

/* log(x) for normal x > 0. */
AI __m256 v_log(__m256 x) {
  __m256i bits = _mm256_castps_si256(x);
  __m256 e =
      _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(bits, 23), _mm256_set1_epi32(126)));
  __m256 m = _mm256_castsi256_ps(_mm256_or_si256(
      _mm256_and_si256(bits, _mm256_set1_epi32(0x007fffff)), _mm256_set1_epi32(0x3f000000)));
  __m256 small = _mm256_cmp_ps(m, _mm256_set1_ps(0.707106781186547524f), _CMP_LT_OQ);
  e = _mm256_sub_ps(e, _mm256_and_ps(small, _mm256_set1_ps(1.0f)));
  m = _mm256_sub_ps(_mm256_add_ps(m, _mm256_and_ps(small, m)), _mm256_set1_ps(1.0f));
  __m256 z = _mm256_mul_ps(m, m);
  __m256 p = _mm256_set1_ps(7.0376836292e-2f);
  p = _mm256_fmadd_ps(p, m, _mm256_set1_ps(-1.1514610310e-1f));
  p = _mm256_fmadd_ps(p, m, _mm256_set1_ps(1.1676998740e-1f));
  p = _mm256_fmadd_ps(p, m, _mm256_set1_ps(-1.2420140846e-1f));
  p = _mm256_fmadd_ps(p, m, _mm256_set1_ps(1.4249322787e-1f));
  p = _mm256_fmadd_ps(p, m, _mm256_set1_ps(-1.6668057665e-1f));
  p = _mm256_fmadd_ps(p, m, _mm256_set1_ps(2.0000714765e-1f));
  p = _mm256_fmadd_ps(p, m, _mm256_set1_ps(-2.4999993993e-1f));
  p = _mm256_fmadd_ps(p, m, _mm256_set1_ps(3.3333331174e-1f));
  __m256 y = _mm256_mul_ps(_mm256_mul_ps(p, m), z);
  y = _mm256_fmadd_ps(e, _mm256_set1_ps(-2.12194440e-4f), y);
  y = _mm256_fnmadd_ps(z, _mm256_set1_ps(0.5f), y);
  return _mm256_fmadd_ps(e, _mm256_set1_ps(0.693359375f), _mm256_add_ps(m, y));
}

/* log1p(u) for u in [0, 1]: 2 atanh(z), z = u / (2 + u) <= 1/3, by its series
 * to z^15 (next term below 2e-9 relative). */
AI __m256 v_log1p01(__m256 u) {
  __m256 z = _mm256_div_ps(u, _mm256_add_ps(u, _mm256_set1_ps(2.0f)));
  __m256 z2 = _mm256_mul_ps(z, z);
  __m256 p = _mm256_set1_ps(1.0f / 15);
  p = _mm256_fmadd_ps(p, z2, _mm256_set1_ps(1.0f / 13));
  p = _mm256_fmadd_ps(p, z2, _mm256_set1_ps(1.0f / 11));
  p = _mm256_fmadd_ps(p, z2, _mm256_set1_ps(1.0f / 9));
  p = _mm256_fmadd_ps(p, z2, _mm256_set1_ps(1.0f / 7));
  p = _mm256_fmadd_ps(p, z2, _mm256_set1_ps(1.0f / 5));
  p = _mm256_fmadd_ps(p, z2, _mm256_set1_ps(1.0f / 3));
  p = _mm256_fmadd_ps(p, z2, _mm256_set1_ps(1.0f));
  return _mm256_mul_ps(_mm256_add_ps(z, z), p);
}

/* softplus(x) = max(x, 0) + log1p(exp(-|x|)). */
AI __m256 v_softplus(__m256 x) {
  __m256 ax = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x);
  __m256 u = v_exp(_mm256_sub_ps(_mm256_setzero_ps(), ax));
  return _mm256_add_ps(_mm256_max_ps(x, _mm256_setzero_ps()), v_log1p01(u));
}

/* y^p for y in [ythr, ~1]: repeated squaring for an integer p (the
 * intermediates stay >= y^p >= 1e-30, never subnormal), else exp(p log y). */
AI __m256 v_pow(__m256 y, const attn_rowc *c) {
  if (c->ip > 0) {
    __m256 res = _mm256_set1_ps(1.0f), base = y;
    for (int n = c->ip;;) {
      if (n & 1) res = _mm256_mul_ps(res, base);
      n >>= 1;
      if (!n) break;
      base = _mm256_mul_ps(base, base);
    }
    return res;
  }
  return v_exp(_mm256_mul_ps(_mm256_set1_ps(c->p), v_log(y)));
}

AI float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

AI __m256 lanes_below(int n) { /* lanes 0..n-1 set */
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(n), iota));
}

/* ---- GEMM tiles ---------------------------------------------------------- */

AI void qk_block(const int mr, const float *q, int d, const float *kt, float *s) {
  __m256 a0[6], a1[6];
#pragma GCC unroll 6
  for (int r = 0; r < mr; r++) a0[r] = a1[r] = _mm256_setzero_ps();
  for (int c = 0; c < d; c++) {
    __m256 k0 = _mm256_loadu_ps(kt + (int64_t)c * ATTN_BK);
    __m256 k1 = _mm256_loadu_ps(kt + (int64_t)c * ATTN_BK + 8);
#pragma GCC unroll 6
    for (int r = 0; r < mr; r++) {
      __m256 b = _mm256_broadcast_ss(q + (int64_t)r * d + c);
      a0[r] = _mm256_fmadd_ps(b, k0, a0[r]);
      a1[r] = _mm256_fmadd_ps(b, k1, a1[r]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < mr; r++) {
    _mm256_storeu_ps(s + (int64_t)r * ATTN_BK, a0[r]);
    _mm256_storeu_ps(s + (int64_t)r * ATTN_BK + 8, a1[r]);
  }
}

/* One query row (decoding) over nb * 8 keys: nb independent accumulators,
 * so the FMA chains do not wait on each other (the 6 x 16 block above has
 * only two for one row). Each column's sum runs over c in the same order
 * as qk_block's, so the scores are the same bits. */
AI void qk_row(const int nb, const float *q, int d, const float *kt, float *s) {
  __m256 a[8];
#pragma GCC unroll 8
  for (int x = 0; x < nb; x++) a[x] = _mm256_setzero_ps();
  for (int c = 0; c < d; c++) {
    __m256 b = _mm256_broadcast_ss(q + c);
#pragma GCC unroll 8
    for (int x = 0; x < nb; x++)
      a[x] = _mm256_fmadd_ps(b, _mm256_loadu_ps(kt + (int64_t)c * ATTN_BK + 8 * x), a[x]);
  }
#pragma GCC unroll 8
  for (int x = 0; x < nb; x++) _mm256_storeu_ps(s + 8 * x, a[x]);
}

/* o[0..nb*8) += sum_{j < nk} p[j] v[j][0..nb*8), for one row. */
AI void pv_row(const int nb, const float *p, int nk, const float *v, int dvp, float *o) {
  __m256 a[8];
#pragma GCC unroll 8
  for (int x = 0; x < nb; x++) a[x] = _mm256_loadu_ps(o + 8 * x);
  for (int j = 0; j < nk; j++) {
    __m256 b = _mm256_broadcast_ss(p + j);
#pragma GCC unroll 8
    for (int x = 0; x < nb; x++)
      a[x] = _mm256_fmadd_ps(b, _mm256_loadu_ps(v + (int64_t)j * dvp + 8 * x), a[x]);
  }
#pragma GCC unroll 8
  for (int x = 0; x < nb; x++) _mm256_storeu_ps(o + 8 * x, a[x]);
}

static void av_qk(const float *q, int rows, int d, const float *kt, int ncols, float *s) {
  if (rows == 1) {
    switch (ncols) {
      case 64: qk_row(8, q, d, kt, s); return;
      case 48: qk_row(6, q, d, kt, s); return;
      case 32: qk_row(4, q, d, kt, s); return;
      default: qk_row(2, q, d, kt, s); return;
    }
  }
  for (int r0 = 0; r0 < rows; r0 += 6) {
    const float *qr = q + (int64_t)r0 * d;
    float *sr = s + (int64_t)r0 * ATTN_BK;
    int mr = rows - r0 < 6 ? rows - r0 : 6;
    for (int j = 0; j < ncols; j += 16) {
      switch (mr) {
        case 6: qk_block(6, qr, d, kt + j, sr + j); break;
        case 5: qk_block(5, qr, d, kt + j, sr + j); break;
        case 4: qk_block(4, qr, d, kt + j, sr + j); break;
        case 3: qk_block(3, qr, d, kt + j, sr + j); break;
        case 2: qk_block(2, qr, d, kt + j, sr + j); break;
        default: qk_block(1, qr, d, kt + j, sr + j); break;
      }
    }
  }
}

AI void pv_block(const int mr, const float *p, int nk, const float *v, int dvp, float *o) {
  __m256 a0[6], a1[6];
#pragma GCC unroll 6
  for (int r = 0; r < mr; r++) {
    a0[r] = _mm256_loadu_ps(o + (int64_t)r * dvp);
    a1[r] = _mm256_loadu_ps(o + (int64_t)r * dvp + 8);
  }
  for (int j = 0; j < nk; j++) {
    __m256 v0 = _mm256_loadu_ps(v + (int64_t)j * dvp);
    __m256 v1 = _mm256_loadu_ps(v + (int64_t)j * dvp + 8);
#pragma GCC unroll 6
    for (int r = 0; r < mr; r++) {
      __m256 b = _mm256_broadcast_ss(p + (int64_t)r * ATTN_BK + j);
      a0[r] = _mm256_fmadd_ps(b, v0, a0[r]);
      a1[r] = _mm256_fmadd_ps(b, v1, a1[r]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < mr; r++) {
    _mm256_storeu_ps(o + (int64_t)r * dvp, a0[r]);
    _mm256_storeu_ps(o + (int64_t)r * dvp + 8, a1[r]);
  }
}

static void av_pv(const float *p, int rows, int nk, const float *v, int dvp, float *o) {
  if (rows == 1) {
    int c = 0;
    for (; c + 64 <= dvp; c += 64) pv_row(8, p, nk, v + c, dvp, o + c);
    switch (dvp - c) {
      case 48: pv_row(6, p, nk, v + c, dvp, o + c); break;
      case 32: pv_row(4, p, nk, v + c, dvp, o + c); break;
      case 16: pv_row(2, p, nk, v + c, dvp, o + c); break;
      default: break;
    }
    return;
  }
  for (int r0 = 0; r0 < rows; r0 += 6) {
    const float *pr = p + (int64_t)r0 * ATTN_BK;
    float *orow = o + (int64_t)r0 * dvp;
    int mr = rows - r0 < 6 ? rows - r0 : 6;
    for (int c = 0; c < dvp; c += 16) {
      switch (mr) {
        case 6: pv_block(6, pr, nk, v + c, dvp, orow + c); break;
        case 5: pv_block(5, pr, nk, v + c, dvp, orow + c); break;
        case 4: pv_block(4, pr, nk, v + c, dvp, orow + c); break;
        case 3: pv_block(3, pr, nk, v + c, dvp, orow + c); break;
        case 2: pv_block(2, pr, nk, v + c, dvp, orow + c); break;
        default: pv_block(1, pr, nk, v + c, dvp, orow + c); break;
      }
    }
  }
}

/* ---- GEMM tiles over a float16 cache ---------------------------------------
 * The same blocks, each K or V vector converted from 8 halves (F16C) as it
 * is loaded; everything else, and the order of every sum, is as above. */

#define F16C __attribute__((target("f16c")))

AI F16C __m256 ldh(const uint16_t *p) {
  return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
}

AI F16C void qk_row_h(const int nb, const float *q, int d, const uint16_t *kt, float *s) {
  __m256 a[8];
#pragma GCC unroll 8
  for (int x = 0; x < nb; x++) a[x] = _mm256_setzero_ps();
  for (int c = 0; c < d; c++) {
    __m256 b = _mm256_broadcast_ss(q + c);
#pragma GCC unroll 8
    for (int x = 0; x < nb; x++)
      a[x] = _mm256_fmadd_ps(b, ldh(kt + (int64_t)c * ATTN_BK + 8 * x), a[x]);
  }
#pragma GCC unroll 8
  for (int x = 0; x < nb; x++) _mm256_storeu_ps(s + 8 * x, a[x]);
}

AI F16C void qk_block_h(const int mr, const float *q, int d, const uint16_t *kt, float *s) {
  __m256 a0[6], a1[6];
#pragma GCC unroll 6
  for (int r = 0; r < mr; r++) a0[r] = a1[r] = _mm256_setzero_ps();
  for (int c = 0; c < d; c++) {
    __m256 k0 = ldh(kt + (int64_t)c * ATTN_BK);
    __m256 k1 = ldh(kt + (int64_t)c * ATTN_BK + 8);
#pragma GCC unroll 6
    for (int r = 0; r < mr; r++) {
      __m256 b = _mm256_broadcast_ss(q + (int64_t)r * d + c);
      a0[r] = _mm256_fmadd_ps(b, k0, a0[r]);
      a1[r] = _mm256_fmadd_ps(b, k1, a1[r]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < mr; r++) {
    _mm256_storeu_ps(s + (int64_t)r * ATTN_BK, a0[r]);
    _mm256_storeu_ps(s + (int64_t)r * ATTN_BK + 8, a1[r]);
  }
}

static F16C void av_qk_h(const float *q, int rows, int d, const uint16_t *kt, int ncols, float *s) {
  if (rows == 1) {
    switch (ncols) {
      case 64: qk_row_h(8, q, d, kt, s); return;
      case 48: qk_row_h(6, q, d, kt, s); return;
      case 32: qk_row_h(4, q, d, kt, s); return;
      default: qk_row_h(2, q, d, kt, s); return;
    }
  }
  for (int r0 = 0; r0 < rows; r0 += 6) {
    const float *qr = q + (int64_t)r0 * d;
    float *sr = s + (int64_t)r0 * ATTN_BK;
    int mr = rows - r0 < 6 ? rows - r0 : 6;
    for (int j = 0; j < ncols; j += 16) {
      switch (mr) {
        case 6: qk_block_h(6, qr, d, kt + j, sr + j); break;
        case 5: qk_block_h(5, qr, d, kt + j, sr + j); break;
        case 4: qk_block_h(4, qr, d, kt + j, sr + j); break;
        case 3: qk_block_h(3, qr, d, kt + j, sr + j); break;
        case 2: qk_block_h(2, qr, d, kt + j, sr + j); break;
        default: qk_block_h(1, qr, d, kt + j, sr + j); break;
      }
    }
  }
}

AI F16C void pv_row_h(const int nb, const float *p, int nk, const uint16_t *v, int dvp, float *o) {
  __m256 a[8];
#pragma GCC unroll 8
  for (int x = 0; x < nb; x++) a[x] = _mm256_loadu_ps(o + 8 * x);
  for (int j = 0; j < nk; j++) {
    __m256 b = _mm256_broadcast_ss(p + j);
#pragma GCC unroll 8
    for (int x = 0; x < nb; x++) a[x] = _mm256_fmadd_ps(b, ldh(v + (int64_t)j * dvp + 8 * x), a[x]);
  }
#pragma GCC unroll 8
  for (int x = 0; x < nb; x++) _mm256_storeu_ps(o + 8 * x, a[x]);
}

AI F16C void pv_block_h(const int mr, const float *p, int nk, const uint16_t *v, int dvp,
                        float *o) {
  __m256 a0[6], a1[6];
#pragma GCC unroll 6
  for (int r = 0; r < mr; r++) {
    a0[r] = _mm256_loadu_ps(o + (int64_t)r * dvp);
    a1[r] = _mm256_loadu_ps(o + (int64_t)r * dvp + 8);
  }
  for (int j = 0; j < nk; j++) {
    __m256 v0 = ldh(v + (int64_t)j * dvp);
    __m256 v1 = ldh(v + (int64_t)j * dvp + 8);
#pragma GCC unroll 6
    for (int r = 0; r < mr; r++) {
      __m256 b = _mm256_broadcast_ss(p + (int64_t)r * ATTN_BK + j);
      a0[r] = _mm256_fmadd_ps(b, v0, a0[r]);
      a1[r] = _mm256_fmadd_ps(b, v1, a1[r]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < mr; r++) {
    _mm256_storeu_ps(o + (int64_t)r * dvp, a0[r]);
    _mm256_storeu_ps(o + (int64_t)r * dvp + 8, a1[r]);
  }
}

static F16C void av_pv_h(const float *p, int rows, int nk, const uint16_t *v, int dvp, float *o) {
  if (rows == 1) {
    int c = 0;
    for (; c + 64 <= dvp; c += 64) pv_row_h(8, p, nk, v + c, dvp, o + c);
    switch (dvp - c) {
      case 48: pv_row_h(6, p, nk, v + c, dvp, o + c); break;
      case 32: pv_row_h(4, p, nk, v + c, dvp, o + c); break;
      case 16: pv_row_h(2, p, nk, v + c, dvp, o + c); break;
      default: break;
    }
    return;
  }
  for (int r0 = 0; r0 < rows; r0 += 6) {
    const float *pr = p + (int64_t)r0 * ATTN_BK;
    float *orow = o + (int64_t)r0 * dvp;
    int mr = rows - r0 < 6 ? rows - r0 : 6;
    for (int c = 0; c < dvp; c += 16) {
      switch (mr) {
        case 6: pv_block_h(6, pr, nk, v + c, dvp, orow + c); break;
        case 5: pv_block_h(5, pr, nk, v + c, dvp, orow + c); break;
        case 4: pv_block_h(4, pr, nk, v + c, dvp, orow + c); break;
        case 3: pv_block_h(3, pr, nk, v + c, dvp, orow + c); break;
        case 2: pv_block_h(2, pr, nk, v + c, dvp, orow + c); break;
        default: pv_block_h(1, pr, nk, v + c, dvp, orow + c); break;
      }
    }
  }
}

/* ---- row transforms ------------------------------------------------------ */

static float av_rowmax(const float *s, int nv) {
  __m256 m = _mm256_set1_ps(-INFINITY);
  int j = 0;
  for (; j + 8 <= nv; j += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(s + j));
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  h = _mm_max_ss(h, _mm_movehdup_ps(h));
  float r = _mm_cvtss_f32(h);
  for (; j < nv; j++) r = s[j] > r ? s[j] : r;
  return r;
}

/* The common loop: f over s[0..nv) 8 lanes at a time (the last vector
 * masked; s has ATTN_BK columns so it may be read whole), zeros to ncols. */
#define ROW_LOOP(EXPR)                                                    \
  __m256 sum = _mm256_setzero_ps();                                       \
  int j = 0;                                                              \
  for (; j < nv; j += 8) {                                                \
    __m256 x = _mm256_loadu_ps(s + j);                                    \
    __m256 w = (EXPR);                                                    \
    if (j + 8 > nv) w = _mm256_and_ps(w, lanes_below(nv - j));            \
    _mm256_storeu_ps(s + j, w);                                           \
    sum = _mm256_add_ps(sum, w);                                          \
  }                                                                       \
  for (; j < ncols; j += 8) _mm256_storeu_ps(s + j, _mm256_setzero_ps()); \
  return hsum(sum)

static double av_row_exp(float *s, int nv, int ncols, float m) {
  const __m256 mv = _mm256_set1_ps(m);
  ROW_LOOP(v_exp(_mm256_sub_ps(x, mv)));
}

static double av_row_softplus(float *s, int nv, int ncols) {
  ROW_LOOP(v_softplus(x));
}

/* The weight from a = softplus(s). */
AI __m256 lssar_weight_sp(__m256 a, const attn_rowc *c) {
  const __m256 thr = _mm256_set1_ps(c->ythr);
  __m256 y = _mm256_mul_ps(_mm256_fmsub_ps(a, _mm256_set1_ps(c->c1), _mm256_set1_ps(c->o)),
                           _mm256_set1_ps(c->inv_xmax));
  __m256 keep = _mm256_cmp_ps(y, thr, _CMP_GE_OQ);
  if (_mm256_movemask_ps(keep) == 0) return _mm256_setzero_ps(); /* the ReLU'd majority */
  return _mm256_and_ps(keep, v_pow(_mm256_max_ps(y, thr), c));
}

static double av_row_lssar(float *s, int nv, int ncols, const attn_rowc *c) {
  ROW_LOOP(lssar_weight_sp(v_softplus(x), c));
}

static double av_row_lssar_sp(float *s, int nv, int ncols, const attn_rowc *c) {
  ROW_LOOP(lssar_weight_sp(x, c));
}

const attn_kern attn__kern_avx2 = {"avx2+fma", av_qk,           av_pv,        av_rowmax,
                                   av_row_exp, av_row_softplus, av_row_lssar, av_row_lssar_sp,
                                   av_qk_h,    av_pv_h};

#endif
