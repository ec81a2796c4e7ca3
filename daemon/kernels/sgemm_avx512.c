/* sgemm_avx512.c - the AVX-512 single-precision product (see sgemm.h).
 *
 * The same Goto/BLIS scheme as sgemm_avx2.c with a 12x32 register block:
 * 24 zmm accumulators, two zmm loads of B and twelve broadcasts of A per k.
 * AVX-512's 32 registers let the block be four times the AVX2 one, so each
 * byte of packed B and A loaded feeds twice as many FMAs; on Zen 4, which
 * splits a 512-bit FMA into two 256-bit halves, that (not the width) is the
 * gain. Ragged edges use lane masks instead of a scalar tail.
 *
 * Products with very few rows (at most DIRECT_MAX_M, as in the AVX2 path)
 * run the AVX2 path's unpacked kernels: they stream B once, and 512-bit
 * versions of them (eight dot products of 16 lanes at a time) measured
 * 1.4x slower on Zen 4 at 1 x 768 x 768, where AVX2 matches OpenBLAS.
 *
 * beta is applied only by the first KC block; later blocks accumulate. With
 * beta 0 the old C is never read, so NaN there cannot leak through. */
#if defined(__x86_64__)
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "sgemm.h"

#define MR 12
#define NR 32
#define KC 256
#define MC 144         /* multiple of MR */
#define NC 3072        /* multiple of NR */
#define DIRECT_MAX_M 8 /* as sgemm_avx2.c */

extern const sg_ops sg__ops_avx2; /* sgemm_avx2.c */

static int64_t min64(int64_t a, int64_t b) {
  return a < b ? a : b;
}

static __mmask16 mask16(int64_t n) {
  return n >= 16 ? (__mmask16)0xFFFF : n <= 0 ? (__mmask16)0 : (__mmask16)((1u << n) - 1u);
}

static inline float merge1(float c, float v, float beta) {
  return beta == 0.0f ? v : (beta == 1.0f ? c + v : beta * c + v);
}

/* Stores v into the first n lanes at c as beta * c + v. */
static inline void store16(float *c, __m512 v, float beta, __mmask16 m) {
  if (beta != 0.0f) {
    __m512 old = _mm512_maskz_loadu_ps(m, c);
    v = beta == 1.0f ? _mm512_add_ps(old, v) : _mm512_fmadd_ps(_mm512_set1_ps(beta), old, v);
  }
  _mm512_mask_storeu_ps(c, m, v);
}

/* ---- packing ---------------------------------------------------------- */

/* Ap[panel][k][MR]: rows i..i+MR of A[mc, kc], zero past mc. */
static void pack_a(const float *A, int64_t lda, int64_t mc, int64_t kc, float *Ap) {
  for (int64_t i = 0; i < mc; i += MR) {
    int64_t mr = min64(MR, mc - i);
    const float *a = A + i * lda;
    for (int64_t k = 0; k < kc; k++)
      for (int m = 0; m < MR; m++) Ap[k * MR + m] = m < mr ? a[m * lda + k] : 0.0f;
    Ap += kc * MR;
  }
}

