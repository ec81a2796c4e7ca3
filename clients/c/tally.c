/* tally.c - the tallyd client library (see tally.h): requests over one
 * libcurl easy handle per client, bodies and answers as jansson values. */
#include "tally.h"

#include <curl/curl.h>
#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct tally_client {
  CURL *curl;
  char *url;  /* without a trailing slash */
  char *auth; /* "Authorization: Bearer ..." or NULL */
  long timeout_ms;
  int64_t binary_min; /* inputs of this many elements or more go as binary tensors */
};

/* Answers larger than this are refused: a client should not be made to hold
 * an unbounded body by a server it does not control. */
#define TALLY_MAX_ANSWER ((size_t)1 << 30)

static int fail(tally_error *err, int code, int http_status, const char *fmt, ...) {
  if (err) {
    err->code = code;
    err->http_status = http_status;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err->message, sizeof err->message, fmt, ap);
    va_end(ap);
  }
  return -code;
}

static pthread_once_t global_once = PTHREAD_ONCE_INIT;
static CURLcode global_rc;
static void global_init(void) {
  global_rc = curl_global_init(CURL_GLOBAL_DEFAULT);
}

static char *dup_str(const char *s) {
  size_t n = strlen(s) + 1;
  char *d = malloc(n);
  if (d) memcpy(d, s, n);
  return d;
}

int tally_client_new(tally_client **out, const char *url, const char *api_key, long timeout_ms,
                     tally_error *err) {
  *out = NULL;
  pthread_once(&global_once, global_init);
  if (global_rc != CURLE_OK) return fail(err, TALLY_ENOMEM, 0, "curl_global_init failed");
  if (!url || !*url) url = getenv("TALLY_URL");
  if (!url || !*url) url = TALLY_DEFAULT_URL;
  if (!api_key) api_key = getenv("TALLY_API_KEY");
  if (strncmp(url, "http://", 7) != 0 && strncmp(url, "https://", 8) != 0)
    return fail(err, TALLY_EUSAGE, 0, "url '%.200s' must start with http:// or https://", url);
  if (timeout_ms < 0) return fail(err, TALLY_EUSAGE, 0, "timeout must be >= 0");
  tally_client *c = calloc(1, sizeof *c);
  if (!c) return fail(err, TALLY_ENOMEM, 0, "out of memory");
  c->timeout_ms = timeout_ms;
  c->binary_min = TALLY_BINARY_MIN_DEFAULT;
  c->url = dup_str(url);
  c->curl = curl_easy_init();
  if (c->url) {
    size_t n = strlen(c->url);
    while (n > 0 && c->url[n - 1] == '/') c->url[--n] = 0;
  }
  if (api_key && *api_key) {
    if (strpbrk(api_key, "\r\n")) {
      tally_client_free(c);
      return fail(err, TALLY_EUSAGE, 0, "the API key holds a line break");
    }
    size_t n = strlen(api_key) + 32;
    c->auth = malloc(n);
    if (c->auth) snprintf(c->auth, n, "Authorization: Bearer %s", api_key);
  }
  if (!c->url || !c->curl || (api_key && *api_key && !c->auth)) {
    tally_client_free(c);
    return fail(err, TALLY_ENOMEM, 0, "out of memory");
  }
  *out = c;
  return 0;
}

void tally_client_free(tally_client *c) {
  if (!c) return;
  if (c->curl) curl_easy_cleanup(c->curl);
  free(c->url);
  free(c->auth);
  free(c);
}

const char *tally_client_url(const tally_client *c) {
  return c->url;
}

void tally_client_set_binary_min(tally_client *c, int64_t elements) {
  if (c) c->binary_min = elements;
}

/* ---- transport ---- */

typedef struct buf {
  char *p;
  size_t n, cap;
  int too_big;
  /* a streamed answer: each complete line goes to on_line and leaves the
   * buffer (what is left at the end is an error answer's body) */
  int (*on_line)(const char *line, size_t n, void *user);
  void *user;
  int stopped; /* on_line asked to stop */
} buf;

static size_t on_body(char *data, size_t size, size_t nmemb, void *ud) {
  buf *b = ud;
  size_t n = size * nmemb;
  if (b->n + n + 1 > TALLY_MAX_ANSWER) {
    b->too_big = 1;
    return 0; /* makes curl stop with CURLE_WRITE_ERROR */
  }
  if (b->n + n + 1 > b->cap) {
    size_t cap = b->cap ? b->cap : 4096;
    while (cap < b->n + n + 1) cap *= 2;
    char *p = realloc(b->p, cap);
    if (!p) return 0;
    b->p = p;
    b->cap = cap;
  }
  memcpy(b->p + b->n, data, n);
  b->n += n;
  b->p[b->n] = 0;
  if (b->on_line) {
    size_t start = 0;
    for (size_t i = 0; i < b->n; i++) {
      if (b->p[i] != '\n') continue;
      if (b->on_line(b->p + start, i - start, b->user)) {
        b->stopped = 1;
        return 0;
      }
      start = i + 1;
    }
    memmove(b->p, b->p + start, b->n - start);
    b->n -= start;
    b->p[b->n] = 0;
  }
  return n;
}

