/* bench_attn.c - speed and memory of the attention kernels.
 *
 * For softmax, LSSA and LSSAR, causal and full masks, H heads of dimension d
 * (default 12 x 64) and L in {1024, 4096, 16384, 65536} (up to --max-len,
 * default 16384): seconds, GFLOP/s counted as 4 d per visible (query, key)
 * pair per head (the spec's yardstick), and the peak memory the call added
 * beyond its inputs and output (VmHWM, reset through /proc/self/clear_refs
 * before each run). Beside each, where its H x L x L float scores fit in
 * --naive-gib (default 4), a naive implementation that materialises the score
 * matrix (plain C, compiled like the rest of tallyd without -mavx2).
 *
 *   build/bench/bench_attn [--max-len N] [--min-len N] [--threads T] [--heads H]
 *                          [--dim D] [--variants softmax,lssa,lssar] [--masks causal,full]
 *                          [--no-naive] [--naive-gib G] [--cuda] [--no-cpu]
 *
 * --ratios R instead measures LSSA and LSSAR against softmax (causal, one
 * set of inputs per length, L = 4,096 and 16,384 unless --min-len/--max-len
 * say otherwise): R rounds, each running softmax, LSSA and LSSAR one after
 * the other so that the machine's load falls on all three alike, then the
 * median time of each and the ratios lssa/softmax and lssar/softmax.
 *
 * --cuda (builds with make CUDA=1 only) times attn_cuda_forward, copies to
 * and from the GPU included, and checks it against the CPU kernel; --no-cpu
 * leaves the CPU runs out (long lengths on the GPU alone). */
#include <malloc.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "../daemon/base/cpu.h"
#include "../daemon/base/pool.h"
#include "../daemon/kernels/attn.h"
#ifdef TALLYD_CUDA
#include "../daemon/kernels/attn_cuda.h"
#endif

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static long status_kib(const char *key) { /* a line of /proc/self/status, in KiB */
  FILE *f = fopen("/proc/self/status", "r");
  char line[256];
  long v = -1;
  size_t n = strlen(key);
  while (f && fgets(line, sizeof line, f))
    if (strncmp(line, key, n) == 0) v = atol(line + n);
  if (f) fclose(f);
  return v;
}

static int reset_peak(void) { /* VmHWM := VmRSS */
  FILE *f = fopen("/proc/self/clear_refs", "w");
  if (!f) return -1;
  int ok = fputs("5", f) >= 0;
  return fclose(f) == 0 && ok ? 0 : -1;
}

/* ---- the naive baseline: the whole H x L x L score matrix ----------------- */

typedef struct naive_job {
  const attn_params *prm;
  int H, d;
  int64_t L;
  const float *q, *k, *v;
  float *S, *out;
} naive_job;

static double softplus(double x) {
  return fmax(x, 0) + log1p(exp(-fabs(x)));
}

static void naive_rows(void *arg, int64_t b, int64_t e) {
  naive_job *J = arg;
  int d = J->d;
  int64_t L = J->L;
  for (int64_t it = b; it < e; it++) {
    int64_t h = it / L, i = it % L;
    const float *qi = J->q + (h * L + i) * d;
    float *s = J->S + (h * L + i) * L;
    int64_t n = J->prm->causal ? i + 1 : L;
    double N = (double)n, f = 1.0 / sqrt((double)d), qn = 0;
    if (J->prm->variant != ATTN_SOFTMAX) {
      for (int c = 0; c < d; c++) qn += qi[c] * qi[c];
      f = log((double)d) * log(N) / fmax(sqrt(qn), 1e-12);
    }
    for (int64_t j = 0; j < n; j++) {
      const float *kj = J->k + (h * L + j) * d;
      float dot = 0, kn = 0;
      for (int c = 0; c < d; c++) dot += qi[c] * kj[c], kn += kj[c] * kj[c];
      s[j] = (float)(f * dot / (J->prm->variant != ATTN_SOFTMAX ? fmax(sqrt(kn), 1e-12) : 1.0));
    }
    double m = -INFINITY, z = 0;
    for (int64_t j = 0; j < n; j++) m = s[j] > m ? s[j] : m;
    for (int64_t j = 0; j < n; j++)
      z += s[j] = (float)(J->prm->variant == ATTN_SOFTMAX ? exp(s[j] - m) : softplus(s[j]));
    double norm = J->prm->variant == ATTN_SOFTMAX ? z : z + 1e-8;
    if (J->prm->variant == ATTN_LSSAR) { /* guarded: x / x_max before the power */
      double o = i < J->prm->offset_rows ? 0 : 1, xm = 0, sb = 0;
      for (int64_t j = 0; j < n; j++) {
        s[j] = (float)fmax(N * s[j] / (z + 1e-8) - o, 0);
        xm = s[j] > xm ? s[j] : xm;
      }
      for (int64_t j = 0; j < n; j++) sb += s[j] = xm > 0 ? (float)pow(s[j] / xm, J->prm->p) : 0;
      norm = xm > 0 ? sb + exp(log(1e-8) - J->prm->p * log(xm)) : INFINITY;
    }
    float *o = J->out + (h * L + i) * d;
    for (int c = 0; c < d; c++) o[c] = 0;
    for (int64_t j = 0; j < n; j++) {
      const float *vj = J->v + (h * L + j) * d;
      for (int c = 0; c < d; c++) o[c] += s[j] * vj[c];
    }
    for (int c = 0; c < d; c++) o[c] = (float)(o[c] / norm);
  }
}

