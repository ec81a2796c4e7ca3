/* test_sgemm.c - every sgemm path against the scalar reference and against
 * a double-precision triple loop, on edge sizes, both layouts of B, beta 0
 * and 1, padded leading dimensions and NaN in C; sg_gemm over a real pool;
 * and a product worked out by hand. Padding of A and B is filled with NaN,
 * so a path that reads past a row's width poisons its answer; padding of C
 * holds a sentinel that must survive. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include "../../daemon/base/cpu.h"
#include "../../daemon/base/mem.h"
#include "../../daemon/base/pool.h"
#include "../../daemon/kernels/sgemm.h"

typedef void (*gemm_fn)(int, int64_t, int64_t, int64_t, const float *, int64_t, const float *,
                        int64_t, float, float *, int64_t);

static uint64_t g_rng = 0x9E3779B97F4A7C15ull;
static float frand(void) { /* uniform in [-1, 1) */
  g_rng = g_rng * 6364136223846793005ull + 1442695040888963407ull;
  return (float)((double)(g_rng >> 40) / (double)(1ull << 23) - 1.0);
}

#define C_SENTINEL 12345.0f

typedef struct prob {
  int trans_b;
  int64_t M, N, K, lda, ldb, ldc;
  float beta;
  float *A, *B, *C0; /* C0: C before the product */
  double *want;      /* exact-ish A*op(B) + beta*C0 */
  double *scale;     /* sum |a||b| + |beta c0|, for the error bound */
} prob;

static void prob_make(prob *p, int trans_b, int64_t M, int64_t N, int64_t K, int pad, float beta) {
  memset(p, 0, sizeof *p);
  p->trans_b = trans_b;
  p->M = M, p->N = N, p->K = K, p->beta = beta;
  p->lda = K + (pad ? 3 : 0);
  p->ldb = (trans_b ? K : N) + (pad ? 5 : 0);
  p->ldc = N + (pad ? 2 : 0);
  int64_t brows = trans_b ? N : K, bcols = trans_b ? K : N;
  p->A = tl_malloc((size_t)(M * p->lda + 1) * sizeof(float));
  p->B = tl_malloc((size_t)(brows * p->ldb + 1) * sizeof(float));
  p->C0 = tl_malloc((size_t)(M * p->ldc + 1) * sizeof(float));
  p->want = tl_malloc((size_t)(M * N + 1) * sizeof(double));
  p->scale = tl_malloc((size_t)(M * N + 1) * sizeof(double));
  assert_non_null(p->A);
  assert_non_null(p->B);
  assert_non_null(p->C0);
  assert_non_null(p->want);
  assert_non_null(p->scale);
  for (int64_t i = 0; i < M * p->lda; i++) p->A[i] = i % p->lda < K ? frand() : NAN;
  for (int64_t i = 0; i < brows * p->ldb; i++) p->B[i] = i % p->ldb < bcols ? frand() : NAN;
  for (int64_t i = 0; i < M * p->ldc; i++)
    p->C0[i] = i % p->ldc < N ? (beta == 0.0f ? NAN : frand()) : C_SENTINEL;
  for (int64_t i = 0; i < M; i++) {
    for (int64_t j = 0; j < N; j++) {
      double s = 0.0, a = 0.0;
      for (int64_t k = 0; k < K; k++) {
        double x = p->A[i * p->lda + k];
        double y = trans_b ? p->B[j * p->ldb + k] : p->B[k * p->ldb + j];
        s += x * y;
        a += fabs(x * y);
      }
      if (beta != 0.0f) {
        s += (double)beta * p->C0[i * p->ldc + j];
        a += fabs((double)beta * p->C0[i * p->ldc + j]);
      }
      p->want[i * N + j] = s;
      p->scale[i * N + j] = a;
    }
  }
}

static void prob_free(prob *p) {
  tl_free(p->A);
  tl_free(p->B);
  tl_free(p->C0);
  tl_free(p->want);
  tl_free(p->scale);
}

/* Checks C against the double answer within float rounding of a K-term sum,
 * and that C's padding is untouched. */