/* The message of an error answer: its "error" string, else the start of the
 * body, else the status line. */
static void error_message(tally_error *err, long status, const buf *b) {
  json_error_t je;
  json_t *j = b->n ? json_loadb(b->p, b->n, 0, &je) : NULL;
  json_t *e = j ? json_object_get(j, "error") : NULL;
  /* {"error": "..."}, or OpenAI's {"error": {"message": "..."}} on /v1 */
  const char *msg =
      json_is_object(e) ? json_string_value(json_object_get(e, "message")) : json_string_value(e);
  if (msg)
    fail(err, TALLY_EHTTP, (int)status, "%s", msg);
  else if (b->n)
    fail(err, TALLY_EHTTP, (int)status, "HTTP %ld: %.300s", status, b->p);
  else
    fail(err, TALLY_EHTTP, (int)status, "HTTP %ld", status);
  json_decref(j);
}

static int perform_raw(tally_client *c, const char *method, const char *path, json_t *body,
                       const char *raw, size_t raw_len, const char *accept, buf *b, long *status,
                       tally_error *err);

/* One exchange: the answer's body in *b (the caller frees b->p) and its
 * status; a status >= 400 is an error with the server's message. */
static int perform(tally_client *c, const char *method, const char *path, json_t *body,
                   const char *accept, buf *b, long *status, tally_error *err) {
  return perform_raw(c, method, path, body, NULL, 0, accept, b, status, err);
}

/* perform() with raw bytes after the JSON body: the binary tensor data
 * extension (Inference-Header-Content-Length says where the JSON ends). */
static int perform_raw(tally_client *c, const char *method, const char *path, json_t *body,
                       const char *raw, size_t raw_len, const char *accept, buf *b, long *status,
                       tally_error *err) {
  *status = 0;
  if (!c || !method || !path || path[0] != '/')
    return fail(err, TALLY_EUSAGE, 0, "bad request arguments");
  size_t ulen = strlen(c->url) + strlen(path) + 1;
  char *url = malloc(ulen);
  char *payload = body ? json_dumps(body, JSON_COMPACT) : NULL;
  size_t json_len = payload ? strlen(payload) : 0, payload_len = json_len;
  struct curl_slist *hdr = NULL, *h;
  int rc = 0;
  char accept_hdr[128], ihcl[96];
  snprintf(accept_hdr, sizeof accept_hdr, "Accept: %s", accept);
  if (!url || (body && !payload)) {
    rc = fail(err, TALLY_ENOMEM, 0, "out of memory");
    goto out;
  }
  if (raw_len) {
    char *p = realloc(payload, json_len + raw_len + 1);
    if (!p) {
      rc = fail(err, TALLY_ENOMEM, 0, "out of memory");
      goto out;
    }
    payload = p;
    memcpy(payload + json_len, raw, raw_len);
    payload_len = json_len + raw_len;
    snprintf(ihcl, sizeof ihcl, "Inference-Header-Content-Length: %zu", json_len);
    if ((h = curl_slist_append(hdr, ihcl))) hdr = h;
  }
  snprintf(url, ulen, "%s%s", c->url, path);
  if ((h = curl_slist_append(hdr, accept_hdr))) hdr = h;
  if (payload && (h = curl_slist_append(hdr, raw_len ? "Content-Type: application/octet-stream"
                                                     : "Content-Type: application/json")))
    hdr = h;
  /* without this, curl waits a second for "100 Continue" before a large body */
  if ((h = curl_slist_append(hdr, "Expect:"))) hdr = h;
  if (c->auth && (h = curl_slist_append(hdr, c->auth))) hdr = h;
  if (!hdr) {
    rc = fail(err, TALLY_ENOMEM, 0, "out of memory");
    goto out;
  }
  CURL *k = c->curl;
  curl_easy_reset(k); /* keeps the connection cache: keep-alive survives */
  curl_easy_setopt(k, CURLOPT_URL, url);
  curl_easy_setopt(k, CURLOPT_HTTPHEADER, hdr);
  curl_easy_setopt(k, CURLOPT_WRITEFUNCTION, on_body);
  curl_easy_setopt(k, CURLOPT_WRITEDATA, b);
  curl_easy_setopt(k, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(k, CURLOPT_TIMEOUT_MS, c->timeout_ms);
  curl_easy_setopt(k, CURLOPT_CONNECTTIMEOUT_MS, c->timeout_ms ? c->timeout_ms : 10000L);
  curl_easy_setopt(k, CURLOPT_USERAGENT, "libtally/" TALLY_CLIENT_VERSION);
  if (strcmp(method, "POST") == 0) {
    curl_easy_setopt(k, CURLOPT_POST, 1L);
    curl_easy_setopt(k, CURLOPT_POSTFIELDS, payload ? payload : "");
    curl_easy_setopt(k, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)payload_len);
  } else if (strcmp(method, "GET") != 0) {
    curl_easy_setopt(k, CURLOPT_CUSTOMREQUEST, method);
    if (payload) {
      curl_easy_setopt(k, CURLOPT_POSTFIELDS, payload);
      curl_easy_setopt(k, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)payload_len);
    }
  }
  CURLcode cc = curl_easy_perform(k);
  if (cc != CURLE_OK) {
    if (b->too_big)
      rc = fail(err, TALLY_EPROTO, 0, "the answer is larger than %zu bytes", TALLY_MAX_ANSWER);
    else if (b->stopped)
      rc = fail(err, TALLY_EPROTO, 0, "the stream was stopped (an event that is not JSON?)");
    else
      rc = fail(err, TALLY_ECONNECT, 0, "%s: %s", url, curl_easy_strerror(cc));
    goto out;
  }
  curl_easy_getinfo(k, CURLINFO_RESPONSE_CODE, status);
  if (*status >= 400) {
    error_message(err, *status, b);
    rc = -TALLY_EHTTP;
  }
