/* check.h - invariants checked where they cannot cost anything in production:
 * debug and sanitizer builds define TALLYD_DEBUG (make SAN=1, make DEBUG=1)
 * and TS_ASSERT aborts with the expression, file and line when one fails;
 * other builds compile it away. Used for facts a caller must guarantee that
 * no test input can reach otherwise, such as "called with the repository
 * mutex held" (SQLite's habit with sqlite3_mutex_held). */
#ifndef TALLYD_CHECK_H
#define TALLYD_CHECK_H

#ifdef TALLYD_DEBUG
void ts_assert_fail(const char *expr, const char *file, int line) __attribute__((noreturn));
#define TS_ASSERT(c) ((c) ? (void)0 : ts_assert_fail(#c, __FILE__, __LINE__))
#else
#define TS_ASSERT(c) ((void)0)
#endif

#endif
