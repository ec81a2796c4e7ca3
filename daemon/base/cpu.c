/* cpu.c - CPU feature detection (see cpu.h). */
#include "cpu.h"

#include <stdlib.h>
#include <string.h>

int cpu_has_avx2_fma(void) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return 0;
#endif
}

int cpu_has_avx512(void) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  return cpu_has_avx2_fma() && __builtin_cpu_supports("avx512f") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq");
#else
  return 0;
#endif
}

int cpu_has_neon(void) {
#if defined(__aarch64__)
  return 1; /* Advanced SIMD is mandatory on AArch64 */
#else
  return 0;
#endif
}

int cpu_runs(cpu_path p) {
  switch (p) {
    case CPU_SCALAR: return 1;
    case CPU_AVX2: return cpu_has_avx2_fma();
    case CPU_AVX512: return cpu_has_avx512();
    case CPU_NEON: return cpu_has_neon();
  }
  return 0;
}

cpu_path cpu_path_fallback(cpu_path p) {
  return p == CPU_AVX512 ? CPU_AVX2 : CPU_SCALAR;
}

cpu_path cpu_best_path(void) {
  static const struct {
    const char *name;
    cpu_path p;
  } forced[] = {
      {"scalar", CPU_SCALAR}, {"avx2", CPU_AVX2}, {"avx512", CPU_AVX512}, {"neon", CPU_NEON}};
  const char *s = getenv("TALLYD_SIMD");
  for (size_t i = 0; s && i < sizeof forced / sizeof forced[0]; i++)
    if (strcmp(s, forced[i].name) == 0 && cpu_runs(forced[i].p)) return forced[i].p;
  if (cpu_has_avx512()) return CPU_AVX512;
  if (cpu_has_avx2_fma()) return CPU_AVX2;
  if (cpu_has_neon()) return CPU_NEON;
  return CPU_SCALAR;
}

const char *cpu_path_name(cpu_path p) {
  switch (p) {
    case CPU_AVX2: return "avx2+fma";
    case CPU_AVX512: return "avx512";
    case CPU_NEON: return "neon";
    default: return "scalar";
  }
}