out:
  curl_slist_free_all(hdr);
  free(url);
  free(payload);
  return rc;
}

int tally_request(tally_client *c, const char *method, const char *path, json_t *body,
                  json_t **answer, tally_error *err) {
  if (answer) *answer = NULL;
  buf b = {0};
  long status;
  int rc = perform(c, method, path, body, "application/json", &b, &status, err);
  if (!rc && answer) {
    json_error_t je;
    *answer = b.n ? json_loadb(b.p, b.n, 0, &je) : json_object();
    if (!*answer) rc = fail(err, TALLY_EPROTO, (int)status, "the answer is not JSON: %s", je.text);
  }
  free(b.p);
  return rc;
}

static int request_raw(tally_client *c, const char *path, json_t *body, const char *raw,
                       size_t raw_len, json_t **answer, tally_error *err) {
  if (answer) *answer = NULL;
  buf b = {0};
  long status;
  int rc = perform_raw(c, "POST", path, body, raw, raw_len, "application/json", &b, &status, err);
  if (!rc && answer) {
    json_error_t je;
    *answer = b.n ? json_loadb(b.p, b.n, 0, &je) : json_object();
    if (!*answer) rc = fail(err, TALLY_EPROTO, (int)status, "the answer is not JSON: %s", je.text);
  }
  free(b.p);
  return rc;
}

int tally_metrics(tally_client *c, char **text, size_t *len, tally_error *err) {
  *text = NULL;
  if (len) *len = 0;
  buf b = {0};
  long status;
  int rc = perform(c, "GET", "/metrics", NULL, "text/plain", &b, &status, err);
  if (rc) {
    free(b.p);
    return rc;
  }
  if (!b.p && !(b.p = calloc(1, 1))) return fail(err, TALLY_ENOMEM, 0, "out of memory");
  if (memchr(b.p, 0, b.n)) {
    free(b.p);
    return fail(err, TALLY_EPROTO, (int)status, "the metrics hold a NUL byte: not the text format");
  }
  *text = b.p;
  if (len) *len = b.n;
  return 0;
}

/* A path from printf-style pieces where every %s is a path segment, escaped. */
static int build_path(tally_client *c, char *out, size_t cap, tally_error *err, const char *fmt,
                      int nseg, ...) {
  char *esc[4] = {0};
  va_list ap;
  va_start(ap, nseg);
  int rc = 0;
  for (int i = 0; i < nseg && i < 4; i++) {
    const char *s = va_arg(ap, const char *);
    if (!s || !*s) {
      rc = fail(err, TALLY_EUSAGE, 0, "an empty model, version or session name");
      break;
    }
    esc[i] = curl_easy_escape(c->curl, s, 0);
    if (!esc[i]) {
      rc = fail(err, TALLY_ENOMEM, 0, "out of memory");
      break;
    }
  }
  va_end(ap);
  if (!rc) {
    int n = snprintf(out, cap, fmt, esc[0], esc[1], esc[2], esc[3]);
    if (n < 0 || (size_t)n >= cap) rc = fail(err, TALLY_EUSAGE, 0, "a name is too long");
  }
  for (int i = 0; i < 4; i++) curl_free(esc[i]);
  return rc;
}

#define PATH_CAP 1024

/* "/v2/models/M" or "/v2/models/M/versions/V", then suffix (not escaped). */
static int model_path(tally_client *c, char *out, const char *model, const char *version,
                      const char *suffix, tally_error *err) {
  int rc = version
               ? build_path(c, out, PATH_CAP, err, "/v2/models/%s/versions/%s", 2, model, version)
               : build_path(c, out, PATH_CAP, err, "/v2/models/%s", 1, model);
  if (rc) return rc;
  size_t n = strlen(out);
  if (n + strlen(suffix) >= PATH_CAP) return fail(err, TALLY_EUSAGE, 0, "a name is too long");
  memcpy(out + n, suffix, strlen(suffix) + 1);
  return 0;
}

