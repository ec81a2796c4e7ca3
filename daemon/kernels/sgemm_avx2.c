/* sgemm_avx2.c - the AVX2+FMA single-precision product (see sgemm.h).
 *
 * Large products follow Goto/BLIS: B is packed KC x NC at a time into
 * column panels NR wide, A is packed MC x KC at a time into row panels MR
 * tall, and a 6x16 register block (12 accumulators, 2 loads and 6
 * broadcasts per k) walks them. A panel of B (KC x 16 floats, 16 KiB) stays
 * in L1 while the A block (MC x KC, 144 KiB) stays in L2. Packing pads the
 * ragged edges with zeros, so the register block always runs full and only
 * its store is clipped.
 *
 * Products with very few rows (up to DIRECT_MAX_M = 8: a decode step's
 * tokens through a Linear layer) skip the packing, which would cost as much
 * as the product: B is streamed once for all the rows, row by row in
 * contiguous slabs (trans_b 0) or four rows of B^T at a time dotted with
 * every row of A (trans_b 1), each element summed as for one row alone.
 *
 * beta is applied only by the first KC block; later blocks accumulate. With
 * beta 0 the old C is never read, so NaN there cannot leak through. */
#if defined(__x86_64__)
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "sgemm.h"

#define MR 6
#define NR 16
#define KC 256
#define MC 144  /* multiple of MR */
#define NC 3072 /* multiple of NR */
#define DIRECT_MAX_M 8

static int64_t min64(int64_t a, int64_t b) {
  return a < b ? a : b;
}