/* ---- driver -------------------------------------------------------------- */

static int has(const char *list, const char *name) {
  const char *p = list;
  size_t n = strlen(name);
  while ((p = strstr(p, name))) {
    if ((p == list || p[-1] == ',') && (p[n] == 0 || p[n] == ',')) return 1;
    p += n;
  }
  return 0;
}

static void usage(void) {
  fprintf(stderr,
          "usage: bench_attn [--max-len N] [--min-len N] [--threads T] [--heads H] [--dim D]\n"
          "                  [--variants softmax,lssa,lssar] [--masks causal,full]\n"
          "                  [--no-naive] [--naive-gib G] [--cuda] [--no-cpu] [--ratios R]\n");
  exit(2);
}

static int cmp_d(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return x < y ? -1 : x > y;
}

/* The --ratios mode (see the top of the file). */
static int ratios(pool_t *pool, int H, int d, int64_t min_len, int64_t max_len, int rounds) {
  static const int64_t lens[] = {4096, 16384};
  static const char *vnames[] = {"softmax", "lssa", "lssar"};
  if (rounds > 64) rounds = 64;
  printf("# causal attention, %d heads, d = %d, path %s: median of %d alternating rounds\n", H, d,
         cpu_path_name(cpu_best_path()), rounds);
  printf("# %6s %10s %10s %10s %12s %12s\n", "L", "softmax_s", "lssa_s", "lssar_s", "lssa/softmax",
         "lssar/softmax");
  for (size_t li = 0; li < sizeof lens / sizeof *lens; li++) {
    int64_t L = lens[li];
    if (L > max_len || L < min_len) continue;
    size_t n = (size_t)H * L * d;
    float *q = malloc(n * 4), *k = malloc(n * 4), *v = malloc(n * 4), *o = malloc(n * 4);
    if (!q || !k || !v || !o) return 1;
    srand(1);
    for (size_t i = 0; i < n; i++) {
      q[i] = (float)rand() / RAND_MAX * 2 - 1;
      k[i] = (float)rand() / RAND_MAX * 2 - 1;
      v[i] = (float)rand() / RAND_MAX * 2 - 1;
    }
    attn_tensor tq = {q, L * d, d}, tk = {k, L * d, d}, tv = {v, L * d, d};
    attn_out to = {o, L * d, d};
    double t[3][64];
    for (int r = 0; r < rounds; r++)
      for (int var = 0; var < 3; var++) {
        attn_params prm = attn_params_default((attn_variant)var);
        ts_err err;
        double t0 = now();
        if (attn_forward(pool, &prm, H, H, L, L, d, d, tq, tk, tv, to, &err) != 0) {
          fprintf(stderr, "bench_attn: %s %s\n", vnames[var], err.msg);
          return 1;
        }
        t[var][r] = now() - t0;
      }
    double med[3];
    for (int var = 0; var < 3; var++) {
      qsort(t[var], (size_t)rounds, sizeof(double), cmp_d);
      med[var] =
          rounds % 2 ? t[var][rounds / 2] : 0.5 * (t[var][rounds / 2 - 1] + t[var][rounds / 2]);
    }
    printf("  %6lld %10.4f %10.4f %10.4f %12.3f %12.3f\n", (long long)L, med[0], med[1], med[2],
           med[1] / med[0], med[2] / med[0]);
    fflush(stdout);
    free(q), free(k), free(v), free(o);
  }
  return 0;
}

