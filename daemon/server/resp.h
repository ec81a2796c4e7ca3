/* resp.h - an HTTP answer as the server builds it, and the one map from
 * statuses to HTTP codes.
 *
 * A resp is what crosses from an endpoint (on the loop thread or a worker)
 * to the transport: status, body bytes, and the few headers an endpoint may
 * decide. It knows nothing of connections; http.c turns it into a
 * libmicrohttpd response. */
#ifndef TALLYD_RESP_H
#define TALLYD_RESP_H

#include <jansson.h>
#include <stddef.h>

#include "../base/err.h"

typedef struct resp {
  int status;
  char *body; /* tl_malloc'ed; owned */
  size_t len;
  size_t json_len;              /* binary extension: length of the JSON part, else 0 */
  const char *content_type;     /* static; NULL: application/json */
  int retry_after;              /* seconds; 0: no Retry-After */
  const char *allow;            /* static; the Allow header of a 405 */
  const char *content_encoding; /* static; the body's coding ("gzip"); NULL: identity */
  struct gstream *stream;       /* a body sent while produced (stream.h); body is then NULL */
} resp;

/* The HTTP code of a ts_status (negative or not), from err.h's
 * TS_STATUS_MAP; 500 for anything outside it. */
int http_status_of(int ts_status);

/* Each replaces what r held. Allocation failures leave a 503 with a fixed
 * body (or none), never a half-built answer. */
void resp_json(resp *r, int status, const json_t *j);
void resp_text(resp *r, int status, const char *json);
/* {"error": "<message>"} with the status's HTTP code; the message is made
 * ASCII ('?' for other bytes) so the body is always valid JSON. */
void resp_error(resp *r, const ts_err *err);
void resp_errorf(resp *r, int ts_status, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
void resp_free(resp *r);

#endif
