/* mem.c - allocation with an injectable failure point (see mem.h). */
#include "mem.h"

#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static atomic_long fail_countdown = -1;

static int should_fail(void) {
  long v = atomic_load_explicit(&fail_countdown, memory_order_relaxed);
  if (v < 0) return 0;
  if (v == 0) return 1;
  atomic_fetch_sub(&fail_countdown, 1);
  return 0;
}

void *tl_malloc(size_t n) {
  if (should_fail()) return NULL;
  return malloc(n ? n : 1);
}

void *tl_calloc(size_t count, size_t size) {
  if (size && count > SIZE_MAX / size) return NULL;
  if (should_fail()) return NULL;
  return calloc(count ? count : 1, size ? size : 1);
}

void *tl_realloc(void *p, size_t n) {
  if (should_fail()) return NULL;
  return realloc(p, n ? n : 1);
}

char *tl_strdup(const char *s) {
  size_t n = strlen(s) + 1;
  char *d = tl_malloc(n);
  if (d) memcpy(d, s, n);
  return d;
}

void tl_free(void *p) {
  free(p);
}

size_t tl_held(size_t n) {
  size_t h = (n + sizeof(size_t) + 15) & ~(size_t)15;
  return h < 32 ? 32 : h;
}

void tl_mem_fail_after(long n) {
  atomic_store(&fail_countdown, n);
}
void tl_mem_fail_reset(void) {
  atomic_store(&fail_countdown, -1);
}

void tl_mem_init_env(void) {
  const char *s = getenv("TALLYD_FAIL_ALLOC_AFTER");
  if (s && *s) tl_mem_fail_after(strtol(s, NULL, 10));
}