static void check_c(const prob *p, const float *C, const char *what) {
  double eps = 1.0 / (1 << 23);
  for (int64_t i = 0; i < p->M; i++) {
    for (int64_t j = 0; j < p->ldc; j++) {
      float got = C[i * p->ldc + j];
      if (j >= p->N) {
        if (got != C_SENTINEL)
          fail_msg("%s: C padding [%lld,%lld] overwritten", what, (long long)i, (long long)j);
        continue;
      }
      double want = p->want[i * p->N + j];
      double tol = 2.0 * (double)(p->K + 2) * eps * p->scale[i * p->N + j] + 1e-30;
      if (!(fabs(got - want) <= tol))
        fail_msg(
            "%s trans_b=%d M=%lld N=%lld K=%lld beta=%g: C[%lld,%lld]=%.9g want %.9g "
            "(tol %.3g)",
            what, p->trans_b, (long long)p->M, (long long)p->N, (long long)p->K, (double)p->beta,
            (long long)i, (long long)j, (double)got, want, tol);
    }
  }
}

/* Runs fn (or sg_gemm over pool when fn is NULL) on one problem and checks
 * it against the double answer and against sg_gemm_ref. */
static void run_one(gemm_fn fn, pool_t *pool, const char *what, int trans_b, int64_t M, int64_t N,
                    int64_t K, int pad, float beta) {
  prob p;
  prob_make(&p, trans_b, M, N, K, pad, beta);
  size_t cn = (size_t)(M * p.ldc + 1);
  float *C = tl_malloc(cn * sizeof(float)), *R = tl_malloc(cn * sizeof(float));
  assert_non_null(C);
  assert_non_null(R);
  memcpy(C, p.C0, cn * sizeof(float));
  memcpy(R, p.C0, cn * sizeof(float));
  if (fn)
    fn(trans_b, M, N, K, p.A, p.lda, p.B, p.ldb, beta, C, p.ldc);
  else
    sg_gemm(pool, trans_b, M, N, K, p.A, p.lda, p.B, p.ldb, beta, C, p.ldc);
  sg_gemm_ref(trans_b, M, N, K, p.A, p.lda, p.B, p.ldb, beta, R, p.ldc);
  check_c(&p, C, what);
  check_c(&p, R, "ref");
  /* Path vs reference: both are float sums of the same terms, so they may
   * differ only by the same rounding bound. */
  double eps = 1.0 / (1 << 23);
  for (int64_t i = 0; i < M; i++)
    for (int64_t j = 0; j < N; j++) {
      double tol = 4.0 * (double)(K + 2) * eps * p.scale[i * N + j] + 1e-30;
      if (!(fabs((double)C[i * p.ldc + j] - R[i * p.ldc + j]) <= tol))
        fail_msg("%s vs ref at [%lld,%lld]: %.9g vs %.9g", what, (long long)i, (long long)j,
                 (double)C[i * p.ldc + j], (double)R[i * p.ldc + j]);
    }
  tl_free(C);
  tl_free(R);
  prob_free(&p);
}

static const int64_t g_sizes[][3] = {
    {1, 1, 1},     {3, 3, 3},    {17, 17, 17}, {255, 256, 257}, {256, 257, 255}, {257, 255, 256},
    {1, 1000, 7},  {1000, 1, 7}, {7, 1, 1000}, {4, 100, 9},     {5, 33, 300},    {6, 16, 256},
    {12, 32, 512}, {7, 3100, 5}, {2, 70, 13},  {150, 20, 3},    {9, 67, 1},      {3, 5, 0},
};

static void sweep(gemm_fn fn, const char *what) {
  for (size_t s = 0; s < sizeof g_sizes / sizeof g_sizes[0]; s++)
    for (int tb = 0; tb < 2; tb++)
      for (int b = 0; b < 2; b++)
        for (int pad = 0; pad < 2; pad++) {
          /* The big cubes once padded is enough; they dominate the run time. */
          if (g_sizes[s][0] >= 255 && g_sizes[s][2] >= 255 && !pad) continue;
          run_one(fn, NULL, what, tb, g_sizes[s][0], g_sizes[s][1], g_sizes[s][2], pad, (float)b);
        }
}

