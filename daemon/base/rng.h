/* rng.h - the small seeded generator every fit uses (splitmix64).
 *
 * Fits need reproducible shuffles, splits and dropout masks from a seed, not
 * cryptographic randomness (request and session ids use OpenSSL's
 * RAND_bytes). The state is a caller-owned uint64_t. The unit tests draw
 * their random inputs from it too. */
#ifndef TALLYD_RNG_H
#define TALLYD_RNG_H

#include <math.h>
#include <stdint.h>

static inline uint64_t rng_next(uint64_t *state) {
  uint64_t z = (*state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

/* Uniform in [0, 1) with 53 random bits. */
static inline double rng_unif01(uint64_t *state) {
  return (double)(rng_next(state) >> 11) * 0x1.0p-53;
}

/* Standard normal (Box-Muller, the cosine branch): two uniforms a draw. */
static inline double rng_normal(uint64_t *state) {
  double u = rng_unif01(state), v = rng_unif01(state);
  return sqrt(-2.0 * log(u + 1e-300)) * cos(6.283185307179586 * v);
}

/* Fisher-Yates; the index comes from the high half of a 64x64 product
 * (no modulo bias). */
static inline void rng_shuffle(int64_t *a, int64_t n, uint64_t *state) {
  for (int64_t i = n - 1; i > 0; i--) {
    int64_t j = (int64_t)(((unsigned __int128)rng_next(state) * (uint64_t)(i + 1)) >> 64);
    int64_t t = a[i];
    a[i] = a[j];
    a[j] = t;
  }
}

#endif
