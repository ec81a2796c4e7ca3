/* sgemm.c - the scalar reference product, bias add, and the dispatcher that
 * picks a SIMD path once and splits large products over the pool.
 *
 * The split hands each participant one contiguous slab (rows of C when
 * M > N, columns otherwise) and calls a single-threaded path on it. Each
 * slab packs its own panels, so we make exactly as many slabs as there are
 * threads: more, smaller slabs would repack the shared operand more often
 * than they gain in balance. */
#include "sgemm.h"

#include "../base/cpu.h"

typedef void (*sg_fn)(int trans_b, int64_t M, int64_t N, int64_t K, const float *A,
                      int64_t lda, const float *B, int64_t ldb, float beta, float *C,
                      int64_t ldc);

/* Products smaller than this many multiply-adds run on the caller alone:
 * handing work to another thread costs more than it saves. */
#define SG_PARALLEL_MIN ((int64_t)1 << 18)

void sg_gemm_ref(int trans_b, int64_t M, int64_t N, int64_t K, const float *A,
                 int64_t lda, const float *B, int64_t ldb, float beta, float *C,
                 int64_t ldc) {
  for (int64_t i = 0; i < M; i++) {
    for (int64_t j = 0; j < N; j++) {
      float acc = 0.0f;
      for (int64_t k = 0; k < K; k++) {
        float b = trans_b ? B[j * ldb + k] : B[k * ldb + j];
        acc += A[i * lda + k] * b;
      }
      float *c = &C[i * ldc + j];
      *c = beta == 0.0f ? acc : acc + beta * *c;
    }
  }
}

void sg_add_bias(int64_t M, int64_t N, float *C, int64_t ldc, const float *bias) {
  for (int64_t i = 0; i < M; i++) {
    float *c = C + i * ldc;
    for (int64_t j = 0; j < N; j++) c[j] += bias[j];
  }
}

/* Paths that this architecture does not compile fall back to the reference,
 * so every symbol in sgemm.h links everywhere; sg_gemm never selects them. */
#if !defined(__x86_64__)
void sg_gemm_avx2(int trans_b, int64_t M, int64_t N, int64_t K, const float *A,
                  int64_t lda, const float *B, int64_t ldb, float beta, float *C,
                  int64_t ldc) {
  sg_gemm_ref(trans_b, M, N, K, A, lda, B, ldb, beta, C, ldc);
}
#endif
#if !defined(__aarch64__)
void sg_gemm_neon(int trans_b, int64_t M, int64_t N, int64_t K, const float *A,
                  int64_t lda, const float *B, int64_t ldb, float beta, float *C,
                  int64_t ldc) {
  sg_gemm_ref(trans_b, M, N, K, A, lda, B, ldb, beta, C, ldc);
}
#endif

static sg_fn g_fn; /* chosen on first use; every thread computes the same */

static sg_fn sg_pick(void) {
  sg_fn f = __atomic_load_n(&g_fn, __ATOMIC_ACQUIRE);
  if (f) return f;
  switch (cpu_best_path()) {
    case CPU_AVX2: f = sg_gemm_avx2; break;
    case CPU_NEON: f = sg_gemm_neon; break;
    default: f = sg_gemm_ref; break;
  }
  __atomic_store_n(&g_fn, f, __ATOMIC_RELEASE);
  return f;
}

typedef struct sg_split {
  sg_fn fn;
  int trans_b, by_cols;
  int64_t M, N, K, lda, ldb, ldc, unit;
  const float *A, *B;
  float beta;
  float *C;
} sg_split;

static void sg_split_run(void *arg, int64_t b, int64_t e) {
  const sg_split *s = arg;
  if (s->by_cols) {
    int64_t j0 = b * s->unit, j1 = e * s->unit < s->N ? e * s->unit : s->N;
    const float *B = s->trans_b ? s->B + j0 * s->ldb : s->B + j0;
    s->fn(s->trans_b, s->M, j1 - j0, s->K, s->A, s->lda, B, s->ldb, s->beta, s->C + j0,
          s->ldc);
  } else {
    int64_t i0 = b * s->unit, i1 = e * s->unit < s->M ? e * s->unit : s->M;
    s->fn(s->trans_b, i1 - i0, s->N, s->K, s->A + i0 * s->lda, s->lda, s->B, s->ldb,
          s->beta, s->C + i0 * s->ldc, s->ldc);
  }
}

void sg_gemm(pool_t *pool, int trans_b, int64_t M, int64_t N, int64_t K,
             const float *A, int64_t lda, const float *B, int64_t ldb, float beta,
             float *C, int64_t ldc) {
  sg_fn fn = sg_pick();
  int nt = pool_threads(pool);
  if (M <= 0 || N <= 0) return;
  if (!pool || nt <= 1 || (double)M * (double)N * (double)K <= (double)SG_PARALLEL_MIN) {
    fn(trans_b, M, N, K, A, lda, B, ldb, beta, C, ldc);
    return;
  }
  sg_split s = {fn, trans_b, N >= M, M, N, K, lda, ldb, ldc, 0, A, B, beta, C};
  /* Units match the AVX2 register block (6 rows x 16 columns) so slab edges
   * do not create extra partial tiles. */
  s.unit = s.by_cols ? 16 : 6;
  int64_t units = ((s.by_cols ? N : M) + s.unit - 1) / s.unit;
  int64_t grain = (units + nt - 1) / nt;
  pool_parallel_for(pool, units, grain, sg_split_run, &s);
}
