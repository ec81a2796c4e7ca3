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
} oip_out_req;

typedef struct oip_request {
  json_t *root;       /* the parsed JSON (kept for parameters) */
  const char *id;     /* borrowed from root; NULL when absent */
  json_t *params;     /* borrowed from root; NULL when absent */
  ts_list inputs;
  oip_out_req *outputs; /* requested outputs; NULL/0: all */
  int n_outputs;
  int binary_default; /* parameters.binary_data_output */
} oip_request;

/* json_len == 0 or == len: the whole body is JSON. max_elements bounds the
 * element count of any one tensor (0: none). */
int oip_decode(const char *body, size_t len, size_t json_len, int64_t max_elements,
               oip_request *req, ts_err *err);
/* The same with a budget: when the decoded inputs' element count x dtype
 * size, summed, would exceed max_bytes (> 0), -TS_ETOOBIG (413) before the
 * input that crosses it is allocated (--max-request-memory). */
int oip_decode_capped(const char *body, size_t len, size_t json_len, int64_t max_elements,
                      int64_t max_bytes, oip_request *req, ts_err *err);
void oip_request_free(oip_request *req);

/* Encodes {"model_name", "model_version", "id"?, "outputs": [...]} into
 * out. Outputs are filtered by req->outputs (an unknown name is a 400).
 * When any output is binary, the binary parts follow the JSON and
 * *json_len is set to the JSON's length (else 0). */
int oip_encode(const char *model, int64_t version, const oip_request *req,
               const ts_list *outputs, const json_t *extra_params, sbuf *out,
               size_t *json_len, ts_err *err);

/* Appends one tensor's "data" array as JSON (used by the encoder and for
 * small JSON answers). */
void oip_data_json(sbuf *b, const ts_tensor *t);

#endif
