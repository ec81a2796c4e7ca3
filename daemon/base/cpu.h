/* cpu.h - run-time CPU feature detection for choosing SIMD kernels.
 *
 * The shipped build is never compiled with -march=native: each SIMD path is
 * compiled for its own target and chosen here at run time. The environment
 * variable TALLYD_SIMD=scalar forces the scalar reference path (tests and
 * benchmarks use it to compare). */
#ifndef TALLYD_CPU_H
#define TALLYD_CPU_H

typedef enum cpu_path { CPU_SCALAR = 0, CPU_AVX2 = 1, CPU_NEON = 2 } cpu_path;

int cpu_has_avx2_fma(void);
int cpu_has_neon(void);
/* The best path this CPU runs, honouring TALLYD_SIMD. */
cpu_path cpu_best_path(void);
const char *cpu_path_name(cpu_path p);

#endif
