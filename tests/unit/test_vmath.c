/* test_vmath.c - every vmath function of every path this machine runs
 * (scalar reference, AVX2, NEON) against libm in double on a sweep of
 * ordinary, huge, tiny, subnormal, infinite and NaN inputs; fast paths also
 * against the reference; softmax rows summing to 1 and its special rows;
 * layer norm against double and against a case worked by hand. */
#include <float.h>
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
#include "../../daemon/kernels/vmath.h"

#define EPS (1.0 / (1 << 24)) /* half an ulp of 1.0f */
#define TINY 3e-45            /* two subnormal steps */

static uint64_t g_rng = 0x2545F4914F6CDD1Dull;
static double drand(void) { /* uniform in [0, 1) */
  g_rng = g_rng * 6364136223846793005ull + 1442695040888963407ull;
  return (double)(g_rng >> 11) / (double)(1ull << 53);
}

/* The input sweep: specials, a dense line over [-30, 30], +-10^k from
 * 1e-40 to 1e38, and random values; an odd count exercises ragged tails. */
static float *g_in;
static int64_t g_n;

static int setup(void **state) {
  (void)state;
  static const float special[] = {
      0.0f,    -0.0f,  1e-30f,  -1e-30f,  1e-8f,    -1e-8f,    FLT_MIN, -FLT_MIN, 1e-45f,
      -1e-45f, 0.5f,   -0.5f,   0.55f,    -0.55f,   0.35f,     -0.35f,  1.0f,     -1.0f,
      5.5f,    5.6f,   -15.0f,  -19.9f,   -20.0f,   -20.1f,    88.0f,   88.7f,    88.72f,
      88.8f,   89.0f,  100.0f,  -87.0f,   -87.5f,   -100.0f,   -103.0f, -104.0f,  -110.0f,
      1e30f,   -1e30f, FLT_MAX, -FLT_MAX, INFINITY, -INFINITY, NAN,     -NAN,     1.13f,
      -1.13f,  2.12f,  -2.12f,  0.3f,     -0.3f,    10.0f,     -10.0f,  11.0f,    -11.0f};
  int64_t ns = (int64_t)(sizeof special / sizeof special[0]);
  int64_t cap = ns + 4400 + 2 * 313 + 2001;
  g_in = tl_malloc((size_t)cap * sizeof(float));
  assert_non_null(g_in);
  int64_t n = 0;
  for (int64_t i = 0; i < ns; i++) g_in[n++] = special[i];
  for (int64_t i = 0; i < 4400; i++) g_in[n++] = (float)(-30.0 + 60.0 * i / 4399.0 + 1e-4);
  for (int64_t i = 0; i < 313; i++) {
    double e = -40.0 + 78.0 * i / 312.0;
    g_in[n++] = (float)pow(10.0, e);
    g_in[n++] = -(float)pow(10.0, e);
  }
  for (int64_t i = 0; i < 2001; i++) g_in[n++] = (float)((drand() - 0.5) * 12.0);
  g_n = n;
  assert_true(g_n % 8 != 0);
  return 0;
}

static int teardown(void **state) {
  (void)state;
  tl_free(g_in);
  return 0;
}

/* ---- elementwise: truth in double and a per-function tolerance --------- */

typedef enum { F_EXP, F_RELU, F_GELU, F_GELU_TANH, F_ELU, F_TANH, F_SIGMOID, F_COUNT } fkind;
static const char *g_fname[F_COUNT] = {"exp", "relu", "gelu",   "gelu_tanh",
                                       "elu", "tanh", "sigmoid"};

static double truth(fkind f, double x) {
  switch (f) {
    case F_EXP: return exp(x);
    case F_RELU: return x < 0 ? 0.0 : x;
    case F_GELU: return x == -INFINITY ? -0.0 : 0.5 * x * erfc(-x / sqrt(2.0));
    case F_GELU_TANH: {
      if (x == -INFINITY) return -0.0;
      double u = sqrt(2.0 / M_PI) * (x + 0.044715 * x * x * x);
      /* 0.5x(1 + tanh u) = x / (1 + exp(-2u)), which does not cancel */
      return x / (1.0 + exp(-2.0 * u));
    }
    case F_ELU: return x > 0 ? x : expm1(x);
    case F_TANH: return tanh(x);
    case F_SIGMOID: return 1.0 / (1.0 + exp(-x));
    default: return NAN;
  }
}

