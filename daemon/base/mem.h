/* mem.h - the allocator every tallyd module uses.
 *
 * A thin wrapper over malloc with one hook: tests (and the fault-injection
 * suite) can make the N-th allocation from now fail, to prove that every
 * caller turns a NULL into an error value instead of a crash. */
#ifndef TALLYD_MEM_H
#define TALLYD_MEM_H

#include <stddef.h>

void *tl_malloc(size_t n);
void *tl_calloc(size_t count, size_t size); /* checks count*size overflow */
void *tl_realloc(void *p, size_t n);
char *tl_strdup(const char *s);
void tl_free(void *p);
/* The bytes the allocator holds for a block of n: n plus its header, rounded
 * up to its alignment (glibc: 8 bytes of header, 16-byte chunks, 32 at
 * least). For accounting that must match resident memory (KV-cache
 * sessions), not for anything that indexes memory. */
size_t tl_held(size_t n);

/* Fault injection: after `n` more successful allocations, every allocation
 * fails until tl_mem_fail_reset(). n < 0 disables. Also settable with the
 * environment variable TALLYD_FAIL_ALLOC_AFTER (read by tl_mem_init_env). */
void tl_mem_fail_after(long n);
void tl_mem_fail_reset(void);
void tl_mem_init_env(void);

#endif
