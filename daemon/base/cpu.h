/* cpu.h - run-time CPU feature detection for choosing SIMD kernels.
 *
 * The shipped build is never compiled with -march=native: each SIMD path is
 * compiled for its own target and chosen here at run time. The environment
 * variable TALLYD_SIMD=scalar|avx2|avx512|neon forces a path (tests and
 * benchmarks use it to compare); a forced path this CPU cannot run is
 * ignored and the best one is used.
 *
 * Kernel modules dispatch one way: each has an ops table per path it
 * compiles (vm_ops, sg_ops, attn's kernel table) and an `*_ops_for(path)`
 * that returns NULL for a path it has no table for; the module's picker
 * walks cpu_path_fallback() from cpu_best_path() to the first table it has
 * (a module without an AVX-512 table runs its AVX2 one on an AVX-512 CPU). */
#ifndef TALLYD_CPU_H
#define TALLYD_CPU_H

typedef enum cpu_path { CPU_SCALAR = 0, CPU_AVX2 = 1, CPU_NEON = 2, CPU_AVX512 = 3 } cpu_path;

int cpu_has_avx2_fma(void);
/* AVX-512 F, VL, BW and DQ with AVX2+FMA (Zen 4, Ice Lake and later). */
int cpu_has_avx512(void);
int cpu_has_neon(void);
/* Whether this CPU runs path p. */
int cpu_runs(cpu_path p);
/* The next path down: AVX512 -> AVX2 -> scalar, NEON -> scalar; scalar
 * stays scalar. */
cpu_path cpu_path_fallback(cpu_path p);
/* The best path this CPU runs, honouring TALLYD_SIMD. */
cpu_path cpu_best_path(void);
const char *cpu_path_name(cpu_path p);

#endif