/* Allowed relative error. Float evaluation of gelu_tanh's inner u carries
 * a relative error of ~eps in u, which moves the result by ~2|u| eps: that
 * is the function's conditioning, not the kernel's error. */
static double rel_tol(fkind f, double x) {
  switch (f) {
    case F_EXP: return 4 * EPS;
    case F_RELU: return 0.0;
    case F_GELU: return 1e-6;
    case F_GELU_TANH: {
      /* d log(result) / du = 2 (1 - sigmoid(2u)) */
      double u = 0.7978845608 * (x + 0.044715 * x * x * x);
      double cond = u > 50.0 ? 0.0 : 2.0 * fabs(u) / (1.0 + exp(2.0 * u));
      return 8 * EPS * (1.0 + cond);
    }
    default: return 8 * EPS; /* elu, tanh, sigmoid */
  }
}

/* Absolute slack below FLT_MIN. The gelus multiply x (up to 20 in
 * magnitude where it matters) by a subnormal tail probability, which holds
 * only a few significant bits there. */
static double abs_tol(fkind f) {
  return f == F_GELU || f == F_GELU_TANH ? 1e-43 : TINY;
}

static void check_elem(fkind f, const char *path, float x, float got) {
  double want = truth(f, x);
  if (isnan(want)) {
    if (!isnan(got)) fail_msg("%s %s(%g) = %g, want NaN", path, g_fname[f], (double)x, (double)got);
    return;
  }
  /* A finite truth beyond FLT_MAX rounds to inf in float. */
  if (isinf((float)want) || isinf(got)) {
    if (got != (float)want)
      fail_msg("%s %s(%g) = %g, want %g", path, g_fname[f], (double)x, (double)got, want);
    return;
  }
  double tol = (want == 0.0 ? 0.0 : rel_tol(f, x) * fabs(want)) + abs_tol(f);
  if (!(fabs(got - want) <= tol))
    fail_msg("%s %s(%.9g) = %.9g, want %.9g (err %.3g, tol %.3g)", path, g_fname[f], (double)x,
             (double)got, want, fabs(got - want), tol);
}

typedef void (*map_fn)(float *, int64_t);

static map_fn op_of(const vm_ops *o, fkind f) {
  switch (f) {
    case F_EXP: return o->exp;
    case F_RELU: return o->relu;
    case F_GELU: return o->gelu;
    case F_GELU_TANH: return o->gelu_tanh;
    case F_ELU: return o->elu;
    case F_TANH: return o->tanh;
    default: return o->sigmoid;
  }
}

/* Runs fn over the sweep (also on a misaligned start and a short head) and
 * checks each element; returns the outputs (caller frees). */
static float *run_map(map_fn fn, fkind f, const char *path) {
  float *y = tl_malloc((size_t)(g_n + 1) * sizeof(float));
  assert_non_null(y);
  memcpy(y + 1, g_in, (size_t)g_n * sizeof(float));
  fn(y + 1, 3);       /* a head shorter than a vector */
  fn(y + 4, g_n - 3); /* the rest, from an unaligned address */
  for (int64_t i = 0; i < g_n; i++) check_elem(f, path, g_in[i], y[i + 1]);
  memmove(y, y + 1, (size_t)g_n * sizeof(float));
  return y;
}

/* The path's operations, or NULL after printing why it cannot run here
 * (tests/run.sh lists that line as the skip's reason). */
static const vm_ops *ops_or_skip(cpu_path p) {
  const vm_ops *o = vm_ops_for(p);
  const char *name = p == CPU_AVX2 ? "AVX2+FMA" : p == CPU_NEON ? "NEON" : "this";
  if (!o) {
    print_message("skip: the %s path is not compiled into this build\n", name);
    return NULL;
  }
  if ((p == CPU_AVX2 && !cpu_has_avx2_fma()) || (p == CPU_NEON && !cpu_has_neon())) {
    print_message("skip: this CPU has no %s\n", name);
    return NULL;
  }
  return o;
}