/* Lane mask selecting the first n (0..8) lanes. */
static __m256i tail_mask(int64_t n) {
  static const int32_t m[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
  return _mm256_loadu_si256((const __m256i *)(m + 8 - n));
}

/* c = beta * c + v, never reading c when beta == 0. */
static inline float merge1(float c, float v, float beta) {
  return beta == 0.0f ? v : (beta == 1.0f ? c + v : beta * c + v);
}

static inline __m256 merge8(const float *c, __m256 v, float beta) {
  if (beta == 0.0f) return v;
  if (beta == 1.0f) return _mm256_add_ps(_mm256_loadu_ps(c), v);
  return _mm256_fmadd_ps(_mm256_set1_ps(beta), _mm256_loadu_ps(c), v);
}

/* ---- packing ---------------------------------------------------------- */

/* Ap[panel][k][MR]: rows i..i+MR of A[mc, kc], zero past mc. */
static void pack_a(const float *A, int64_t lda, int64_t mc, int64_t kc, float *Ap) {
  for (int64_t i = 0; i < mc; i += MR) {
    int64_t mr = min64(MR, mc - i);
    const float *a = A + i * lda;
    if (mr == MR) {
      for (int64_t k = 0; k < kc; k++) {
        for (int m = 0; m < MR; m++) Ap[k * MR + m] = a[m * lda + k];
      }
    } else {
      for (int64_t k = 0; k < kc; k++) {
        for (int m = 0; m < MR; m++) Ap[k * MR + m] = m < mr ? a[m * lda + k] : 0.0f;
      }
    }
    Ap += kc * MR;
  }
}

/* Bp[panel][k][NR] from B[kc, nc] stored row-major (trans_b == 0). */
static void pack_b_n(const float *B, int64_t ldb, int64_t kc, int64_t nc, float *Bp) {
  for (int64_t j = 0; j < nc; j += NR) {
    int64_t nr = min64(NR, nc - j);
    const float *b = B + j;
    if (nr == NR) {
      for (int64_t k = 0; k < kc; k++) {
        _mm256_store_ps(Bp + k * NR, _mm256_loadu_ps(b + k * ldb));
        _mm256_store_ps(Bp + k * NR + 8, _mm256_loadu_ps(b + k * ldb + 8));
      }
    } else {
      __m256i m0 = tail_mask(min64(nr, 8)), m1 = tail_mask(nr > 8 ? nr - 8 : 0);
      for (int64_t k = 0; k < kc; k++) {
        _mm256_store_ps(Bp + k * NR, _mm256_maskload_ps(b + k * ldb, m0));
        _mm256_store_ps(Bp + k * NR + 8, _mm256_maskload_ps(b + k * ldb + 8, m1));
      }
    }
    Bp += kc * NR;
  }
}

/* Transposes an 8x8 block: rows r[0..7] in, columns out (in place). */
static inline void transpose8(__m256 r[8]) {
  __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
  r[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
  r[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
  r[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
  r[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
  r[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
  r[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
  r[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}

/* Bp[panel][k][NR] from B^T stored [nc, kc] row-major (trans_b == 1):
 * 8x8 register transposes, with scalar edges. */
static void pack_b_t(const float *B, int64_t ldb, int64_t kc, int64_t nc, float *Bp) {
  for (int64_t j = 0; j < nc; j += NR) {
    for (int half = 0; half < 2; half++) {
      int64_t j0 = j + half * 8;
      if (j0 + 8 > nc) continue; /* done by the scalar edge below */
      const float *b = B + j0 * ldb;
      for (int64_t k = 0; k + 8 <= kc; k += 8) {
        __m256 r[8];
        for (int t = 0; t < 8; t++) r[t] = _mm256_loadu_ps(b + t * ldb + k);
        transpose8(r);
        for (int t = 0; t < 8; t++) _mm256_store_ps(Bp + (k + t) * NR + half * 8, r[t]);
      }
    }
    /* What the 8x8 blocks did not cover: k past the last multiple of 8 for
     * a full half, every k for a half with fewer than 8 columns (zero past
     * the last column). */
    int64_t kfull = kc & ~(int64_t)7;
    for (int half = 0; half < 2; half++) {
      int64_t j0 = j + half * 8;
      for (int64_t kk = j0 + 8 <= nc ? kfull : 0; kk < kc; kk++) {
        for (int64_t jj = 0; jj < 8; jj++)
          Bp[kk * NR + half * 8 + jj] = j0 + jj < nc ? B[(j0 + jj) * ldb + kk] : 0.0f;
      }
    }
    Bp += kc * NR;
  }
}

/* ---- the 6x16 register block -------------------------------------------- */

/* C[mr, nr] = beta * C + Ap-panel * Bp-panel over kc. */
static void kernel_6x16(int64_t kc, const float *restrict ap, const float *restrict bp, float *C,
                        int64_t ldc, int64_t mr, int64_t nr, float beta) {
  __m256 c00 = _mm256_setzero_ps(), c01 = _mm256_setzero_ps();
  __m256 c10 = _mm256_setzero_ps(), c11 = _mm256_setzero_ps();
  __m256 c20 = _mm256_setzero_ps(), c21 = _mm256_setzero_ps();
  __m256 c30 = _mm256_setzero_ps(), c31 = _mm256_setzero_ps();
  __m256 c40 = _mm256_setzero_ps(), c41 = _mm256_setzero_ps();
  __m256 c50 = _mm256_setzero_ps(), c51 = _mm256_setzero_ps();
  for (int64_t m = 0; m < mr; m++) _mm_prefetch((const char *)(C + m * ldc), _MM_HINT_T0);
#pragma GCC unroll 4
  for (int64_t k = 0; k < kc; k++) {
    __m256 b0 = _mm256_load_ps(bp), b1 = _mm256_load_ps(bp + 8);
    __m256 a;
    a = _mm256_broadcast_ss(ap + 0);
    c00 = _mm256_fmadd_ps(a, b0, c00);
    c01 = _mm256_fmadd_ps(a, b1, c01);
    a = _mm256_broadcast_ss(ap + 1);
    c10 = _mm256_fmadd_ps(a, b0, c10);
    c11 = _mm256_fmadd_ps(a, b1, c11);
    a = _mm256_broadcast_ss(ap + 2);
    c20 = _mm256_fmadd_ps(a, b0, c20);
    c21 = _mm256_fmadd_ps(a, b1, c21);
    a = _mm256_broadcast_ss(ap + 3);
    c30 = _mm256_fmadd_ps(a, b0, c30);
    c31 = _mm256_fmadd_ps(a, b1, c31);
    a = _mm256_broadcast_ss(ap + 4);
    c40 = _mm256_fmadd_ps(a, b0, c40);
    c41 = _mm256_fmadd_ps(a, b1, c41);
    a = _mm256_broadcast_ss(ap + 5);
    c50 = _mm256_fmadd_ps(a, b0, c50);
    c51 = _mm256_fmadd_ps(a, b1, c51);
    ap += MR;
    bp += NR;
  }
  __m256 acc[MR][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
  if (nr == NR) {
    for (int64_t m = 0; m < mr; m++) {
      float *c = C + m * ldc;
      _mm256_storeu_ps(c, merge8(c, acc[m][0], beta));
      _mm256_storeu_ps(c + 8, merge8(c + 8, acc[m][1], beta));
    }
    return;
  }
  float tmp[NR];
  for (int64_t m = 0; m < mr; m++) {
    float *c = C + m * ldc;
    _mm256_storeu_ps(tmp, acc[m][0]);
    _mm256_storeu_ps(tmp + 8, acc[m][1]);
    for (int64_t j = 0; j < nr; j++) c[j] = merge1(c[j], tmp[j], beta);
  }
}

/* ---- packed path ---------------------------------------------------------- */

static void gemm_packed(int trans_b, int64_t M, int64_t N, int64_t K, const float *A, int64_t lda,
                        const float *B, int64_t ldb, float beta, float *C, int64_t ldc, float *Ap,
                        float *Bp, int64_t nc_max) {
  for (int64_t jc = 0; jc < N; jc += nc_max) {
    int64_t nc = min64(nc_max, N - jc);
    for (int64_t pc = 0; pc < K; pc += KC) {
      int64_t kc = min64(KC, K - pc);
      float bet = pc == 0 ? beta : 1.0f;
      if (trans_b)
        pack_b_t(B + jc * ldb + pc, ldb, kc, nc, Bp);
      else
        pack_b_n(B + pc * ldb + jc, ldb, kc, nc, Bp);
      for (int64_t ic = 0; ic < M; ic += MC) {
        int64_t mc = min64(MC, M - ic);
        pack_a(A + ic * lda + pc, lda, mc, kc, Ap);
        for (int64_t jr = 0; jr < nc; jr += NR) {
          const float *bp = Bp + (jr / NR) * kc * NR;
          for (int64_t ir = 0; ir < mc; ir += MR) {
            kernel_6x16(kc, Ap + (ir / MR) * kc * MR, bp, C + (ic + ir) * ldc + jc + jr, ldc,
                        min64(MR, mc - ir), min64(NR, nc - jr), bet);
          }
        }
      }
    }
  }
}

/* ---- few-row paths (no packing) ------------------------------------------ */

static float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

/* One row against B^T [N, K]: c[j] = beta*c[j] + dot(a, B[j, :]), four
 * rows of B at a time so that each load of a feeds four FMAs. */
static void row_t(int64_t N, int64_t K, const float *a, const float *B, int64_t ldb, float beta,
                  float *c) {
  int64_t kv = K & ~(int64_t)7;
  __m256i mk = tail_mask(K - kv);
  int64_t j = 0;
  for (; j + 4 <= N; j += 4) {
    const float *b0 = B + j * ldb, *b1 = b0 + ldb, *b2 = b1 + ldb, *b3 = b2 + ldb;
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    __m256 s2 = _mm256_setzero_ps(), s3 = _mm256_setzero_ps();
    for (int64_t k = 0; k < kv; k += 8) {
      __m256 av = _mm256_loadu_ps(a + k);
      s0 = _mm256_fmadd_ps(av, _mm256_loadu_ps(b0 + k), s0);
      s1 = _mm256_fmadd_ps(av, _mm256_loadu_ps(b1 + k), s1);
      s2 = _mm256_fmadd_ps(av, _mm256_loadu_ps(b2 + k), s2);
      s3 = _mm256_fmadd_ps(av, _mm256_loadu_ps(b3 + k), s3);
    }
    if (kv < K) {
      __m256 av = _mm256_maskload_ps(a + kv, mk);
      s0 = _mm256_fmadd_ps(av, _mm256_maskload_ps(b0 + kv, mk), s0);
      s1 = _mm256_fmadd_ps(av, _mm256_maskload_ps(b1 + kv, mk), s1);
      s2 = _mm256_fmadd_ps(av, _mm256_maskload_ps(b2 + kv, mk), s2);
      s3 = _mm256_fmadd_ps(av, _mm256_maskload_ps(b3 + kv, mk), s3);
    }
    c[j] = merge1(c[j], hsum8(s0), beta);
    c[j + 1] = merge1(c[j + 1], hsum8(s1), beta);
    c[j + 2] = merge1(c[j + 2], hsum8(s2), beta);
    c[j + 3] = merge1(c[j + 3], hsum8(s3), beta);
  }
  for (; j < N; j++) {
    const float *b = B + j * ldb;
    __m256 s = _mm256_setzero_ps();
    for (int64_t k = 0; k < kv; k += 8)
      s = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(b + k), s);
    if (kv < K)
      s = _mm256_fmadd_ps(_mm256_maskload_ps(a + kv, mk), _mm256_maskload_ps(b + kv, mk), s);
    c[j] = merge1(c[j], hsum8(s), beta);
  }
}

/* ---- few rows (decoding) ---------------------------------------------------
 * M <= DIRECT_MAX_M rows read B once between them: B is walked in chunks (32
 * columns of B, or 4 rows of B^T) small enough to stay in L1/L2 while every
 * row of A passes over them, so a decode step's batch of sequences costs one
 * pass over the weights from memory, not one per sequence. Each C element
 * is summed exactly as row_n / row_t sum it (one FMA chain over k per
 * column; eight-lane partial dots then hsum8), so a row's result does not
 * depend on how many rows share the call. */

/* C[M, N] (M <= DIRECT_MAX_M) = A B with B [K, N]: B is read row by row,
 * contiguously, in slabs of FEW_W columns; the rows' sums for the slab stay
 * in an L1-sized buffer and take four rows of B per visit. Per column the
 * sum is one FMA chain over k from zero, as row_n had it. */
#define FEW_W 1024
#define FEW_ACC 4096 /* floats of row sums per thread (16 KiB: L1 beside B's four rows) */

/* acc[0..1][x] += a[0..1][k..k+3] . b0..b3[x] over x < wv (rows in pairs:
 * each B vector loaded feeds both rows); per column one FMA chain over k. */
static inline __attribute__((always_inline)) void few_n_k4(const int two, const float *a,
                                                           int64_t lda, const float *b0,
                                                           int64_t ldb, float *ac, int64_t ws,
                                                           int64_t w, int64_t wv) {
  const float *b1 = b0 + ldb, *b2 = b1 + ldb, *b3 = b2 + ldb;
  float *ad = ac + ws; /* the second row's sums */
  __m256 p0 = _mm256_broadcast_ss(a), p1 = _mm256_broadcast_ss(a + 1);
  __m256 p2 = _mm256_broadcast_ss(a + 2), p3 = _mm256_broadcast_ss(a + 3);
  __m256 q0 = p0, q1 = p1, q2 = p2, q3 = p3;
  if (two) {
    q0 = _mm256_broadcast_ss(a + lda), q1 = _mm256_broadcast_ss(a + lda + 1);
    q2 = _mm256_broadcast_ss(a + lda + 2), q3 = _mm256_broadcast_ss(a + lda + 3);
  }
  for (int64_t x = 0; x < wv; x += 8) {
    __m256 v0 = _mm256_loadu_ps(b0 + x), v1 = _mm256_loadu_ps(b1 + x);
    __m256 v2 = _mm256_loadu_ps(b2 + x), v3 = _mm256_loadu_ps(b3 + x);
    __m256 u = _mm256_load_ps(ac + x);
    u = _mm256_fmadd_ps(p0, v0, u);
    u = _mm256_fmadd_ps(p1, v1, u);
    u = _mm256_fmadd_ps(p2, v2, u);
    u = _mm256_fmadd_ps(p3, v3, u);
    _mm256_store_ps(ac + x, u);
    if (two) {
      __m256 t = _mm256_load_ps(ad + x);
      t = _mm256_fmadd_ps(q0, v0, t);
      t = _mm256_fmadd_ps(q1, v1, t);
      t = _mm256_fmadd_ps(q2, v2, t);
      t = _mm256_fmadd_ps(q3, v3, t);
      _mm256_store_ps(ad + x, t);
    }
  }
  for (int r = 0; r < 1 + two; r++) {
    const float *ar = a + r * lda;
    float *acr = ac + r * ws;
    for (int64_t x = wv; x < w; x++) {
      float v = acr[x];
      v = fmaf(ar[0], b0[x], v);
      v = fmaf(ar[1], b1[x], v);
      v = fmaf(ar[2], b2[x], v);
      v = fmaf(ar[3], b3[x], v);
      acr[x] = v;
    }
  }
}

static void few_n(int64_t M, int64_t N, int64_t K, const float *A, int64_t lda, const float *B,
                  int64_t ldb, float beta, float *C, int64_t ldc) {
  static _Thread_local float acc[FEW_ACC] __attribute__((aligned(32)));
  /* slab width: rows x width sums fit FEW_ACC; a multiple of 8 */
  int64_t W = min64(FEW_W, FEW_ACC / M / 8 * 8);
  for (int64_t j0 = 0; j0 < N; j0 += W) {
    /* ws: each row's sums start 32-byte aligned */
    int64_t w = min64(W, N - j0), wv = w & ~(int64_t)7, ws = (w + 7) & ~(int64_t)7;
    memset(acc, 0, sizeof(float) * (size_t)(M * ws));
    const float *b = B + j0;
    int64_t k = 0;
    for (; k + 4 <= K; k += 4) {
      const float *b0 = b + k * ldb;
      int64_t m = 0;
      for (; m + 2 <= M; m += 2)
        few_n_k4(1, A + m * lda + k, lda, b0, ldb, acc + m * ws, ws, w, wv);
      if (m < M) few_n_k4(0, A + m * lda + k, lda, b0, ldb, acc + m * ws, ws, w, wv);
    }
    for (; k < K; k++) {
      const float *b0 = b + k * ldb;
      for (int64_t m = 0; m < M; m++) {
        float *ac = acc + m * ws;
        __m256 a0 = _mm256_broadcast_ss(A + m * lda + k);
        for (int64_t x = 0; x < wv; x += 8)
          _mm256_store_ps(ac + x,
                          _mm256_fmadd_ps(a0, _mm256_loadu_ps(b0 + x), _mm256_load_ps(ac + x)));
        for (int64_t x = wv; x < w; x++) ac[x] = fmaf(A[m * lda + k], b0[x], ac[x]);
      }
    }
    for (int64_t m = 0; m < M; m++) {
      float *c = C + m * ldc + j0;
      const float *ac = acc + m * ws;
      int64_t x = 0;
      for (; x < wv; x += 8) _mm256_storeu_ps(c + x, merge8(c + x, _mm256_loadu_ps(ac + x), beta));
      for (; x < w; x++) c[x] = merge1(c[x], ac[x], beta);
    }
  }
}

/* rows m..m+mr of C[:, j..j+4) against rows j..j+4 of B [N, K]. */
static inline __attribute__((always_inline)) void few_t_block(const int mr, int64_t K,
                                                              const float *A, int64_t lda,
                                                              const float *B, int64_t ldb,
                                                              float beta, float *C, int64_t ldc) {
  int64_t kv = K & ~(int64_t)7;
  __m256i mk = tail_mask(K - kv);
  const float *b0 = B, *b1 = b0 + ldb, *b2 = b1 + ldb, *b3 = b2 + ldb;
  __m256 s[2][4];
#pragma GCC unroll 2
  for (int r = 0; r < mr; r++)
#pragma GCC unroll 4
    for (int t = 0; t < 4; t++) s[r][t] = _mm256_setzero_ps();
  for (int64_t k = 0; k < kv; k += 8) {
    __m256 v0 = _mm256_loadu_ps(b0 + k), v1 = _mm256_loadu_ps(b1 + k);
    __m256 v2 = _mm256_loadu_ps(b2 + k), v3 = _mm256_loadu_ps(b3 + k);
#pragma GCC unroll 2
    for (int r = 0; r < mr; r++) {
      __m256 av = _mm256_loadu_ps(A + r * lda + k);
      s[r][0] = _mm256_fmadd_ps(av, v0, s[r][0]);
      s[r][1] = _mm256_fmadd_ps(av, v1, s[r][1]);
      s[r][2] = _mm256_fmadd_ps(av, v2, s[r][2]);
      s[r][3] = _mm256_fmadd_ps(av, v3, s[r][3]);
    }
  }
  if (kv < K) {
    __m256 v0 = _mm256_maskload_ps(b0 + kv, mk), v1 = _mm256_maskload_ps(b1 + kv, mk);
    __m256 v2 = _mm256_maskload_ps(b2 + kv, mk), v3 = _mm256_maskload_ps(b3 + kv, mk);
#pragma GCC unroll 2
    for (int r = 0; r < mr; r++) {
      __m256 av = _mm256_maskload_ps(A + r * lda + kv, mk);
      s[r][0] = _mm256_fmadd_ps(av, v0, s[r][0]);
      s[r][1] = _mm256_fmadd_ps(av, v1, s[r][1]);
      s[r][2] = _mm256_fmadd_ps(av, v2, s[r][2]);
      s[r][3] = _mm256_fmadd_ps(av, v3, s[r][3]);
    }
  }
#pragma GCC unroll 2
  for (int r = 0; r < mr; r++)
#pragma GCC unroll 4
    for (int t = 0; t < 4; t++) C[r * ldc + t] = merge1(C[r * ldc + t], hsum8(s[r][t]), beta);
}

static void few_t(int64_t M, int64_t N, int64_t K, const float *A, int64_t lda, const float *B,
                  int64_t ldb, float beta, float *C, int64_t ldc) {
  int64_t j = 0;
  for (; j + 4 <= N; j += 4)
    for (int64_t m = 0; m < M; m += 2) {
      if (M - m >= 2)
        few_t_block(2, K, A + m * lda, lda, B + j * ldb, ldb, beta, C + m * ldc + j, ldc);
      else
        few_t_block(1, K, A + m * lda, lda, B + j * ldb, ldb, beta, C + m * ldc + j, ldc);
    }
  if (j < N) /* the last 1..3 rows of B^T: row_t's own tail */
    for (int64_t m = 0; m < M; m++)
      row_t(N - j, K, A + m * lda, B + j * ldb, ldb, beta, C + m * ldc + j);
}

/* ---- entry ----------------------------------------------------------------- */

static void gemm_avx2(int trans_b, int64_t M, int64_t N, int64_t K, const float *A, int64_t lda,
                      const float *B, int64_t ldb, float beta, float *C, int64_t ldc) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    for (int64_t i = 0; i < M; i++)
      for (int64_t j = 0; j < N; j++) C[i * ldc + j] = merge1(C[i * ldc + j], 0.0f, beta);
    return;
  }
  if (M <= DIRECT_MAX_M) {
    if (trans_b)
      few_t(M, N, K, A, lda, B, ldb, beta, C, ldc);
    else
      few_n(M, N, K, A, lda, B, ldb, beta, C, ldc);
    return;
  }
  int64_t kc = min64(KC, K);
  int64_t mc = min64(MC, (M + MR - 1) / MR * MR);
  int64_t nc = min64(NC, (N + NR - 1) / NR * NR);
  /* the thread's buffer: both panels 64-byte aligned */
  int64_t na = (mc * kc + 15) & ~(int64_t)15;
  float *Ap = sg__pack_buffer((size_t)(na + nc * kc));
  if (!Ap) {
    /* No memory for panels: still give the right answer, only slower. */
    sg_gemm_ref(trans_b, M, N, K, A, lda, B, ldb, beta, C, ldc);
    return;
  }
  float *Bp = Ap + na;
  gemm_packed(trans_b, M, N, K, A, lda, B, ldb, beta, C, ldc, Ap, Bp, nc);
}

/* Row-invariant: every M through the few-row kernels, DIRECT_MAX_M rows at
 * a time; they sum each element as for its row alone, so a row's result is
 * the same bits in a product of any number of rows (and the same as a
 * 1-row product through gemm_avx2). */
static void gemm_avx2_inv(int trans_b, int64_t M, int64_t N, int64_t K, const float *A, int64_t lda,
                          const float *B, int64_t ldb, float beta, float *C, int64_t ldc) {
  if (M <= DIRECT_MAX_M || K <= 0) {
    gemm_avx2(trans_b, M, N, K, A, lda, B, ldb, beta, C, ldc);
    return;
  }
  for (int64_t i = 0; i < M; i += DIRECT_MAX_M) {
    int64_t m = min64(DIRECT_MAX_M, M - i);
    if (trans_b)
      few_t(m, N, K, A + i * lda, lda, B, ldb, beta, C + i * ldc, ldc);
    else
      few_n(m, N, K, A + i * lda, lda, B, ldb, beta, C + i * ldc, ldc);
  }
}

const sg_ops sg__ops_avx2 = {"avx2+fma", gemm_avx2, gemm_avx2_inv, MR, NR};

#endif