/* ---- endpoints ---- */

int tally_health_live(tally_client *c, tally_error *err) {
  return tally_request(c, "GET", "/v2/health/live", NULL, NULL, err);
}

int tally_health_ready(tally_client *c, tally_error *err) {
  return tally_request(c, "GET", "/v2/health/ready", NULL, NULL, err);
}

int tally_server_metadata(tally_client *c, json_t **answer, tally_error *err) {
  return tally_request(c, "GET", "/v2", NULL, answer, err);
}

int tally_model_metadata(tally_client *c, const char *model, const char *version, json_t **answer,
                         tally_error *err) {
  char p[PATH_CAP];
  int rc = model_path(c, p, model, version, "", err);
  return rc ? rc : tally_request(c, "GET", p, NULL, answer, err);
}

int tally_model_ready(tally_client *c, const char *model, const char *version, tally_error *err) {
  char p[PATH_CAP];
  int rc = model_path(c, p, model, version, "/ready", err);
  return rc ? rc : tally_request(c, "GET", p, NULL, NULL, err);
}

int tally_repository_index(tally_client *c, json_t **answer, tally_error *err) {
  json_t *empty = json_object();
  int rc = tally_request(c, "POST", "/v2/repository/index", empty, answer, err);
  json_decref(empty);
  return rc;
}

static int repo_action(tally_client *c, const char *model, const char *what, tally_error *err) {
  char p[PATH_CAP];
  int rc = build_path(c, p, sizeof p, err, what, 1, model);
  if (rc) return rc;
  json_t *empty = json_object();
  rc = tally_request(c, "POST", p, empty, NULL, err);
  json_decref(empty);
  return rc;
}

int tally_load(tally_client *c, const char *model, tally_error *err) {
  return repo_action(c, model, "/v2/repository/models/%s/load", err);
}

int tally_unload(tally_client *c, const char *model, tally_error *err) {
  return repo_action(c, model, "/v2/repository/models/%s/unload", err);
}

/* {"parameters"?: params, "inputs": [...], "outputs"?: [{"name"}...]} */
/* The little-endian bytes of a tensor's data appended to *raw (grown with
 * realloc); on a big-endian host each element is byte-swapped. */
static int append_raw(const tally_tensor *t, char **raw, size_t *len, size_t *cap) {
  size_t es = tally_dtype_size(t->datatype);
  size_t nb = (size_t)tally_tensor_count(t) * es;
  if (*len + nb > *cap) {
    size_t nc = *cap ? *cap : 4096;
    while (nc < *len + nb) nc *= 2;
    char *p = realloc(*raw, nc);
    if (!p) return -1;
    *raw = p;
    *cap = nc;
  }
  memcpy(*raw + *len, t->data, nb);
  const uint16_t one = 1;
  if (*(const uint8_t *)&one == 0 && es > 1) /* big-endian: the wire is little-endian */
    for (size_t i = 0; i < nb; i += es)
      for (size_t a = 0, z = es - 1; a < z; a++, z--) {
        char x = (*raw)[*len + i + a];
        (*raw)[*len + i + a] = (*raw)[*len + i + z];
        (*raw)[*len + i + z] = x;
      }
  *len += nb;
  return 0;
}

static json_t *binary_entry(const tally_tensor *t, size_t nbytes) {
  json_t *shape = json_array();
  for (int d = 0; shape && d < t->ndim; d++)
    json_array_append_new(shape, json_integer(t->shape[d]));
  return json_pack("{s:s, s:s, s:o, s:{s:I}}", "name", t->name, "datatype",
                   tally_dtype_name(t->datatype), "shape", shape, "parameters", "binary_data_size",
                   (json_int_t)nbytes);
}

/* {"parameters"?: params, "inputs": [...], "outputs"?: [{"name"}...]}; inputs
 * of binary_min elements or more (binary_min >= 0) go as binary tensors whose
 * bytes are appended to *raw (NULL when none). */