static void test_ref_sweep(void **state) {
  (void)state;
  sweep(sg_gemm_ref, "ref");
}

/* Path p's table, or a skip when this build has none or the CPU cannot run it. */
static gemm_fn path_fn(cpu_path p) {
  const sg_ops *o = sg_ops_for(p);
  return o && cpu_runs(p) ? o->gemm : NULL;
}

static void test_avx2_sweep(void **state) {
  (void)state;
  if (!path_fn(CPU_AVX2)) {
    print_message("skip: this CPU has no AVX2+FMA\n");
    skip();
  }
  sweep(path_fn(CPU_AVX2), "avx2");
}

static void test_avx512_sweep(void **state) {
  (void)state;
  if (!path_fn(CPU_AVX512)) {
    print_message("skip: this CPU has no AVX-512 F/VL/BW/DQ (or this build no AVX-512 path)\n");
    skip();
  }
  sweep(path_fn(CPU_AVX512), "avx512");
  /* the 12x32 block's edges: one full block, one past it each way */
  static const int64_t edge[][3] = {{12, 32, 300}, {13, 33, 257}, {24, 64, 7}, {11, 31, 1}};
  for (size_t i = 0; i < sizeof edge / sizeof edge[0]; i++)
    for (int tb = 0; tb < 2; tb++)
      run_one(path_fn(CPU_AVX512), NULL, "avx512", tb, edge[i][0], edge[i][1], edge[i][2], 1,
              (float)tb);
}

static void test_neon_sweep(void **state) {
  (void)state;
  if (!path_fn(CPU_NEON)) {
    print_message("skip: no NEON here (an AArch64 path; this machine is not AArch64)\n");
    skip();
  }
  sweep(path_fn(CPU_NEON), "neon");
}

/* The active table is the best path's own or the nearest fallback's. */
static void test_active(void **state) {
  (void)state;
  const sg_ops *a = sg_ops_active();
  assert_non_null(a);
  cpu_path p = cpu_best_path();
  while (!sg_ops_for(p)) p = cpu_path_fallback(p);
  assert_ptr_equal(a, sg_ops_for(p));
  assert_non_null(sg_ops_for(CPU_SCALAR));
  assert_ptr_equal(sg_ops_for(CPU_SCALAR)->gemm, sg_gemm_ref);
}

static void test_dispatch_serial(void **state) {
  (void)state;
  run_one(NULL, NULL, "sg_gemm(NULL)", 1, 64, 96, 80, 1, 0.0f);
  run_one(NULL, NULL, "sg_gemm(NULL)", 0, 3, 7, 5, 1, 1.0f);
}

static void test_dispatch_pool(void **state) {
  (void)state;
  pool_t *pool = NULL;
  assert_int_equal(pool_create(&pool, 2, 16), 0);
  for (int tb = 0; tb < 2; tb++)
    for (int b = 0; b < 2; b++) {
      run_one(NULL, pool, "sg_gemm(pool) rows", tb, 300, 64, 100, 1, (float)b);
      run_one(NULL, pool, "sg_gemm(pool) cols", tb, 32, 768, 40, 1, (float)b);
      run_one(NULL, pool, "sg_gemm(pool) one row", tb, 1, 768, 400, 0, (float)b);
      run_one(NULL, pool, "sg_gemm(pool) ragged", tb, 97, 101, 103, 1, (float)b);
    }
  pool_destroy(pool);
}