int main(int argc, char **argv) {
  int64_t max_len = 16384, min_len = 1024;
  int threads = (int)sysconf(_SC_NPROCESSORS_ONLN), H = 12, d = 64, naive = 1, cuda = 0, cpu = 1;
  double naive_gib = 4.0;
  int n_ratio = 0;
  const char *variants = "softmax,lssa,lssar", *masks = "causal,full";
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i], *nx = i + 1 < argc ? argv[i + 1] : NULL;
    if (!strcmp(a, "--max-len") && nx)
      max_len = atoll(argv[++i]);
    else if (!strcmp(a, "--min-len") && nx)
      min_len = atoll(argv[++i]);
    else if (!strcmp(a, "--threads") && nx)
      threads = atoi(argv[++i]);
    else if (!strcmp(a, "--heads") && nx)
      H = atoi(argv[++i]);
    else if (!strcmp(a, "--dim") && nx)
      d = atoi(argv[++i]);
    else if (!strcmp(a, "--variants") && nx)
      variants = argv[++i];
    else if (!strcmp(a, "--masks") && nx)
      masks = argv[++i];
    else if (!strcmp(a, "--naive-gib") && nx)
      naive_gib = atof(argv[++i]);
    else if (!strcmp(a, "--no-naive"))
      naive = 0;
    else if (!strcmp(a, "--cuda"))
      cuda = 1;
    else if (!strcmp(a, "--no-cpu"))
      cpu = 0, naive = 0;
    else if (!strcmp(a, "--ratios") && nx)
      n_ratio = atoi(argv[++i]);
    else
      usage();
  }
#ifndef TALLYD_CUDA
  if (cuda) {
    fprintf(stderr, "bench_attn: --cuda needs a build with make CUDA=1\n");
    return 2;
  }
#else
  if (cuda && !attn_cuda_available()) {
    fprintf(stderr, "bench_attn: --cuda: no usable CUDA device\n");
    return 2;
  }