static int request_body(const tally_tensor *inputs, size_t n, json_t *params,
                        const char *const *outputs, size_t n_outputs, int64_t binary_min,
                        json_t **out, char **raw, size_t *raw_len, tally_error *err) {
  size_t raw_cap = 0;
  *out = NULL;
  *raw = NULL;
  *raw_len = 0;
  if (params && !json_is_object(params))
    return fail(err, TALLY_EUSAGE, 0, "parameters must be a JSON object");
  if (n > 0 && !inputs) return fail(err, TALLY_EUSAGE, 0, "no input tensors");
  if (n_outputs > 0 && !outputs) return fail(err, TALLY_EUSAGE, 0, "no output names");
  for (size_t i = 0; i < n_outputs; i++)
    if (!outputs[i] || !*outputs[i]) return fail(err, TALLY_EUSAGE, 0, "an empty output name");
  json_t *body = json_object(), *arr = json_array();
  if (!body || !arr || json_object_set_new(body, "inputs", arr) ||
      (params && json_object_set(body, "parameters", params))) {
    json_decref(body);
    return fail(err, TALLY_ENOMEM, 0, "out of memory");
  }
  for (size_t i = 0; i < n; i++) {
    tally_error terr = {0};
    const tally_tensor *in = &inputs[i];
    if (binary_min >= 0 && in->name && in->data && tally_dtype_size(in->datatype) &&
        tally_tensor_count(in) >= binary_min && tally_tensor_count(in) > 0) {
      size_t before = *raw_len;
      json_t *t =
          append_raw(in, raw, raw_len, &raw_cap) ? NULL : binary_entry(in, *raw_len - before);
      if (!t || json_array_append_new(arr, t)) {
        json_decref(body);
        free(*raw);
        *raw = NULL;
        return fail(err, TALLY_ENOMEM, 0, "out of memory");
      }
      continue;
    }
    json_t *t = tally_tensor_to_json(in, &terr);
    if (!t || json_array_append_new(arr, t)) {
      json_decref(body);
      free(*raw);
      *raw = NULL;
      if (t) return fail(err, TALLY_ENOMEM, 0, "out of memory");
      if (err) *err = terr;
      return -terr.code;
    }
  }
  if (n_outputs) {
    json_t *outs = json_array();
    if (!outs || json_object_set_new(body, "outputs", outs)) {
      json_decref(body);
      free(*raw);
      *raw = NULL;
      return fail(err, TALLY_ENOMEM, 0, "out of memory");
    }
    for (size_t i = 0; i < n_outputs; i++)
      if (json_array_append_new(outs, json_pack("{s:s}", "name", outputs[i]))) {
        json_decref(body);
        free(*raw);
        *raw = NULL;
        return fail(err, TALLY_ENOMEM, 0, "out of memory");
      }
  }
  *out = body;
  return 0;
}

static int post_tensors(tally_client *c, const char *path, const tally_tensor *inputs, size_t n,
                        json_t *params, const char *const *outputs, size_t n_outputs,
                        json_t **answer, tally_error *err) {
  if (answer) *answer = NULL;
  json_t *body;
  char *raw;
  size_t raw_len;
  int rc = request_body(inputs, n, params, outputs, n_outputs, c ? c->binary_min : -1, &body, &raw,
                        &raw_len, err);
  if (rc) return rc;
  rc = raw_len ? request_raw(c, path, body, raw, raw_len, answer, err)
               : tally_request(c, "POST", path, body, answer, err);
  json_decref(body);
  free(raw);
  return rc;
}

int tally_infer_outputs(tally_client *c, const char *model, const char *version,
                        const tally_tensor *inputs, size_t n, json_t *params,
                        const char *const *outputs, size_t n_outputs, json_t **answer,
                        tally_error *err) {
  char p[PATH_CAP];
  int rc = model_path(c, p, model, version, "/infer", err);
  return rc ? rc : post_tensors(c, p, inputs, n, params, outputs, n_outputs, answer, err);
}

int tally_infer(tally_client *c, const char *model, const char *version, const tally_tensor *inputs,
                size_t n, json_t *params, json_t **answer, tally_error *err) {
  return tally_infer_outputs(c, model, version, inputs, n, params, NULL, 0, answer, err);
}

int tally_fit(tally_client *c, const char *model, const tally_tensor *inputs, size_t n,
              json_t *params, json_t **answer, tally_error *err) {
  char p[PATH_CAP];
  int rc = model_path(c, p, model, NULL, "/fit", err);
  return rc ? rc : post_tensors(c, p, inputs, n, params, NULL, 0, answer, err);
}

int tally_evaluate(tally_client *c, const char *model, const char *version,
                   const tally_tensor *inputs, size_t n, json_t *params, json_t **answer,
                   tally_error *err) {
  char p[PATH_CAP];
  int rc = model_path(c, p, model, version, "/evaluate", err);
  return rc ? rc : post_tensors(c, p, inputs, n, params, NULL, 0, answer, err);
}

int tally_calibrate(tally_client *c, const char *model, const tally_tensor *inputs, size_t n,
                    json_t *params, json_t **answer, tally_error *err) {
  char p[PATH_CAP];
  int rc = model_path(c, p, model, NULL, "/calibrate", err);
  return rc ? rc : post_tensors(c, p, inputs, n, params, NULL, 0, answer, err);
}

int tally_session_create(tally_client *c, const char *model, json_t *params, json_t **answer,
                         tally_error *err) {
  char p[PATH_CAP];
  int rc = model_path(c, p, model, NULL, "/sessions", err);
  if (rc) return rc;
  if (params && !json_is_object(params))
    return fail(err, TALLY_EUSAGE, 0, "parameters must be a JSON object");
  json_t *body = json_object();
  if (!body || (params && json_object_set(body, "parameters", params))) {
    json_decref(body);
    return fail(err, TALLY_ENOMEM, 0, "out of memory");
  }
  rc = tally_request(c, "POST", p, body, answer, err);
  json_decref(body);
  return rc;
}