/* [1 2 3; 4 5 6] * [7 8; 9 10; 11 12] = [58 64; 139 154], by hand. */
static void hand_case(gemm_fn fn, pool_t *pool) {
  const float A[6] = {1, 2, 3, 4, 5, 6};
  const float B[6] = {7, 8, 9, 10, 11, 12};
  const float Bt[6] = {7, 9, 11, 8, 10, 12};
  const float want[4] = {58, 64, 139, 154};
  for (int tb = 0; tb < 2; tb++) {
    float C[4] = {NAN, NAN, NAN, NAN};
    const float *b = tb ? Bt : B;
    int64_t ldb = tb ? 3 : 2;
    if (fn)
      fn(tb, 2, 2, 3, A, 3, b, ldb, 0.0f, C, 2);
    else
      sg_gemm(pool, tb, 2, 2, 3, A, 3, b, ldb, 0.0f, C, 2);
    for (int i = 0; i < 4; i++) assert_true(C[i] == want[i]);
    float D[4] = {1, -1, 0.5f, 2};
    if (fn)
      fn(tb, 2, 2, 3, A, 3, b, ldb, 1.0f, D, 2);
    else
      sg_gemm(pool, tb, 2, 2, 3, A, 3, b, ldb, 1.0f, D, 2);
    assert_true(D[0] == 59 && D[1] == 63 && D[2] == 139.5f && D[3] == 156);
  }
}

static void test_hand(void **state) {
  (void)state;
  hand_case(sg_gemm_ref, NULL);
  hand_case(NULL, NULL);
  for (cpu_path p = CPU_AVX2; p <= CPU_AVX512; p++)
    if (path_fn(p)) hand_case(path_fn(p), NULL);
}

static void test_add_bias(void **state) {
  (void)state;
  float C[2 * 4] = {1, 2, 3, 99, 4, 5, 6, 99}; /* 2x3 with ldc 4 */
  const float bias[3] = {10, 20, 30};
  sg_add_bias(2, 3, C, 4, bias);
  const float want[8] = {11, 22, 33, 99, 14, 25, 36, 99};
  for (int i = 0; i < 8; i++) assert_true(C[i] == want[i]);
}

/* A decode batch: up to 8 rows go through the few-row kernels, and each
 * row's result is the same bits whether it is computed alone or beside
 * others (so a sequence's tokens do not depend on what else decodes), on
 * one thread and on the pool, for both layouts of B and ragged widths. */
static void test_few_rows_batch_invariant(void **state) {
  (void)state;
  pool_t *pool = NULL;
  assert_int_equal(pool_create(&pool, 2, 16), 0);
  static const int64_t nk[][2] = {{2304, 768}, {1100, 37}, {50, 515}, {3, 9}};
  for (size_t s = 0; s < sizeof nk / sizeof nk[0]; s++)
    for (int tb = 0; tb < 2; tb++) {
      int64_t N = nk[s][0], K = nk[s][1];
      float *A = tl_malloc(sizeof(float) * (size_t)(8 * K));
      float *B = tl_malloc(sizeof(float) * (size_t)(N * K));
      float *C8 = tl_malloc(sizeof(float) * (size_t)(8 * N));
      float *C1 = tl_malloc(sizeof(float) * (size_t)N);
      assert_non_null(A);
      assert_non_null(B);
      assert_non_null(C8);
      assert_non_null(C1);
      for (int64_t i = 0; i < 8 * K; i++) A[i] = (float)((i * 7919 % 1000) - 500) / 300.0f;
      for (int64_t i = 0; i < N * K; i++) B[i] = (float)((i * 104729 % 997) - 498) / 400.0f;
      for (int M = 2; M <= 8; M += 3)
        for (int use_pool = 0; use_pool < 2; use_pool++) {
          pool_t *pl = use_pool ? pool : NULL;
          sg_gemm(pl, tb, M, N, K, A, K, B, tb ? K : N, 0.0f, C8, N);
          for (int m = 0; m < M; m++) {
            sg_gemm(pl, tb, 1, N, K, A + m * K, K, B, tb ? K : N, 0.0f, C1, N);
            if (memcmp(C1, C8 + m * N, sizeof(float) * (size_t)N) != 0)
              fail_msg("trans_b=%d N=%lld K=%lld: row %d of %d differs from the row alone", tb,
                       (long long)N, (long long)K, m, M);
          }
        }
      tl_free(A);
      tl_free(B);
      tl_free(C8);
      tl_free(C1);
    }
  pool_destroy(pool);
}