/* Bp[panel][k][NR] from B[kc, nc] stored row-major (trans_b == 0). */
static void pack_b_n(const float *B, int64_t ldb, int64_t kc, int64_t nc, float *Bp) {
  for (int64_t j = 0; j < nc; j += NR) {
    __mmask16 m0 = mask16(nc - j), m1 = mask16(nc - j - 16);
    const float *b = B + j;
    for (int64_t k = 0; k < kc; k++) {
      _mm512_store_ps(Bp + k * NR, _mm512_maskz_loadu_ps(m0, b + k * ldb));
      _mm512_store_ps(Bp + k * NR + 16, _mm512_maskz_loadu_ps(m1, b + k * ldb + 16));
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

/* Bp[panel][k][NR] from B^T stored [nc, kc] row-major (trans_b == 1): 8x8
 * register transposes for each full eighth of a panel, scalar edges. */
static void pack_b_t(const float *B, int64_t ldb, int64_t kc, int64_t nc, float *Bp) {
  int64_t kfull = kc & ~(int64_t)7;
  for (int64_t j = 0; j < nc; j += NR) {
    for (int q = 0; q < NR / 8; q++) {
      int64_t j0 = j + q * 8;
      if (j0 + 8 <= nc) {
        const float *b = B + j0 * ldb;
        for (int64_t k = 0; k < kfull; k += 8) {
          __m256 r[8];
          for (int t = 0; t < 8; t++) r[t] = _mm256_loadu_ps(b + t * ldb + k);
          transpose8(r);
          for (int t = 0; t < 8; t++) _mm256_store_ps(Bp + (k + t) * NR + q * 8, r[t]);
        }
      }
      for (int64_t kk = j0 + 8 <= nc ? kfull : 0; kk < kc; kk++)
        for (int64_t jj = 0; jj < 8; jj++)
          Bp[kk * NR + q * 8 + jj] = j0 + jj < nc ? B[(j0 + jj) * ldb + kk] : 0.0f;
    }
    Bp += kc * NR;
  }
}

/* ---- the 12x32 register block ------------------------------------------- */

#define ROW(i)                               \
  a = _mm512_set1_ps(ap[i]);                 \
  c##i##0 = _mm512_fmadd_ps(a, b0, c##i##0); \
  c##i##1 = _mm512_fmadd_ps(a, b1, c##i##1);

/* C[mr, nr] = beta * C + Ap-panel * Bp-panel over kc. */
static void kernel_12x32(int64_t kc, const float *restrict ap, const float *restrict bp, float *C,
                         int64_t ldc, int64_t mr, int64_t nr, float beta) {
  __m512 c00 = _mm512_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
  __m512 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  __m512 c60 = c00, c61 = c00, c70 = c00, c71 = c00, c80 = c00, c81 = c00;
  __m512 c90 = c00, c91 = c00, c100 = c00, c101 = c00, c110 = c00, c111 = c00;
  for (int64_t m = 0; m < mr; m++) _mm_prefetch((const char *)(C + m * ldc), _MM_HINT_T0);
#pragma GCC unroll 2
  for (int64_t k = 0; k < kc; k++) {
    __m512 b0 = _mm512_load_ps(bp), b1 = _mm512_load_ps(bp + 16), a;
    ROW(0) ROW(1) ROW(2) ROW(3) ROW(4) ROW(5) ROW(6) ROW(7) ROW(8) ROW(9) ROW(10) ROW(11) ap += MR;
    bp += NR;
  }
  __m512 acc[MR][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41},   {c50, c51},
                       {c60, c61}, {c70, c71}, {c80, c81}, {c90, c91}, {c100, c101}, {c110, c111}};
  __mmask16 m0 = mask16(nr), m1 = mask16(nr - 16);
  for (int64_t m = 0; m < mr; m++) {
    float *c = C + m * ldc;
    store16(c, acc[m][0], beta, m0);
    if (m1) store16(c + 16, acc[m][1], beta, m1);
  }
}
#undef ROW

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
          for (int64_t ir = 0; ir < mc; ir += MR)
            kernel_12x32(kc, Ap + (ir / MR) * kc * MR, bp, C + (ic + ir) * ldc + jc + jr, ldc,
                         min64(MR, mc - ir), min64(NR, nc - jr), bet);
        }
      }
    }
  }
}

/* ---- entry ----------------------------------------------------------------- */

static void gemm_avx512(int trans_b, int64_t M, int64_t N, int64_t K, const float *A, int64_t lda,
                        const float *B, int64_t ldb, float beta, float *C, int64_t ldc) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    for (int64_t i = 0; i < M; i++)
      for (int64_t j = 0; j < N; j++) C[i * ldc + j] = merge1(C[i * ldc + j], 0.0f, beta);
    return;
  }
  if (M <= DIRECT_MAX_M) { /* the AVX2 path's unpacked few-row products */
    sg__ops_avx2.gemm(trans_b, M, N, K, A, lda, B, ldb, beta, C, ldc);
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

/* Row-invariant products are the AVX2 path's (its few-row kernels, which
 * this path uses for few rows too): the same bits as a 1-row product. */
static void gemm_avx512_inv(int trans_b, int64_t M, int64_t N, int64_t K, const float *A,
                            int64_t lda, const float *B, int64_t ldb, float beta, float *C,
                            int64_t ldc) {
  sg__ops_avx2.gemm_inv(trans_b, M, N, K, A, lda, B, ldb, beta, C, ldc);
}

const sg_ops sg__ops_avx512 = {"avx512", gemm_avx512, gemm_avx512_inv, MR, NR};

#endif