static void elementwise(cpu_path p) {
  const vm_ops *o = ops_or_skip(p);
  if (!o) skip();
  const vm_ops *ref = vm_ops_for(CPU_SCALAR);
  for (int f = 0; f < F_COUNT; f++) {
    float *got = run_map(op_of(o, (fkind)f), (fkind)f, o->name);
    float *want = run_map(op_of(ref, (fkind)f), (fkind)f, "ref");
    /* The fast path against the reference: both are within tol of the
     * truth, so within twice of each other; NaN exactly where the ref is. */
    for (int64_t i = 0; i < g_n; i++) {
      if (isnan(want[i]) != isnan(got[i]))
        fail_msg("%s %s(%g): %g vs ref %g", o->name, g_fname[f], (double)g_in[i], (double)got[i],
                 (double)want[i]);
      if (isnan(want[i]) || isinf(want[i])) continue;
      double tol = (want[i] == 0.0f ? 0.0 : 2 * rel_tol((fkind)f, g_in[i]) * fabs(want[i])) +
                   2 * abs_tol((fkind)f);
      if (!(fabs((double)got[i] - want[i]) <= tol))
        fail_msg("%s %s(%.9g) = %.9g vs ref %.9g", o->name, g_fname[f], (double)g_in[i],
                 (double)got[i], (double)want[i]);
    }
    tl_free(got);
    tl_free(want);
  }
}

static void test_elementwise_scalar(void **s) {
  (void)s;
  elementwise(CPU_SCALAR);
}
static void test_elementwise_avx2(void **s) {
  (void)s;
  elementwise(CPU_AVX2);
}
static void test_elementwise_neon(void **s) {
  (void)s;
  elementwise(CPU_NEON);
}

/* The dispatched entry points give what their path's table gives. */
static void test_dispatched(void **s) {
  (void)s;
  const vm_ops *o = vm_ops_active();
  assert_non_null(o);
  map_fn d[F_COUNT] = {vm_exp, vm_relu, vm_gelu, vm_gelu_tanh, vm_elu, vm_tanh, vm_sigmoid};
  float a[37], b[37];
  for (int f = 0; f < F_COUNT; f++) {
    for (int i = 0; i < 37; i++) a[i] = b[i] = (float)(i - 18) * 0.37f;
    d[f](a, 37);
    op_of(o, (fkind)f)(b, 37);
    assert_memory_equal(a, b, sizeof a);
  }
}

/* relu and friends by hand, independent of libm. */
static void test_hand_values(void **s) {
  (void)s;
  for (int p = 0; p < 3; p++) {
    const vm_ops *o = ops_or_skip((cpu_path)p);
    if (!o) continue;
    float r[4] = {-2.0f, -0.0f, 3.5f, NAN};
    o->relu(r, 4);
    assert_true(r[0] == 0.0f && r[1] == 0.0f && r[2] == 3.5f && isnan(r[3]));
    float e[3] = {0.0f, -INFINITY, INFINITY};
    o->elu(e, 3);
    assert_true(e[0] == 0.0f && e[1] == -1.0f && e[2] == INFINITY);
    float t[3] = {0.0f, -INFINITY, INFINITY};
    o->tanh(t, 3);
    assert_true(t[0] == 0.0f && t[1] == -1.0f && t[2] == 1.0f);
    float g[3] = {0.0f, -INFINITY, INFINITY};
    o->gelu(g, 3);
    assert_true(g[0] == 0.0f && g[1] == 0.0f && g[2] == INFINITY);
    float sg[3] = {0.0f, -INFINITY, INFINITY};
    o->sigmoid(sg, 3);
    assert_true(sg[0] == 0.5f && sg[1] == 0.0f && sg[2] == 1.0f);
    float ex[3] = {0.0f, -INFINITY, INFINITY};
    o->exp(ex, 3);
    assert_true(ex[0] == 1.0f && ex[1] == 0.0f && ex[2] == INFINITY);
  }
}

/* ---- rows ------------------------------------------------------------------ */

static const int64_t g_cols[] = {1, 7, 8, 9, 33, 768};