/* Row invariance (the dynamic batcher's): with sg_row_invariant on, row m
 * of a product of M rows is bit for bit the product of that row alone, for
 * every M (few rows and many, on one thread and on the pool), and every
 * path's gemm_inv agrees with the scalar reference. */
static void test_row_invariant(void **state) {
  (void)state;
  pool_t *pool = NULL;
  assert_int_equal(pool_create(&pool, 2, 16), 0);
  const int64_t N = 300, K = 1030, MAXM = 150;
  float *A = tl_malloc(sizeof(float) * (size_t)(MAXM * K));
  float *B = tl_malloc(sizeof(float) * (size_t)(N * K));
  float *CM = tl_malloc(sizeof(float) * (size_t)(MAXM * N));
  float *C1 = tl_malloc(sizeof(float) * (size_t)N);
  float *CR = tl_malloc(sizeof(float) * (size_t)(MAXM * N));
  assert_non_null(A);
  assert_non_null(B);
  assert_non_null(CM);
  assert_non_null(C1);
  assert_non_null(CR);
  for (int64_t i = 0; i < MAXM * K; i++) A[i] = (float)((i * 7919 % 1000) - 500) / 300.0f;
  for (int64_t i = 0; i < N * K; i++) B[i] = (float)((i * 104729 % 997) - 498) / 400.0f;
  assert_int_equal(sg_row_invariant(1), 0);
  static const int Ms[] = {2, 7, 9, 40, 150};
  for (int tb = 0; tb < 2; tb++)
    for (size_t mi = 0; mi < sizeof Ms / sizeof Ms[0]; mi++)
      for (int use_pool = 0; use_pool < 2; use_pool++) {
        int M = Ms[mi];
        pool_t *pl = use_pool ? pool : NULL;
        sg_gemm(pl, tb, M, N, K, A, K, B, tb ? K : N, 0.0f, CM, N);
        for (int m = 0; m < M; m += (M > 20 ? 13 : 1)) {
          sg_gemm(pl, tb, 1, N, K, A + m * K, K, B, tb ? K : N, 0.0f, C1, N);
          if (memcmp(C1, CM + m * N, sizeof(float) * (size_t)N) != 0)
            fail_msg("trans_b=%d: row %d of %d differs from the row alone", tb, m, M);
        }
      }
  assert_int_equal(sg_row_invariant(0), 1);
  for (int p = CPU_SCALAR; p <= CPU_AVX512; p++) {
    const sg_ops *ops = sg_ops_for((cpu_path)p);
    if (!ops || !cpu_runs((cpu_path)p)) continue;
    for (int tb = 0; tb < 2; tb++) {
      ops->gemm_inv(tb, 37, N, K, A, K, B, tb ? K : N, 0.0f, CM, N);
      sg_gemm_ref(tb, 37, N, K, A, K, B, tb ? K : N, 0.0f, CR, N);
      for (int64_t i = 0; i < 37 * N; i++)
        if (fabsf(CM[i] - CR[i]) > 1e-3f * (1.0f + fabsf(CR[i])))
          fail_msg("%s gemm_inv trans_b=%d element %lld: %g, reference %g", ops->name, tb,
                   (long long)i, CM[i], CR[i]);
    }
  }
  tl_free(A);
  tl_free(B);
  tl_free(CM);
  tl_free(C1);
  tl_free(CR);
  pool_destroy(pool);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_row_invariant),
      cmocka_unit_test(test_hand),
      cmocka_unit_test(test_add_bias),
      cmocka_unit_test(test_ref_sweep),
      cmocka_unit_test(test_avx2_sweep),
      cmocka_unit_test(test_avx512_sweep),
      cmocka_unit_test(test_active),
      cmocka_unit_test(test_neon_sweep),
      cmocka_unit_test(test_dispatch_serial),
      cmocka_unit_test(test_dispatch_pool),
      cmocka_unit_test(test_few_rows_batch_invariant),
  };
  printf("sgemm: best path here is %s\n", cpu_path_name(cpu_best_path()));
  return cmocka_run_group_tests(tests, NULL, NULL);
}
