/* err.h - errors as values for every tallyd module.
 *
 * Every fallible function returns 0 on success or a negative ts_status, and
 * fills a caller-owned ts_err with a message a user can act on, e.g.
 * "input 'features': expected shape [B, 12], got [4, 11]". The HTTP layer maps
 * a status to a response code in exactly one table (server/router.c). */
#ifndef TALLYD_ERR_H
#define TALLYD_ERR_H

#include <stdarg.h>

typedef enum ts_status {
  TS_OK = 0,
  TS_EINVAL = 1,     /* bad input: 400 */
  TS_EAUTH = 2,      /* missing/wrong credentials: 401 */
  TS_EFORBIDDEN = 3, /* credentials without scope: 403 */
  TS_ENOTFOUND = 4,  /* unknown model, version, session, route: 404 */
  TS_EMETHOD = 5,    /* wrong method: 405 */
  TS_ECONFLICT = 6,  /* e.g. a fit already running: 409 */
  TS_ETOOBIG = 7,    /* body or request memory over a cap: 413 */
  TS_EBUSY = 8,      /* queue full: 429 */
  TS_EINTERNAL = 9,  /* a bug: 500 */
  TS_EUNAVAIL = 10,  /* not ready, draining, model unavailable: 503 */
  TS_ETIMEOUT = 11,  /* deadline passed: 504 */
  TS_ENOMEM = 12,    /* allocation failed: 503 */
  TS_EIO = 13,       /* file system error: 500 */
  TS_STATUS_COUNT
} ts_status;

#define TS_ERR_MSG 512

typedef struct ts_err {
  int status;            /* a ts_status, TS_OK when nothing failed */
  char msg[TS_ERR_MSG];  /* NUL-terminated, never NULL */
} ts_err;

/* Fills err (when not NULL) and returns -status, so that callers write
 * `return ts_errf(err, TS_EINVAL, "input '%s': ...", name);`. */
int ts_errf(ts_err *err, int status, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
int ts_verrf(ts_err *err, int status, const char *fmt, va_list ap);
/* Prefixes an existing message: "member 'xc1': <old message>". */
void ts_err_prefix(ts_err *err, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
void ts_err_clear(ts_err *err);
const char *ts_status_name(int status);

#endif
