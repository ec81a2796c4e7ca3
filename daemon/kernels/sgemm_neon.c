/* sgemm_neon.c - the AArch64 NEON single-precision product (see sgemm.h).
 *
 * Kept deliberately plain so that it is obviously correct without an ARM
 * machine to test on: no packing, a 4x8 register block of C for trans_b 0
 * (B rows are contiguous in j) and a 4x4 block of dot products for
 * trans_b 1 (A and B rows are both contiguous in k), and a scalar loop for
 * every edge. With beta 0 the old C is never read. */
#if defined(__aarch64__)
#include <arm_neon.h>
#include <stdint.h>

#include "sgemm.h"

static inline float merge1(float c, float v, float beta) {
  return beta == 0.0f ? v : (beta == 1.0f ? c + v : beta * c + v);
}

/* The scalar edge: C[i0..i1, j0..j1) exactly as the reference does it. */
static void edge(int trans_b, int64_t i0, int64_t i1, int64_t j0, int64_t j1, int64_t K,
                 const float *A, int64_t lda, const float *B, int64_t ldb, float beta, float *C,
                 int64_t ldc) {
  for (int64_t i = i0; i < i1; i++) {
    for (int64_t j = j0; j < j1; j++) {
      float acc = 0.0f;
      for (int64_t k = 0; k < K; k++)
        acc += A[i * lda + k] * (trans_b ? B[j * ldb + k] : B[k * ldb + j]);
      C[i * ldc + j] = merge1(C[i * ldc + j], acc, beta);
    }
  }
}

/* C[i..i+4, j..j+8) for B stored [K, N]. */
static void block_4x8_n(int64_t K, const float *A, int64_t lda, const float *B, int64_t ldb,
                        float beta, float *C, int64_t ldc) {
  float32x4_t acc[4][2];
  for (int m = 0; m < 4; m++) acc[m][0] = acc[m][1] = vdupq_n_f32(0.0f);
  for (int64_t k = 0; k < K; k++) {
    float32x4_t b0 = vld1q_f32(B + k * ldb), b1 = vld1q_f32(B + k * ldb + 4);
    for (int m = 0; m < 4; m++) {
      float a = A[m * lda + k];
      acc[m][0] = vfmaq_n_f32(acc[m][0], b0, a);
      acc[m][1] = vfmaq_n_f32(acc[m][1], b1, a);
    }
  }
  for (int m = 0; m < 4; m++) {
    float tmp[8];
    vst1q_f32(tmp, acc[m][0]);
    vst1q_f32(tmp + 4, acc[m][1]);
    for (int j = 0; j < 8; j++) C[m * ldc + j] = merge1(C[m * ldc + j], tmp[j], beta);
  }
}

/* C[i..i+4, j..j+4) for B stored [N, K]: sixteen dot products over k. */
static void block_4x4_t(int64_t K, const float *A, int64_t lda, const float *B, int64_t ldb,
                        float beta, float *C, int64_t ldc) {
  float32x4_t acc[4][4];
  for (int m = 0; m < 4; m++)
    for (int n = 0; n < 4; n++) acc[m][n] = vdupq_n_f32(0.0f);
  int64_t kv = K & ~(int64_t)3;
  for (int64_t k = 0; k < kv; k += 4) {
    float32x4_t b[4];
    for (int n = 0; n < 4; n++) b[n] = vld1q_f32(B + n * ldb + k);
    for (int m = 0; m < 4; m++) {
      float32x4_t a = vld1q_f32(A + m * lda + k);
      for (int n = 0; n < 4; n++) acc[m][n] = vfmaq_f32(acc[m][n], a, b[n]);
    }
  }
  for (int m = 0; m < 4; m++) {
    for (int n = 0; n < 4; n++) {
      float s = vaddvq_f32(acc[m][n]);
      for (int64_t k = kv; k < K; k++) s += A[m * lda + k] * B[n * ldb + k];
      C[m * ldc + n] = merge1(C[m * ldc + n], s, beta);
    }
  }
}

static void gemm_neon(int trans_b, int64_t M, int64_t N, int64_t K, const float *A, int64_t lda,
                      const float *B, int64_t ldb, float beta, float *C, int64_t ldc) {
  if (M <= 0 || N <= 0) return;
  int64_t nb = trans_b ? 4 : 8; /* columns per block */
  int64_t M4 = M & ~(int64_t)3, Nb = N / nb * nb;
  for (int64_t i = 0; i < M4; i += 4) {
    for (int64_t j = 0; j < Nb; j += nb) {
      if (trans_b)
        block_4x4_t(K, A + i * lda, lda, B + j * ldb, ldb, beta, C + i * ldc + j, ldc);
      else
        block_4x8_n(K, A + i * lda, lda, B + j, ldb, beta, C + i * ldc + j, ldc);
    }
  }
  edge(trans_b, 0, M4, Nb, N, K, A, lda, B, ldb, beta, C, ldc); /* right strip */
  edge(trans_b, M4, M, 0, N, K, A, lda, B, ldb, beta, C, ldc);  /* bottom rows */
}

/* Row-invariant products go to the scalar reference: the 4-row blocks and
 * the edge loops here sum in different orders. */
const sg_ops sg__ops_neon = {"neon", gemm_neon, sg_gemm_ref, 4, 8};

#endif
