/* oip.h - the Open Inference Protocol v2 tensor codec (JSON and binary).
 *
 * Decodes an inference request body into named tensors, and encodes named
 * output tensors into a response body. Runs on worker threads.
 *
 * Request: {"id"?, "parameters"?, "inputs": [{"name", "shape", "datatype",
 * "parameters"?, "data"}], "outputs"?: [{"name", "parameters"?}]}; data is
 * row-major, flat or nested. With the binary tensor data extension the JSON
 * is the first `json_len` bytes of the body (header
 * Inference-Header-Content-Length) and an input whose parameters carry
 * "binary_data_size" takes that many bytes, in input order, from the rest.
 *
 * Ownership: oip_request owns everything it holds; its input tensors own
 * their data (copied out of the body, so the body may be freed). */
#ifndef TALLYD_OIP_H
#define TALLYD_OIP_H

#include <jansson.h>
#include <stddef.h>

#include "../base/err.h"
#include "../base/sbuf.h"
#include "../base/tensor.h"

typedef struct oip_out_req {
  char *name;
  int binary;
  int64_t class_count; /* Triton's classification extension; 0: the tensor itself */
} oip_out_req;

typedef struct oip_request {
  json_t *root;   /* the parsed JSON (kept for parameters) */
  const char *id; /* borrowed from root; NULL when absent */
  json_t *params; /* borrowed from root; NULL when absent */
  ts_list inputs;
  oip_out_req *outputs; /* requested outputs; NULL/0: all */
  int n_outputs;
  int binary_default;         /* parameters.binary_data_output */
  double deadline;            /* from oip_limits, or the request's "timeout_ms"/"timeout" */
  int64_t max_response_bytes; /* oip_encode's limit (0: none) */
} oip_request;

/* What one request may cost (0 or NULL: no limit). Every figure is checked
 * before the memory or time it bounds is spent. */
typedef struct oip_limits {
  int64_t max_elements;          /* one input's element count (--max-request-elements) */
  int64_t max_bytes;             /* decoded inputs together (--max-request-memory) */
  int64_t max_json_bytes;        /* the JSON parse tree (--max-json-memory) */
  int64_t max_inputs;            /* entries of "inputs" (--max-inputs) */
  int64_t max_outputs;           /* entries of "outputs" (--max-outputs) */
  int64_t max_response_bytes;    /* the encoded answer (--max-response-bytes) */
  double t_submit;               /* md_now() at arrival: "timeout_ms"/"timeout" count from it */
  double deadline;               /* md_now() seconds; 0: none; the request's timeout overrides */
  const volatile int *cancelled; /* set when the server abandons the request */
} oip_limits;

/* The request-level parameter names the codec itself reads or accepts
 * from OIP clients (NULL-terminated): timeout_ms, timeout (Triton's, in
 * microseconds), binary_data_output, and Triton's sequence_id,
 * sequence_start, sequence_end, priority and headers (accepted and
 * type-checked; priority orders the model's queue: docs/scheduling.md;
 * tallyd has no sequence batcher). */
extern const char *const oip_request_params[];
int oip_is_request_param(const char *key);

/* What the scheduler needs of a request before a worker decodes it, read
 * from "parameters" in one pass over the JSON text that skips every other
 * value: "priority" (a non-negative integer) and the request's own timeout
 * ("timeout_ms", or Triton's "timeout" in microseconds). A value that is
 * absent, of another type, out of range, behind an escaped key, or a body
 * that is not JSON leaves the field unset (the decoder then says why). */
typedef struct oip_scanned {
  int has_priority;
  int64_t priority;
  double timeout_s; /* 0: none */
} oip_scanned;
void oip_scan_params(const char *body, size_t len, oip_scanned *out);

/* json_len == 0 or == len: the whole body is JSON. max_elements bounds the
 * element count of any one tensor (0: none). */
int oip_decode(const char *body, size_t len, size_t json_len, int64_t max_elements,
               oip_request *req, ts_err *err);
/* The same with a budget: when the decoded inputs' element count x dtype
 * size, summed, would exceed max_bytes (> 0), -TS_ETOOBIG (413) before the
 * input that crosses it is allocated (--max-request-memory). */
int oip_decode_capped(const char *body, size_t len, size_t json_len, int64_t max_elements,
                      int64_t max_bytes, oip_request *req, ts_err *err);
/* The same with every limit of oip_limits; decoding stops with 504 once
 * lim->deadline passes or *lim->cancelled is set. */
int oip_decode_ex(const char *body, size_t len, size_t json_len, const oip_limits *lim,
                  oip_request *req, ts_err *err);
void oip_request_free(oip_request *req);

/* Makes jansson allocate through a counter so that oip_decode_ex can bound
 * the parse tree (--max-json-memory). Call once at start, before any
 * thread uses jansson; without it the parse is bounded only by a pre-scan
 * estimate. */
void oip_json_alloc_init(void);
/* Parses a request body's JSON (duplicate keys refused) within `limit`
 * bytes of parse tree (0: none): NULL with 413 over it, 400 when malformed.
 * For every request body tallyd parses, not only infer's. */
json_t *oip_parse_json(const char *body, size_t len, int64_t limit, ts_err *err);

/* Encodes {"model_name", "model_version", "id"?, "outputs": [...]} into
 * out. Outputs are filtered by req->outputs (an unknown name is a 400); an
 * output with class_count k becomes its top k classes per row as BYTES
 * "value:index" strings (a 400 for BOOL or BYTES outputs). The answer's
 * size is computed first: over req->max_response_bytes it is a 413 and
 * nothing is built.
 * When any output is binary, the binary parts follow the JSON and
 * *json_len is set to the JSON's length (else 0). */
int oip_encode(const char *model, int64_t version, const oip_request *req, const ts_list *outputs,
               const json_t *extra_params, sbuf *out, size_t *json_len, ts_err *err);

/* Appends one tensor's "data" array as JSON (used by the encoder and for
 * small JSON answers). */
void oip_data_json(sbuf *b, const ts_tensor *t);

#endif
