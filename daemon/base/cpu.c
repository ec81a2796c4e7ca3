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

int cpu_has_neon(void) {
#if defined(__aarch64__)
  return 1; /* Advanced SIMD is mandatory on AArch64 */
#else
  return 0;
#endif
}

cpu_path cpu_best_path(void) {
  const char *s = getenv("TALLYD_SIMD");
  if (s && strcmp(s, "scalar") == 0) return CPU_SCALAR;
  if (cpu_has_avx2_fma()) return CPU_AVX2;
  if (cpu_has_neon()) return CPU_NEON;
  return CPU_SCALAR;
}

const char *cpu_path_name(cpu_path p) {
  switch (p) {
    case CPU_AVX2: return "avx2+fma";
    case CPU_NEON: return "neon";
    default: return "scalar";
  }
}
