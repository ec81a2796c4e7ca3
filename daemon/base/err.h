/* err.h - errors as values for every tallyd module.
 *
 * Every fallible function returns 0 on success or a negative ts_status, and
 * fills a caller-owned ts_err with a message a user can act on, e.g.
 * "input 'features': expected shape [B, 12], got [4, 11]".
 *
 * TS_STATUS_MAP is the one list of statuses (as libuv's UV_ERRNO_MAP): it
 * yields the enum, the names (ts_status_name) and the HTTP code of each. Only
 * the server reads the code column (http_status_of, server/resp.c): no floor
 * below it maps statuses to HTTP. A new status is one line here. */
#ifndef TALLYD_ERR_H
#define TALLYD_ERR_H

#include <stdarg.h>

/* X(name, value, HTTP code, short name) */
#define TS_STATUS_MAP(X)                                                                  \
  X(OK, 0, 200, "ok")                                                                     \
  X(EINVAL, 1, 400, "invalid")       /* bad input */                                      \
  X(EAUTH, 2, 401, "unauthorized")   /* missing or wrong credentials */                   \
  X(EFORBIDDEN, 3, 403, "forbidden") /* credentials without the scope */                  \
  X(ENOTFOUND, 4, 404, "not found")  /* unknown model, version, session, route */         \
  X(EMETHOD, 5, 405, "method not allowed")                                                \
  X(ECONFLICT, 6, 409, "conflict")             /* e.g. a fit already running */           \
  X(ETOOBIG, 7, 413, "too large")              /* body or request memory over a cap */    \
  X(EBUSY, 8, 429, "busy")                     /* queue full */                           \
  X(EINTERNAL, 9, 500, "internal")             /* a bug */                                \
  X(EUNAVAIL, 10, 503, "unavailable")          /* not ready, draining, over a capacity */ \
  X(ETIMEOUT, 11, 504, "timeout")              /* deadline passed */                      \
  X(ENOMEM, 12, 503, "out of memory")          /* allocation failed */                    \
  X(EIO, 13, 500, "i/o error")                 /* file system error */                    \
  X(EMEDIA, 14, 415, "unsupported media type") /* e.g. an unknown Content-Encoding */

typedef enum ts_status {
#define TS_STATUS_ENUM(name, value, http, text) TS_##name = value,
  TS_STATUS_MAP(TS_STATUS_ENUM)
#undef TS_STATUS_ENUM
      TS_STATUS_COUNT
} ts_status;

#define TS_ERR_MSG 512

typedef struct ts_err {
  int status;           /* a ts_status, TS_OK when nothing failed */
  char msg[TS_ERR_MSG]; /* NUL-terminated, never NULL */
} ts_err;

/* Fills err (when not NULL) and returns -status, so that callers write
 * `return ts_errf(err, TS_EINVAL, "input '%s': ...", name);`. */
int ts_errf(ts_err *err, int status, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
int ts_verrf(ts_err *err, int status, const char *fmt, va_list ap);
/* Prefixes an existing message: "member 'xc1': <old message>". */
void ts_err_prefix(ts_err *err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void ts_err_clear(ts_err *err);
/* The short name of a status ("not found"); "unknown" outside the map. */
const char *ts_status_name(int status);

#endif
