/* tally.h - a small C client library for tallyd (Open Inference Protocol v2
 * over HTTP, plus tallyd's fit/evaluate/calibrate/session extensions).
 *
 * Built on libcurl (transport) and jansson (JSON). Every call returns 0 or a
 * negative tally status and, on failure, fills a tally_error the caller owns
 * (errors are values, as in the daemon). A tally_client is one keep-alive
 * connection: use one client per thread.
 *
 * Ownership: a json_t ** answer is a new reference the caller json_decref()s;
 * tensors passed in are borrowed for the call; tally_tensor_from_json()
 * allocates name, shape storage and data, freed by tally_tensor_free(). */
#ifndef TALLY_H
#define TALLY_H

#include <jansson.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define TALLY_DEFAULT_URL "http://127.0.0.1:8000"
#define TALLY_MAX_DIMS 8
#define TALLY_CLIENT_VERSION "0.1.0"

/* Statuses (negative when returned). */
enum {
  TALLY_OK = 0,
  TALLY_EUSAGE = 1,   /* bad argument from the caller: nothing was sent */
  TALLY_ECONNECT = 2, /* no HTTP answer: refused, unreachable, timed out */
  TALLY_EHTTP = 3,    /* the server answered with a status >= 400 (see http_status) */
  TALLY_EPROTO = 4,   /* the server's answer is not the JSON expected */
  TALLY_ENOMEM = 5
};

typedef struct tally_error {
  int code;          /* one of the statuses above (positive) */
  int http_status;   /* the HTTP status when there was an answer, else 0 */
  char message[512]; /* the server's "error" string, or what went wrong locally */
} tally_error;

/* Datatypes of the OIP (the ones with a fixed C width; FP16 and BYTES are not
 * carried by this library). */
typedef enum tally_dtype {
  TALLY_BOOL,
  TALLY_UINT8,
  TALLY_UINT16,
  TALLY_UINT32,
  TALLY_UINT64,
  TALLY_INT8,
  TALLY_INT16,
  TALLY_INT32,
  TALLY_INT64,
  TALLY_FP32,
  TALLY_FP64,
  TALLY_DTYPE_COUNT
} tally_dtype;

/* One tensor: row-major data of prod(shape) elements of the datatype's C type
 * (BOOL is one byte per element). */
typedef struct tally_tensor {
  const char *name;
  tally_dtype datatype;
  int ndim;
  int64_t shape[TALLY_MAX_DIMS];
  void *data;
} tally_tensor;

typedef struct tally_client tally_client;

/* url: NULL takes $TALLY_URL, else TALLY_DEFAULT_URL. api_key: NULL takes
 * $TALLY_API_KEY (sent as "Authorization: Bearer <key>"; empty: none).
 * timeout_ms: whole-request limit, 0 = none. */
int tally_client_new(tally_client **out, const char *url, const char *api_key, long timeout_ms,
                     tally_error *err);
void tally_client_free(tally_client *c);
const char *tally_client_url(const tally_client *c);

/* Input tensors of this many elements or more are sent as binary tensors
 * (the raw little-endian bytes after the JSON, Inference-Header-Content-Length;
 * no JSON text to write or parse): 0 sends every input so, a negative value
 * none. Default TALLY_BINARY_MIN_DEFAULT. */
#define TALLY_BINARY_MIN_DEFAULT 4096
void tally_client_set_binary_min(tally_client *c, int64_t elements);

/* Health: 0 when live / ready (HTTP 200), else an error (503 while not ready). */
int tally_health_live(tally_client *c, tally_error *err);
int tally_health_ready(tally_client *c, tally_error *err);

/* Metadata. version may be NULL (the newest). */
int tally_server_metadata(tally_client *c, json_t **answer, tally_error *err);
int tally_model_metadata(tally_client *c, const char *model, const char *version, json_t **answer,
                         tally_error *err);
int tally_model_ready(tally_client *c, const char *model, const char *version, tally_error *err);

