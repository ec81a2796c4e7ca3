/* err.c - formatting of ts_err values (see err.h). */
#include "err.h"

#include <stdio.h>
#include <string.h>

int ts_verrf(ts_err *err, int status, const char *fmt, va_list ap) {
  if (status < 0) status = -status;
  if (err) {
    err->status = status;
    vsnprintf(err->msg, sizeof err->msg, fmt, ap);
  }
  return -status;
}

int ts_errf(ts_err *err, int status, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  int r = ts_verrf(err, status, fmt, ap);
  va_end(ap);
  return r;
}

void ts_err_prefix(ts_err *err, const char *fmt, ...) {
  if (!err) return;
  char pre[TS_ERR_MSG], old[TS_ERR_MSG];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(pre, sizeof pre, fmt, ap);
  va_end(ap);
  memcpy(old, err->msg, sizeof old);
  size_t n = strlen(pre);
  if (n > sizeof err->msg - 3) n = sizeof err->msg - 3;
  memcpy(err->msg, pre, n);
  memcpy(err->msg + n, ": ", 2);
  size_t m = strlen(old);
  if (m > sizeof err->msg - n - 3) m = sizeof err->msg - n - 3;
  memcpy(err->msg + n + 2, old, m);
  err->msg[n + 2 + m] = 0;
}

void ts_err_clear(ts_err *err) {
  if (!err) return;
  err->status = TS_OK;
  err->msg[0] = '\0';
}

/* the map's values are 0, 1, 2, ... in order: each designated slot is filled */
#define TS_STATUS_ONE(name, value, http, text) +1
_Static_assert(0 TS_STATUS_MAP(TS_STATUS_ONE) == TS_STATUS_COUNT, "TS_STATUS_MAP has gaps");
#undef TS_STATUS_ONE

const char *ts_status_name(int status) {
  static const char *const names[TS_STATUS_COUNT] = {
#define TS_STATUS_NAME(name, value, http, text) [value] = text,
      TS_STATUS_MAP(TS_STATUS_NAME)
#undef TS_STATUS_NAME
  };
  if (status < 0) status = -status;
  return status < TS_STATUS_COUNT ? names[status] : "unknown";
}

#ifdef TALLYD_DEBUG
#include <stdio.h>
#include <stdlib.h>

#include "check.h"

void ts_assert_fail(const char *expr, const char *file, int line) {
  fprintf(stderr, "tallyd: invariant failed at %s:%d: %s\n", file, line, expr);
  abort();
}
#endif