int tally_session_infer_outputs(tally_client *c, const char *model, const char *session,
                                const tally_tensor *inputs, size_t n, json_t *params,
                                const char *const *outputs, size_t n_outputs, json_t **answer,
                                tally_error *err) {
  char p[PATH_CAP];
  int rc = build_path(c, p, sizeof p, err, "/v2/models/%s/sessions/%s/infer", 2, model, session);
  return rc ? rc : post_tensors(c, p, inputs, n, params, outputs, n_outputs, answer, err);
}

int tally_session_infer(tally_client *c, const char *model, const char *session,
                        const tally_tensor *inputs, size_t n, json_t *params, json_t **answer,
                        tally_error *err) {
  return tally_session_infer_outputs(c, model, session, inputs, n, params, NULL, 0, answer, err);
}

int tally_session_get(tally_client *c, const char *model, const char *session, json_t **answer,
                      tally_error *err) {
  char p[PATH_CAP];
  int rc = build_path(c, p, sizeof p, err, "/v2/models/%s/sessions/%s", 2, model, session);
  return rc ? rc : tally_request(c, "GET", p, NULL, answer, err);
}

int tally_session_delete(tally_client *c, const char *model, const char *session,
                         tally_error *err) {
  char p[PATH_CAP];
  int rc = build_path(c, p, sizeof p, err, "/v2/models/%s/sessions/%s", 2, model, session);
  return rc ? rc : tally_request(c, "DELETE", p, NULL, NULL, err);
}

/* ---- tensors ---- */

static const struct {
  const char *name;
  size_t size;
} dtypes[TALLY_DTYPE_COUNT] = {
    [TALLY_BOOL] = {"BOOL", 1},     [TALLY_UINT8] = {"UINT8", 1},   [TALLY_UINT16] = {"UINT16", 2},
    [TALLY_UINT32] = {"UINT32", 4}, [TALLY_UINT64] = {"UINT64", 8}, [TALLY_INT8] = {"INT8", 1},
    [TALLY_INT16] = {"INT16", 2},   [TALLY_INT32] = {"INT32", 4},   [TALLY_INT64] = {"INT64", 8},
    [TALLY_FP32] = {"FP32", 4},     [TALLY_FP64] = {"FP64", 8},
};

const char *tally_dtype_name(tally_dtype t) {
  return (unsigned)t < TALLY_DTYPE_COUNT ? dtypes[t].name : "?";
}

size_t tally_dtype_size(tally_dtype t) {
  return (unsigned)t < TALLY_DTYPE_COUNT ? dtypes[t].size : 0;
}

int tally_dtype_from_name(const char *name, tally_dtype *out) {
  for (int i = 0; i < TALLY_DTYPE_COUNT; i++)
    if (name && strcmp(name, dtypes[i].name) == 0) {
      *out = (tally_dtype)i;
      return 0;
    }
  return -TALLY_EUSAGE;
}

int64_t tally_tensor_count(const tally_tensor *t) {
  int64_t n = 1;
  for (int i = 0; i < t->ndim; i++) {
    if (t->shape[i] < 0 || (t->shape[i] && n > INT64_MAX / t->shape[i])) return -1;
    n *= t->shape[i];
  }
  return n;
}

static json_t *elem_to_json(const tally_tensor *t, int64_t i) {
  const void *d = t->data;
  switch (t->datatype) {
    case TALLY_BOOL: return json_boolean(((const uint8_t *)d)[i] != 0);
    case TALLY_UINT8: return json_integer(((const uint8_t *)d)[i]);
    case TALLY_UINT16: return json_integer(((const uint16_t *)d)[i]);
    case TALLY_UINT32: return json_integer(((const uint32_t *)d)[i]);
    case TALLY_UINT64: {
      uint64_t v = ((const uint64_t *)d)[i];
      /* jansson integers are signed 64-bit: larger values go as reals */
      return v > (uint64_t)INT64_MAX ? json_real((double)v) : json_integer((json_int_t)v);
    }
    case TALLY_INT8: return json_integer(((const int8_t *)d)[i]);
    case TALLY_INT16: return json_integer(((const int16_t *)d)[i]);
    case TALLY_INT32: return json_integer(((const int32_t *)d)[i]);
    case TALLY_INT64: return json_integer(((const int64_t *)d)[i]);
    case TALLY_FP32: return json_real(((const float *)d)[i]);
    case TALLY_FP64: return json_real(((const double *)d)[i]);
    default: return NULL;
  }
}