static void softmax_path(cpu_path p) {
  const vm_ops *o = ops_or_skip(p);
  if (!o) skip();
  for (size_t c = 0; c < sizeof g_cols / sizeof g_cols[0]; c++) {
    int64_t cols = g_cols[c], rows = 5;
    float *x = tl_malloc((size_t)(rows * cols) * sizeof(float));
    float *l = tl_malloc((size_t)(rows * cols) * sizeof(float));
    assert_non_null(x);
    assert_non_null(l);
    for (int64_t i = 0; i < rows * cols; i++)
      x[i] = (float)((drand() - 0.5) * 20.0 + (i / cols == 3 ? 1000.0 : 0.0));
    memcpy(l, x, (size_t)(rows * cols) * sizeof(float));
    float *x0 = tl_malloc((size_t)(rows * cols) * sizeof(float));
    assert_non_null(x0);
    memcpy(x0, x, (size_t)(rows * cols) * sizeof(float));
    o->softmax_rows(x, rows, cols);
    o->log_softmax_rows(l, rows, cols);
    for (int64_t r = 0; r < rows; r++) {
      const float *in = x0 + r * cols;
      double m = -INFINITY, s = 0.0, sum = 0.0;
      for (int64_t j = 0; j < cols; j++) m = in[j] > m ? in[j] : m;
      for (int64_t j = 0; j < cols; j++) s += exp((double)in[j] - m);
      for (int64_t j = 0; j < cols; j++) {
        double want = exp((double)in[j] - m) / s, lwant = (double)in[j] - m - log(s);
        double got = x[r * cols + j], lgot = l[r * cols + j];
        /* exp amplifies the rounding of in - max by |in - max| */
        if (!(fabs(got - want) <= 8 * EPS * (1.0 + fabs((double)in[j] - m)) * want + TINY))
          fail_msg("%s softmax cols=%lld [%lld,%lld] = %.9g, want %.9g", o->name, (long long)cols,
                   (long long)r, (long long)j, got, want);
        if (!(fabs(lgot - lwant) <= 8 * EPS * (fabs((double)in[j] - m) + log(s) + 1.0)))
          fail_msg("%s log_softmax cols=%lld [%lld,%lld] = %.9g, want %.9g", o->name,
                   (long long)cols, (long long)r, (long long)j, lgot, lwant);
        sum += got;
      }
      if (!(fabs(sum - 1.0) <= 1e-6)) fail_msg("%s softmax row sums to %.9g", o->name, sum);
    }
    tl_free(x);
    tl_free(l);
    tl_free(x0);
  }
  /* Special rows: a -inf entry is 0 (log -inf); NaN, +inf or all -inf
   * make the row NaN. */
  float a[9] = {1, -INFINITY, 1, 2, 3, 4, 5, 6, 7};
  o->softmax_rows(a, 1, 9);
  assert_true(a[1] == 0.0f && a[0] > 0.0f);
  float b[9] = {1, -INFINITY, 1, 2, 3, 4, 5, 6, 7};
  o->log_softmax_rows(b, 1, 9);
  assert_true(b[1] == -INFINITY && isfinite(b[0]));
  float bad[3][9] = {{1, 2, NAN, 4, 5, 6, 7, 8, 9},
                     {1, 2, 3, 4, 5, 6, 7, 8, INFINITY},
                     {-INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY,
                      -INFINITY, -INFINITY}};
  o->softmax_rows(&bad[0][0], 3, 9);
  for (int r = 0; r < 3; r++)
    for (int j = 0; j < 9; j++) assert_true(isnan(bad[r][j]));
  /* Two equal logits, by hand: 1/2 each, log 1/2. */
  float h[2] = {3.0f, 3.0f};
  o->softmax_rows(h, 1, 2);
  assert_true(h[0] == 0.5f && h[1] == 0.5f);
  float hl[2] = {3.0f, 3.0f};
  o->log_softmax_rows(hl, 1, 2);
  assert_true(fabsf(hl[0] + 0.69314718f) <= 1e-7f && fabsf(hl[1] + 0.69314718f) <= 1e-7f);
}

static void test_softmax_scalar(void **s) {
  (void)s;
  softmax_path(CPU_SCALAR);
}
static void test_softmax_avx2(void **s) {
  (void)s;
  softmax_path(CPU_AVX2);
}
static void test_softmax_neon(void **s) {
  (void)s;
  softmax_path(CPU_NEON);
}