/* Repository: the index (a JSON array), load and unload one model. */
int tally_repository_index(tally_client *c, json_t **answer, tally_error *err);
int tally_load(tally_client *c, const char *model, tally_error *err);
int tally_unload(tally_client *c, const char *model, tally_error *err);

/* Inference and the learning extensions. inputs: n tensors; params: a JSON
 * object for the request's "parameters" or NULL (borrowed). version: NULL for
 * the newest (fit and calibrate always act on the newest). */
int tally_infer(tally_client *c, const char *model, const char *version, const tally_tensor *inputs,
                size_t n, json_t *params, json_t **answer, tally_error *err);
/* The same, asking for only the outputs named (n_outputs names; 0: all). */
int tally_infer_outputs(tally_client *c, const char *model, const char *version,
                        const tally_tensor *inputs, size_t n, json_t *params,
                        const char *const *outputs, size_t n_outputs, json_t **answer,
                        tally_error *err);
int tally_fit(tally_client *c, const char *model, const tally_tensor *inputs, size_t n,
              json_t *params, json_t **answer, tally_error *err);
int tally_evaluate(tally_client *c, const char *model, const char *version,
                   const tally_tensor *inputs, size_t n, json_t *params, json_t **answer,
                   tally_error *err);
int tally_calibrate(tally_client *c, const char *model, const tally_tensor *inputs, size_t n,
                    json_t *params, json_t **answer, tally_error *err);

/* KV-cache sessions of a transformer model. */
int tally_session_create(tally_client *c, const char *model, json_t *params, json_t **answer,
                         tally_error *err);
int tally_session_infer(tally_client *c, const char *model, const char *session,
                        const tally_tensor *inputs, size_t n, json_t *params, json_t **answer,
                        tally_error *err);
int tally_session_infer_outputs(tally_client *c, const char *model, const char *session,
                                const tally_tensor *inputs, size_t n, json_t *params,
                                const char *const *outputs, size_t n_outputs, json_t **answer,
                                tally_error *err);
int tally_session_get(tally_client *c, const char *model, const char *session, json_t **answer,
                      tally_error *err);
int tally_session_delete(tally_client *c, const char *model, const char *session, tally_error *err);

/* Any request: method "GET", "POST" or "DELETE", path from the root ("/v2/...").
 * body: sent as JSON when not NULL (borrowed). answer: NULL to discard it. */
int tally_request(tally_client *c, const char *method, const char *path, json_t *body,
                  json_t **answer, tally_error *err);

/* GET /metrics: the Prometheus text in *text (NUL-terminated, free() it),
 * its length in *len when len is not NULL. */
int tally_metrics(tally_client *c, char **text, size_t *len, tally_error *err);

/* Text generation (POST /v1/completions; body: OpenAI's fields, "model" and
 * "prompt" at least). fn NULL: the whole answer in *answer. fn given: the
 * answer is streamed (server-sent events) and fn receives each piece of new
 * text of the first choice as it arrives; *answer stays NULL. */
typedef void (*tally_text_fn)(const char *text, size_t len, void *user);
int tally_complete(tally_client *c, json_t *body, tally_text_fn fn, void *user, json_t **answer,
                   tally_error *err);

/* Tensor helpers. */
const char *tally_dtype_name(tally_dtype t);
int tally_dtype_from_name(const char *name, tally_dtype *out); /* 0 or -TALLY_EUSAGE */
size_t tally_dtype_size(tally_dtype t);
int64_t tally_tensor_count(const tally_tensor *t);
/* {"name","shape","datatype","data"} of t (a new reference), or NULL on error. */
json_t *tally_tensor_to_json(const tally_tensor *t, tally_error *err);
/* Decodes an OIP tensor object (flat or nested data) into t (allocations
 * freed by tally_tensor_free). */
int tally_tensor_from_json(const json_t *j, tally_tensor *t, tally_error *err);
void tally_tensor_free(tally_tensor *t);
/* The output named name of an infer answer (borrowed), or NULL. */
const json_t *tally_answer_output(const json_t *answer, const char *name);

#ifdef __cplusplus
}
#endif
#endif