json_t *tally_tensor_to_json(const tally_tensor *t, tally_error *err) {
  if (!t || !t->name || !*t->name) {
    fail(err, TALLY_EUSAGE, 0, "a tensor without a name");
    return NULL;
  }
  if ((unsigned)t->datatype >= TALLY_DTYPE_COUNT || t->ndim < 0 || t->ndim > TALLY_MAX_DIMS) {
    fail(err, TALLY_EUSAGE, 0, "tensor '%s': bad datatype or number of dimensions", t->name);
    return NULL;
  }
  int64_t n = tally_tensor_count(t);
  if (n < 0 || (n > 0 && !t->data)) {
    fail(err, TALLY_EUSAGE, 0, "tensor '%s': bad shape or no data", t->name);
    return NULL;
  }
  json_t *shape = json_array(), *data = json_array();
  json_t *o = json_object();
  int bad = !shape || !data || !o;
  for (int i = 0; !bad && i < t->ndim; i++)
    bad = json_array_append_new(shape, json_integer(t->shape[i]));
  for (int64_t i = 0; !bad && i < n; i++) {
    if ((t->datatype == TALLY_FP32 && !isfinite(((const float *)t->data)[i])) ||
        (t->datatype == TALLY_FP64 && !isfinite(((const double *)t->data)[i]))) {
      json_decref(shape), json_decref(data), json_decref(o);
      fail(err, TALLY_EUSAGE, 0,
           "tensor '%s': element %lld is NaN or infinite (JSON cannot carry it)", t->name,
           (long long)i);
      return NULL;
    }
    bad = json_array_append_new(data, elem_to_json(t, i));
  }
  if (!bad) bad = json_object_set_new(o, "name", json_string(t->name));
  if (!bad) bad = json_object_set_new(o, "shape", shape), shape = NULL;
  if (!bad) bad = json_object_set_new(o, "datatype", json_string(tally_dtype_name(t->datatype)));
  if (!bad) bad = json_object_set_new(o, "data", data), data = NULL;
  if (bad) {
    json_decref(shape), json_decref(data), json_decref(o);
    fail(err, TALLY_ENOMEM, 0, "out of memory");
    return NULL;
  }
  return o;
}

/* Flattens nested data into t->data in row-major order. */
static int store_elem(tally_tensor *t, int64_t i, const json_t *v, tally_error *err) {
  double x;
  if (json_is_boolean(v))
    x = json_is_true(v);
  else if (json_is_integer(v)) {
    json_int_t k = json_integer_value(v);
    if (t->datatype == TALLY_INT64) return ((int64_t *)t->data)[i] = k, 0;
    if (t->datatype == TALLY_UINT64 && k >= 0) return ((uint64_t *)t->data)[i] = (uint64_t)k, 0;
    x = (double)k;
  } else if (json_is_real(v))
    x = json_real_value(v);
  else
    return fail(err, TALLY_EPROTO, 0, "tensor '%s': element %lld is not a number", t->name,
                (long long)i);
  int integral = t->datatype != TALLY_FP32 && t->datatype != TALLY_FP64;
  if (integral && x != floor(x))
    return fail(err, TALLY_EPROTO, 0, "tensor '%s' (%s): element %lld = %g is not an integer",
                t->name, tally_dtype_name(t->datatype), (long long)i, x);
  void *d = t->data;
  switch (t->datatype) {
#define RANGE(lo, hi)                                                                        \
  if (x < (lo) || x > (hi))                                                                  \
    return fail(err, TALLY_EPROTO, 0, "tensor '%s' (%s): element %lld = %g is out of range", \
                t->name, tally_dtype_name(t->datatype), (long long)i, x);
    case TALLY_BOOL: RANGE(0, 1)((uint8_t *)d)[i] = (uint8_t)x; break;
    case TALLY_UINT8: RANGE(0, 255)((uint8_t *)d)[i] = (uint8_t)x; break;
    case TALLY_UINT16: RANGE(0, 65535)((uint16_t *)d)[i] = (uint16_t)x; break;
    case TALLY_UINT32: RANGE(0, 4294967295.0)((uint32_t *)d)[i] = (uint32_t)x; break;
    case TALLY_UINT64: RANGE(0, 18446744073709549568.0)((uint64_t *)d)[i] = (uint64_t)x; break;
    case TALLY_INT8: RANGE(-128, 127)((int8_t *)d)[i] = (int8_t)x; break;
    case TALLY_INT16: RANGE(-32768, 32767)((int16_t *)d)[i] = (int16_t)x; break;
    case TALLY_INT32: RANGE(-2147483648.0, 2147483647.0)((int32_t *)d)[i] = (int32_t)x; break;
    case TALLY_INT64:
      RANGE(-9223372036854775808.0, 9223372036854774784.0)((int64_t *)d)[i] = (int64_t)x;
      break;
    case TALLY_FP32: ((float *)d)[i] = (float)x; break;
    case TALLY_FP64: ((double *)d)[i] = x; break;
    default: return fail(err, TALLY_EUSAGE, 0, "bad datatype");
#undef RANGE
  }
  return 0;
}