static void layernorm_path(cpu_path p) {
  const vm_ops *o = ops_or_skip(p);
  if (!o) skip();
  /* By hand: mean 2.5, var 1.25, 1/sqrt(1.25) = 0.894427191. */
  const float x[4] = {1, 2, 3, 4}, g[4] = {1, 1, 2, 0.5f}, b[4] = {0, 1, 0, -1};
  const double want[4] = {-1.341640786, 0.552786405, 0.894427191, -0.329179607};
  float y[4];
  o->layernorm_rows(x, y, 1, 4, g, b, 0.0f);
  for (int j = 0; j < 4; j++) assert_true(fabs(y[j] - want[j]) <= 1e-6);
  for (size_t c = 0; c < sizeof g_cols / sizeof g_cols[0]; c++) {
    int64_t cols = g_cols[c], rows = 4;
    size_t n = (size_t)(rows * cols);
    float *in = tl_malloc(n * sizeof(float)), *out = tl_malloc(n * sizeof(float));
    float *gm = tl_malloc((size_t)cols * sizeof(float)),
          *bt = tl_malloc((size_t)cols * sizeof(float));
    assert_true(in && out && gm && bt);
    for (size_t i = 0; i < n; i++)
      in[i] = (float)(drand() * 4.0 - 2.0 + (i / (size_t)cols == 2 ? 1e4 : 0.0));
    for (int64_t j = 0; j < cols; j++)
      gm[j] = (float)(drand() + 0.5), bt[j] = (float)(drand() - 0.5);
    for (int affine = 0; affine < 2; affine++) {
      o->layernorm_rows(in, out, rows, cols, affine ? gm : NULL, affine ? bt : NULL, 1e-5f);
      for (int64_t r = 0; r < rows; r++) {
        const float *xr = in + r * cols;
        double mean = 0, var = 0;
        for (int64_t j = 0; j < cols; j++) mean += xr[j];
        mean /= (double)cols;
        for (int64_t j = 0; j < cols; j++) var += (xr[j] - mean) * (xr[j] - mean);
        var /= (double)cols;
        for (int64_t j = 0; j < cols; j++) {
          double z = (xr[j] - mean) / sqrt(var + 1e-5), w = affine ? z * gm[j] + bt[j] : z;
          /* (x - mean) in float carries the rounding of the mean, relative
           * to the row's spread: |mean| eps / sd. */
          double tol = 1e-5 * (fabs(w) + 1.0) +
                       4 * EPS * fabs(mean) / sqrt(var + 1e-5) * (affine ? fabs(gm[j]) : 1.0);
          if (!(fabs(out[r * cols + j] - w) <= tol))
            fail_msg("%s layernorm cols=%lld [%lld,%lld] = %.9g, want %.9g", o->name,
                     (long long)cols, (long long)r, (long long)j, (double)out[r * cols + j], w);
        }
      }
    }
    /* In place gives the same as out of place. */
    memcpy(out + 0, in, n * sizeof(float));
    float *sep = tl_malloc(n * sizeof(float));
    assert_non_null(sep);
    o->layernorm_rows(in, sep, rows, cols, gm, bt, 1e-5f);
    o->layernorm_rows(out, out, rows, cols, gm, bt, 1e-5f);
    assert_memory_equal(out, sep, n * sizeof(float));
    tl_free(sep);
    tl_free(in);
    tl_free(out);
    tl_free(gm);
    tl_free(bt);
  }
}

static void test_layernorm_scalar(void **s) {
  (void)s;
  layernorm_path(CPU_SCALAR);
}
static void test_layernorm_avx2(void **s) {
  (void)s;
  layernorm_path(CPU_AVX2);
}
static void test_layernorm_neon(void **s) {
  (void)s;
  layernorm_path(CPU_NEON);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_hand_values),      cmocka_unit_test(test_elementwise_scalar),
      cmocka_unit_test(test_elementwise_avx2), cmocka_unit_test(test_elementwise_neon),
      cmocka_unit_test(test_dispatched),       cmocka_unit_test(test_softmax_scalar),
      cmocka_unit_test(test_softmax_avx2),     cmocka_unit_test(test_softmax_neon),
      cmocka_unit_test(test_layernorm_scalar), cmocka_unit_test(test_layernorm_avx2),
      cmocka_unit_test(test_layernorm_neon),
  };
  printf("vmath: best path here is %s\n", cpu_path_name(cpu_best_path()));
  return cmocka_run_group_tests(tests, setup, teardown);
}
