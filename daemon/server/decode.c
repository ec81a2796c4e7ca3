/* decode.c - a worker's first step on a model request: the body decoded
 * into tensors under the server's limits, and the model call prepared.
 *
 * Kept apart from the model endpoints (handlers.c) and the sessions (sessions.c),
 * which both start here, so that every model request meets the same limits
 * in the same order: parse and decode (oip.c, --max-request-memory and
 * --max-request-elements), then --max-batch and --max-sequence-length, then
 * the request's deadline. */
#include <string.h>

#include "../base/mem.h"
#include "../models/model.h"
#include "oip.h"
#include "sched.h"
#include "server.h"
#include "trace.h"

/* Limits are checked here, before any kind sees the tensors, so that every
 * kind (and every future one) is held to them the same way. The sequence
 * length is read from the inputs' conventional names: input_ids [B, L]
 * (transformer) and query/key/value [.., L, d] (attention). */
int server_check_limits(const srv_config *cfg, const ts_list *inputs, ts_err *err) {
  for (int i = 0; i < inputs->n; i++) {
    const ts_tensor *t = &inputs->items[i];
    if (cfg->max_batch > 0 && t->ndim >= 1 && t->shape[0] > cfg->max_batch)
      return ts_errf(err, TS_EINVAL,
                     "input '%s': batch of %lld rows is over the limit of %lld "
                     "(--max-batch)",
                     t->name, (long long)t->shape[0], (long long)cfg->max_batch);
    if (cfg->max_sequence_length <= 0) continue;
    int dim = -1;
    if (strcmp(t->name, "input_ids") == 0 && t->ndim >= 1)
      dim = t->ndim - 1;
    else if ((strcmp(t->name, "query") == 0 || strcmp(t->name, "key") == 0 ||
              strcmp(t->name, "value") == 0) &&
             t->ndim >= 2)
      dim = t->ndim - 2;
    if (dim >= 0 && t->shape[dim] > cfg->max_sequence_length)
      return ts_errf(err, TS_EINVAL,
                     "input '%s': sequence length %lld is over the limit of %lld "
                     "(--max-sequence-length)",
                     t->name, (long long)t->shape[dim], (long long)cfg->max_sequence_length);
  }
  return 0;
}

/* The operation a route runs, for the kind's parameter lists: its row's
 * column in the route table (routes.h). */
static int route_op(int route) {
  int op = route_get(route)->op;
  return op == OP_NONE ? MD_OP_INFER : op;
}

/* Whether the kind runs `op` at all: where it does not, the caller's "does
 * not support" is the better answer than a list of parameters. */
static int op_supported(const md_kind *k, int op) {
  switch (op) {
    case MD_OP_FIT: return k->fit != NULL;
    case MD_OP_EVALUATE: return k->evaluate != NULL;
    case MD_OP_CALIBRATE: return k->calibrate != NULL;
    case MD_OP_SESSION_OPEN:
    case MD_OP_SESSION_INFER: return k->session_open != NULL;
    default: return 1;
  }
}

int server_check_params(const md_kind *k, int op, const char *model, const json_t *params,
                        ts_err *err) {
  if (!params || !op_supported(k, op)) return 0;
  const char *key;
  json_t *v;
  json_object_foreach((json_t *)params, key, v) {
    if (oip_is_request_param(key) || md_kind_takes_param(k, op, key)) continue;
    /* one labelled file serves fit or calibrate and evaluate (fit-from-file.sh
     * --evaluate): evaluate lets the kind's fit and calibrate names pass; a
     * name no operation takes is still refused */
    if (op == MD_OP_EVALUATE &&
        (md_kind_takes_param(k, MD_OP_FIT, key) || md_kind_takes_param(k, MD_OP_CALIBRATE, key)))
      continue;
    sbuf b;
    sbuf_init(&b);
    for (const char *const *a = k->params[op]; a && *a; a++) sbuf_printf(&b, "%s, ", *a);
    if (op == MD_OP_EVALUATE && k->params[MD_OP_FIT]) sbuf_adds(&b, "fit's names, ");
    if (op == MD_OP_EVALUATE && k->params[MD_OP_CALIBRATE]) sbuf_adds(&b, "calibrate's names, ");
    sbuf_adds(&b, b.len ? "and the protocol's " : "none of the kind's own; the protocol's ");
    for (const char *const *a = oip_request_params; *a; a++)
      sbuf_printf(&b, "%s%s", *a, a[1] ? ", " : "");
    int rc = ts_errf(err, TS_EINVAL,
                     "unknown parameter '%.60s' for %s on model '%s' (kind %s); "
                     "accepted: %s",
                     key, md_op_name(op), model, k->name,
                     sbuf_failed(&b) || !b.data ? "(out of memory)" : b.data);
    sbuf_free(&b);
    return rc;
  }
  return 0;
}

/* Infer takes the inputs of the model's signature and no others (Triton:
 * "unexpected inference input"); a misnamed input is a 400, not ignored. */
