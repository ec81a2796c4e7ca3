/* sgemm.h - single-precision matrix product for every dense layer.
 *
 * Row-major. C[M,N] = A[M,K] * op(B) + beta * C, where op(B) = B [K,N] when
 * trans_b == 0 and B^T with B stored [N,K] when trans_b == 1 (the layout of
 * a torch Linear weight [out, in]). beta is 0 or 1 in practice; with beta 0
 * C is overwritten (its old contents, even NaN, are ignored).
 *
 * sg_gemm chooses the AVX-512, AVX2+FMA, NEON or scalar path at run time
 * (cpu.h: the path's sg_ops table, falling back down cpu_path_fallback) and
 * splits large products over the pool (pool.h; NULL = serial).
 * sg_gemm_ref is the plain scalar reference the tests trust. */
#ifndef TALLYD_SGEMM_H
#define TALLYD_SGEMM_H

#include <stddef.h>
#include <stdint.h>

#include "../base/cpu.h"
#include "../base/pool.h"

void sg_gemm(pool_t *pool, int trans_b, int64_t M, int64_t N, int64_t K, const float *A,
             int64_t lda, const float *B, int64_t ldb, float beta, float *C, int64_t ldc);

/* The scalar reference (single-threaded, same contract). */
void sg_gemm_ref(int trans_b, int64_t M, int64_t N, int64_t K, const float *A, int64_t lda,
                 const float *B, int64_t ldb, float beta, float *C, int64_t ldc);

typedef void (*sg_fn)(int trans_b, int64_t M, int64_t N, int64_t K, const float *A, int64_t lda,
                      const float *B, int64_t ldb, float beta, float *C, int64_t ldc);

/* One path's single-threaded product, so that tests and benchmarks can run
 * a path that is not the best one. */
typedef struct sg_ops {
  const char *name;
  sg_fn gemm;
  /* The same product with each element of C summed in one order whatever
   * M is (the few-row kernels, a few rows at a time), so a row's result
   * does not depend on the rows beside it and equals a 1-row product's
   * (sg_row_invariant). */
  sg_fn gemm_inv;
  int mr, nr; /* its register block: the pool splits rows or columns in these units */
} sg_ops;

/* The table for path p, or NULL when this build has none for it. The caller
 * checks that the CPU runs it (cpu_runs). */
const sg_ops *sg_ops_for(cpu_path p);
/* The table sg_gemm uses (cpu_best_path, then its fallbacks). */
const sg_ops *sg_ops_active(void);

/* Internal to the sgemm paths: this thread's packing buffer of at least
 * `floats` floats, 64-byte aligned, kept for the thread's life (so a product
 * allocates nothing once warm); NULL when it cannot be had. Valid until the
 * thread's next call. */
float *sg__pack_buffer(size_t floats);

/* Row invariance for the calling thread (on != 0): sg_gemm then gives
 * each row of C bit for bit the value it would have in a product of any
 * other number of rows (the dynamic batcher sets it, so that a request's
 * answer is the same alone and batched with others). Returns the previous
 * setting. */
int sg_row_invariant(int on);

/* Adds bias[N] to every row of C[M,N] (ldc). */
void sg_add_bias(int64_t M, int64_t N, float *C, int64_t ldc, const float *bias);

#endif