static int flatten(tally_tensor *t, const json_t *v, int64_t *i, int64_t n, tally_error *err) {
  if (json_is_array(v)) {
    size_t k;
    const json_t *x;
    json_array_foreach(v, k, x) {
      int rc = flatten(t, x, i, n, err);
      if (rc) return rc;
    }
    return 0;
  }
  if (*i >= n)
    return fail(err, TALLY_EPROTO, 0, "tensor '%s': more data than its shape holds", t->name);
  int rc = store_elem(t, *i, v, err);
  ++*i;
  return rc;
}

int tally_tensor_from_json(const json_t *j, tally_tensor *t, tally_error *err) {
  memset(t, 0, sizeof *t);
  const char *name = json_string_value(json_object_get(j, "name"));
  const char *dt = json_string_value(json_object_get(j, "datatype"));
  const json_t *shape = json_object_get(j, "shape"), *data = json_object_get(j, "data");
  if (!name || !dt || !json_is_array(shape) || !data)
    return fail(err, TALLY_EPROTO, 0, "a tensor needs name, datatype, shape and data");
  if (tally_dtype_from_name(dt, &t->datatype))
    return fail(err, TALLY_EPROTO, 0, "tensor '%s': datatype %s is not carried by this client",
                name, dt);
  if (json_array_size(shape) > TALLY_MAX_DIMS)
    return fail(err, TALLY_EPROTO, 0, "tensor '%s': more than %d dimensions", name, TALLY_MAX_DIMS);
  t->ndim = (int)json_array_size(shape);
  for (int i = 0; i < t->ndim; i++) {
    const json_t *d = json_array_get(shape, (size_t)i);
    if (!json_is_integer(d) || json_integer_value(d) < 0)
      return fail(err, TALLY_EPROTO, 0, "tensor '%s': bad shape", name);
    t->shape[i] = json_integer_value(d);
  }
  int64_t n = tally_tensor_count(t);
  size_t es = tally_dtype_size(t->datatype);
  if (n < 0 || (uint64_t)n > SIZE_MAX / es)
    return fail(err, TALLY_EPROTO, 0, "tensor '%s': shape too large", name);
  char *nm = dup_str(name);
  t->data = malloc(n ? (size_t)n * es : 1);
  t->name = nm;
  if (!nm || !t->data) {
    tally_tensor_free(t);
    return fail(err, TALLY_ENOMEM, 0, "out of memory");
  }
  int64_t i = 0;
  int rc = flatten(t, data, &i, n, err);
  if (!rc && i != n)
    rc = fail(err, TALLY_EPROTO, 0, "tensor '%s': %lld elements for a shape of %lld", name,
              (long long)i, (long long)n);
  if (rc) tally_tensor_free(t);
  return rc;
}

void tally_tensor_free(tally_tensor *t) {
  if (!t) return;
  free((char *)t->name);
  free(t->data);
  memset(t, 0, sizeof *t);
}

const json_t *tally_answer_output(const json_t *answer, const char *name) {
  size_t i;
  const json_t *o;
  json_array_foreach(json_object_get(answer, "outputs"), i, o) {
    const char *n = json_string_value(json_object_get(o, "name"));
    if (n && strcmp(n, name) == 0) return o;
  }
  return NULL;
}

/* ---- text generation ---- */

typedef struct sse_ctx {
  tally_text_fn fn;
  void *user;
  int done;
} sse_ctx;

static int on_sse_line(const char *line, size_t n, void *user) {
  sse_ctx *x = user;
  if (n && line[n - 1] == '\r') n--;
  if (n < 6 || memcmp(line, "data: ", 6) != 0) return 0;
  if (n == 12 && memcmp(line + 6, "[DONE]", 6) == 0) {
    x->done = 1;
    return 0;
  }
  json_error_t je;
  json_t *ev = json_loadb(line + 6, n - 6, 0, &je);
  if (!ev) return 1;
  json_t *t = json_object_get(json_array_get(json_object_get(ev, "choices"), 0), "text");
  if (!t) t = json_object_get(ev, "text_output");
  if (json_is_string(t) && json_string_length(t))
    x->fn(json_string_value(t), json_string_length(t), x->user);
  json_decref(ev);
  return 0;
}

int tally_complete(tally_client *c, json_t *body, tally_text_fn fn, void *user, json_t **answer,
                   tally_error *err) {
  if (answer) *answer = NULL;
  if (!json_is_object(body)) return fail(err, TALLY_EUSAGE, 0, "the body must be a JSON object");
  long status;
  buf b = {0};
  int rc;
  if (!fn) {
    json_object_del(body, "stream");
    return tally_request(c, "POST", "/v1/completions", body, answer, err);
  }
  json_object_set_new(body, "stream", json_true());
  sse_ctx x = {fn, user, 0};
  b.on_line = on_sse_line;
  b.user = &x;
  rc = perform(c, "POST", "/v1/completions", body, "text/event-stream", &b, &status, err);
  if (!rc && !x.done)
    rc = fail(err, TALLY_EPROTO, (int)status, "the stream ended without data: [DONE]");
  free(b.p);
  return rc;
}
