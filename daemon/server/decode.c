/* decode.c - a worker's first step on a model request: the body decoded
 * into tensors under the server's limits, and the model call prepared.
 *
 * Kept apart from the routes (handlers.c) and the sessions (sessions.c),
 * which both start here, so that every model request meets the same limits
 * in the same order: parse and decode (oip.c, --max-request-memory and
 * --max-request-elements), then --max-batch and --max-sequence-length, then
 * the request's deadline. */
#include <string.h>

#include "../base/mem.h"
#include "../models/model.h"
#include "oip.h"
#include "server.h"

/* Limits are checked here, before any kind sees the tensors, so that every
 * kind (and every future one) is held to them the same way. The sequence
 * length is read from the inputs' conventional names: input_ids [B, L]
 * (transformer) and query/key/value [.., L, d] (attention). */
int server_check_limits(const srv_config *cfg, const ts_list *inputs, ts_err *err) {
  for (int i = 0; i < inputs->n; i++) {
    const ts_tensor *t = &inputs->items[i];
    if (cfg->max_batch > 0 && t->ndim >= 1 && t->shape[0] > cfg->max_batch)
      return ts_errf(err, TS_EINVAL, "input '%s': batch of %lld rows is over the limit of %lld "
                     "(--max-batch)", t->name, (long long)t->shape[0], (long long)cfg->max_batch);
    if (cfg->max_sequence_length <= 0) continue;
    int dim = -1;
    if (strcmp(t->name, "input_ids") == 0 && t->ndim >= 1) dim = t->ndim - 1;
    else if ((strcmp(t->name, "query") == 0 || strcmp(t->name, "key") == 0 ||
              strcmp(t->name, "value") == 0) && t->ndim >= 2)
      dim = t->ndim - 2;
    if (dim >= 0 && t->shape[dim] > cfg->max_sequence_length)
      return ts_errf(err, TS_EINVAL, "input '%s': sequence length %lld is over the limit of %lld "
                     "(--max-sequence-length)", t->name, (long long)t->shape[dim],
                     (long long)cfg->max_sequence_length);
  }
  return 0;
}

static void set_deadline(job *j, const oip_request *req) {
  json_t *t = req->params ? json_object_get(req->params, "timeout_ms") : NULL;
  if (t && json_is_number(t) && json_number_value(t) > 0)
    atomic_store(&j->deadline, j->t_submit + json_number_value(t) / 1000.0);
}

int job_decode(job *j, const repo_ver *ver, int check_limits, oip_request *req, md_call *call,
               ts_err *err) {
  server *s = j->srv;
  int rc = oip_decode_capped(j->body, j->len, j->json_len, s->cfg->max_request_elements,
                             s->cfg->max_request_memory, req, err);
  tl_free(j->body);
  j->body = NULL;
  if (rc) return rc;
  if (check_limits && (rc = server_check_limits(s->cfg, &req->inputs, err))) return rc;
  set_deadline(j, req);
  call->inputs = &req->inputs;
  call->params = req->params;
  call->pool = s->pool;
  call->host = repo_host(s->repo);
  call->deadline = atomic_load(&j->deadline);
  call->cancelled = &j->cancelled;
  call->model_name = repo_ver_model(ver);
  call->version = repo_ver_version(ver);
  return 0;
}