#endif
  pool_t *pool = NULL;
  if (threads > 1 && pool_create(&pool, threads, 0) != 0) {
    fprintf(stderr, "bench_attn: cannot start %d threads\n", threads);
    return 1;
  }
  if (n_ratio > 0) {
    int rc = ratios(pool, H, d, min_len < 4096 ? 4096 : min_len, max_len, n_ratio);
    pool_destroy(pool);
    return rc;
  }
  /* Big blocks always from mmap, returned on free: each run's peak then shows
   * what that run allocated, not what an earlier one left mapped. */
  mallopt(M_MMAP_THRESHOLD, 1 << 20);
  int can_peak = reset_peak() == 0;
  printf("# attention: %d heads, d = dv = %d, %d threads, path %s, float32%s\n", H, d, threads,
         cpu_path_name(cpu_best_path()), can_peak ? "" : " (no peak-memory reset: mem is -)");
  printf("# %-8s %-6s %6s  %-8s %9s %9s %10s %s\n", "variant", "mask", "L", "impl", "seconds",
         "GFLOP/s", "extra_MiB", "max|diff|");
  static const int64_t lens[] = {1024, 4096, 16384, 65536};
  static const char *vnames[] = {"softmax", "lssa", "lssar"};
  for (size_t li = 0; li < sizeof lens / sizeof *lens; li++) {
    int64_t L = lens[li];
    if (L > max_len || L < min_len) continue;
    size_t n = (size_t)H * L * d;
    float *q = malloc(n * 4), *k = malloc(n * 4), *v = malloc(n * 4), *o = malloc(n * 4),
          *o2 = malloc(n * 4);
    if (!q || !k || !v || !o || !o2) {
      fprintf(stderr, "bench_attn: no memory for L = %lld\n", (long long)L);
      return 1;
    }
    srand(1);
    for (size_t i = 0; i < n; i++) {
      q[i] = (float)rand() / RAND_MAX * 2 - 1;
      k[i] = (float)rand() / RAND_MAX * 2 - 1;
      v[i] = (float)rand() / RAND_MAX * 2 - 1;
      o[i] = o2[i] = 0;
    }
    attn_tensor tq = {q, L * d, d}, tk = {k, L * d, d}, tv = {v, L * d, d};
    attn_out to = {o, L * d, d};
#ifdef TALLYD_CUDA
    attn_out to2 = {o2, L * d, d};
#endif
    for (int var = 0; var < 3; var++) {
      if (!has(variants, vnames[var])) continue;
      for (int causal = 1; causal >= 0; causal--) {
        if (!has(masks, causal ? "causal" : "full")) continue;
        attn_params prm = attn_params_default((attn_variant)var);
        prm.causal = causal;
        double pairs = causal ? (double)L * (L + 1) / 2 : (double)L * L;
        double flop = 4.0 * d * pairs * H;
        ts_err err;
        /* repeat short runs to at least 0.3 s; keep the best */
        double best = INFINITY, spent = 0;
        long peak = 0;
        for (int rep = 0; cpu && rep < 20 && (rep == 0 || spent < 0.3); rep++) {
          long base = status_kib("VmRSS:");
          if (can_peak) reset_peak();
          double t0 = now();
          if (attn_forward(pool, &prm, H, H, L, L, d, d, tq, tk, tv, to, &err) != 0) {
            fprintf(stderr, "bench_attn: %s\n", err.msg);
            return 1;
          }
          double dt = now() - t0;
          spent += dt;
          if (dt < best) best = dt;
          long hwm = status_kib("VmHWM:");
          if (can_peak && hwm - base > peak) peak = hwm - base;
        }
        if (cpu)
          printf("  %-8s %-6s %6lld  %-8s %9.4f %9.1f %10.1f\n", vnames[var],
                 causal ? "causal" : "full", (long long)L, "tiled", best, flop / best * 1e-9,
                 can_peak ? peak / 1024.0 : -1.0);
        fflush(stdout);
        if (naive && (double)L * L * 4 * H <= naive_gib * (1 << 30)) {
          float *S = malloc((size_t)H * L * L * 4);
          if (!S) {
            printf("  %-8s %-6s %6lld  %-8s (no memory for the matrix)\n", vnames[var],
                   causal ? "causal" : "full", (long long)L, "naive");
          } else {
            long base = status_kib("VmRSS:");
            if (can_peak) reset_peak();
            naive_job J = {&prm, H, d, L, q, k, v, S, o2};
            double t0 = now();
            pool_parallel_for(pool, (int64_t)H * L, 16, naive_rows, &J);
            double dt = now() - t0;
            long hwm = status_kib("VmHWM:");
            free(S);
            double md = 0;
            for (size_t i = 0; i < n; i++) md = fmax(md, fabs(o[i] - o2[i]));
            printf("  %-8s %-6s %6lld  %-8s %9.4f %9.1f %10.1f %.2g\n", vnames[var],
                   causal ? "causal" : "full", (long long)L, "naive", dt, flop / dt * 1e-9,
                   can_peak ? (hwm - base) / 1024.0 : -1.0, md);
          }
          fflush(stdout);
        }
#ifdef TALLYD_CUDA
        if (cuda) {
          double cb = INFINITY;
          for (int rep = 0; rep < 3; rep++) {
            double t0 = now();
            if (attn_cuda_forward(&prm, H, H, L, L, d, d, tq, tk, tv, to2, &err) != 0) {
              fprintf(stderr, "bench_attn: cuda: %s\n", err.msg);
              return 1;
            }
            double dt = now() - t0;
            if (dt < cb) cb = dt;
          }
          double md = cpu ? 0 : NAN;
          for (size_t i = 0; cpu && i < n; i++) md = fmax(md, fabs(o[i] - o2[i]));
          printf("  %-8s %-6s %6lld  %-8s %9.4f %9.1f %10s %.2g\n", vnames[var],
                 causal ? "causal" : "full", (long long)L, "cuda", cb, flop / cb * 1e-9, "-", md);
          fflush(stdout);
        }
#endif
      }
    }
    free(q);
    free(k);
    free(v);
    free(o);
    free(o2);
  }
  if (pool) pool_destroy(pool);
  return 0;
}