static int check_input_names(const repo_ver *ver, const ts_list *inputs, ts_err *err) {
  const md_sig *sig = repo_ver_sig(ver);
  const md_kind *kind = repo_ver_kind(ver);
  if (!sig || sig->n_inputs == 0) return 0;
  for (int i = 0; i < inputs->n; i++) {
    int ok = 0;
    for (int k = 0; k < sig->n_inputs && !ok; k++)
      ok = strcmp(sig->inputs[k].name, inputs->items[i].name) == 0;
    for (const char *const *a = kind->infer_inputs; a && *a && !ok; a++)
      ok = strcmp(*a, inputs->items[i].name) == 0;
    if (ok) continue;
    char list[256];
    size_t o = 0;
    list[0] = 0;
    for (int k = 0; k < sig->n_inputs && o < sizeof list; k++)
      o += (size_t)snprintf(list + o, sizeof list - o, "%s%s", k ? ", " : "", sig->inputs[k].name);
    const char *missing = NULL; /* the likely intended name, when one is absent */
    for (int k = 0; k < sig->n_inputs && !missing; k++)
      if (!ts_list_find(inputs, sig->inputs[k].name)) missing = sig->inputs[k].name;
    return ts_errf(err, TS_EINVAL,
                   "unexpected input '%.100s' for model '%s' (its inputs: %s)%s%s%s",
                   inputs->items[i].name, repo_ver_model(ver), list,
                   missing ? "; missing input '" : "", missing ? missing : "", missing ? "'" : "");
  }
  return 0;
}

/* config.json's max_batch: the leading dimension of every input. */
static int check_model_batch(const repo_ver *ver, const ts_list *inputs, ts_err *err) {
  int64_t mb = repo_ver_max_batch(ver);
  for (int i = 0; mb > 0 && i < inputs->n; i++) {
    const ts_tensor *t = &inputs->items[i];
    if (t->ndim >= 1 && t->shape[0] > mb)
      return ts_errf(err, TS_EINVAL,
                     "input '%s': batch of %lld rows is over model '%s''s "
                     "max_batch of %lld (config.json)",
                     t->name, (long long)t->shape[0], repo_ver_model(ver), (long long)mb);
  }
  return 0;
}

int job_decode(job *j, const repo_ver *ver, int check_limits, oip_request *req, md_call *call,
               ts_err *err) {
  server *s = j->srv;
  const srv_config *c = s->cfg;
  oip_limits lim = {.max_elements = c->max_request_elements,
                    .max_bytes = c->max_request_memory,
                    .max_json_bytes = c->max_json_memory,
                    .max_inputs = c->max_inputs,
                    .max_outputs = c->max_outputs,
                    .max_response_bytes = c->max_response_bytes,
                    .t_submit = j->t_submit,
                    .deadline = atomic_load(&j->deadline),
                    .cancelled = &j->cancelled};
  int rc = oip_decode_ex(j->body, j->len, j->json_len, &lim, req, err);
  tl_free(j->body);
  j->body = NULL;
  /* the request's own timeout holds from here on, even when decoding failed */
  if (req->deadline > 0 && req->deadline != lim.deadline) atomic_store(&j->deadline, req->deadline);
  if (rc) return rc;
  const md_kind *k = repo_ver_kind(ver);
  int op = route_op(j->rt.id);
  if ((rc = server_check_params(k, op, repo_ver_model(ver), req->params, err))) return rc;
  if ((rc = sched_check_priority(ver, req->params, err))) return rc;
  /* the operator's limits first, then the model's own */
  if (check_limits && (rc = server_check_limits(s->cfg, &req->inputs, err))) return rc;
  /* a route without an operation of its own (feedback) takes other inputs */
  int own = route_get(j->rt.id)->op;
  if (own == MD_OP_INFER || own == MD_OP_SESSION_INFER) {
    if ((rc = check_model_batch(ver, &req->inputs, err))) return rc;
    if ((rc = check_input_names(ver, &req->inputs, err))) return rc;
  }
  call->inputs = &req->inputs;
  call->params = req->params;
  call->spans = j->trace ? &j->trace->sink : NULL; /* hosted models' spans */
  call->pool = s->pool;
  call->host = repo_host(s->repo);
  call->deadline = atomic_load(&j->deadline);
  call->cancelled = &j->cancelled;
  call->model_name = repo_ver_model(ver);
  call->version = repo_ver_version(ver);
  return 0;
}

int job_encode(job *j, const oip_request *req, const md_call *call, const json_t *extra,
               ts_err *err) {
  sbuf b;
  sbuf_init(&b);
  size_t json_len = 0;
  int rc =
      oip_encode(call->model_name, call->version, req, &call->outputs, extra, &b, &json_len, err);
  if (rc) {
    sbuf_free(&b);
    return rc;
  }
  resp_free(&j->out);
  j->out.status = 200;
  j->out.json_len = json_len;
  /* Triton's choice: an answer with binary parts is application/octet-stream */
  if (json_len) j->out.content_type = "application/octet-stream";
  j->out.body = sbuf_take(&b, &j->out.len);
  return 0;
}
