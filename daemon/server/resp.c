/* resp.c - answers and the status -> HTTP code map (see resp.h). */
#include "resp.h"
#include "stream.h"

#include <stdarg.h>
#include <string.h>

#include "../base/jtext.h"
#include "../base/mem.h"
#include "../base/sbuf.h"

int http_status_of(int st) {
  static const int codes[TS_STATUS_COUNT] = {
#define TS_STATUS_CODE(name, value, http, text) [value] = http,
      TS_STATUS_MAP(TS_STATUS_CODE)
#undef TS_STATUS_CODE
  };
  if (st < 0) st = -st;
  return st < TS_STATUS_COUNT ? codes[st] : 500;
}

void resp_free(resp *r) {
  tl_free(r->body);
  if (r->stream) stream_unref(r->stream);
  memset(r, 0, sizeof *r);
}

void resp_json(resp *r, int status, const json_t *j) {
  resp_free(r);
  r->status = status;
  r->body = j ? jtext_dumps(j, JT_COMPACT, NULL) : NULL;
  if (!r->body) {
    r->status = 503;
    r->body = tl_strdup("{\"error\":\"out of memory\"}");
  }
  r->len = r->body ? strlen(r->body) : 0;
}

void resp_text(resp *r, int status, const char *json) {
  resp_free(r);
  r->body = tl_strdup(json);
  r->status = r->body ? status : 503;
  r->len = r->body ? strlen(r->body) : 0;
}

void resp_error(resp *r, const ts_err *err) {
  resp_free(r);
  sbuf b;
  sbuf_init(&b);
  sbuf_adds(&b, "{\"error\":");
  /* the message may quote user input: keep it valid UTF-8 JSON */
  char clean[TS_ERR_MSG];
  size_t k = 0;
  for (const unsigned char *p = (const unsigned char *)err->msg; *p && k + 1 < sizeof clean; p++)
    clean[k++] = *p < 0x80 ? (char)*p : '?';
  clean[k] = 0;
  sbuf_json_str(&b, clean[0] ? clean : ts_status_name(err->status));
  sbuf_adds(&b, "}");
  r->status = http_status_of(err->status ? err->status : TS_EINTERNAL);
  r->body = sbuf_take(&b, &r->len);
  if (!r->body) r->len = 0;
}

void resp_errorf(resp *r, int ts_status, const char *fmt, ...) {
  ts_err e;
  va_list ap;
  va_start(ap, fmt);
  ts_verrf(&e, ts_status, fmt, ap);
  va_end(ap);
  resp_error(r, &e);
}
