/* learn_ep.c - the learning loop's endpoints: feedback, refit and
 * candidates (the loop itself, with no HTTP in it, is daemon/learn).
 *
 * feedback takes the OIP request form (inputs `id` BYTES [N] and `labels`
 * or `targets` [N]) through the same decoder and limits as infer; refit
 * takes {"parameters": {...}} (the fit's parameters, checked against the
 * kind's list like /fit's) and nothing else; candidates is a GET. */
#include <stdio.h>
#include <string.h>

#include "../base/mem.h"
#include "../learn/learn.h"
#include "oip.h"
#include "server.h"

static void answer(job *j, int rc, json_t *res, ts_err *err) {
  if (rc) {
    resp_error(&j->out, err);
    return;
  }
  json_object_set_new(res, "model_name", json_string(j->rt.model));
  resp_json(&j->out, 200, res);
  json_decref(res);
}

void ep_feedback(job *j) {
  ts_err err = {0};
  oip_request req;
  md_call call;
  md_call_init(&call);
  json_t *res = NULL;
  /* held to --max-batch like an infer's rows */
  int rc = job_decode(j, j->ver, 1, &req, &call, &err);
  if (!rc && req.params) {
    const char *key;
    json_t *v;
    json_object_foreach(req.params, key, v) {
      if (oip_is_request_param(key)) continue;
      rc = ts_errf(&err, TS_EINVAL,
                   "unknown parameter '%.60s' for feedback: it takes none of its own (inputs "
                   "'id' and the labels or targets carry everything)",
                   key);
      break;
    }
  }
  if (!rc) rc = learn_feedback(j->srv->learn, j->ver, &req.inputs, &res, &err);
  if (!rc && req.id) json_object_set_new(res, "id", json_string(req.id));
  answer(j, rc, res, &err);
  md_call_free(&call);
  oip_request_free(&req);
}

void ep_refit(job *j) {
  ts_err err = {0};
  json_t *root = NULL, *res = NULL;
  int rc = 0;
  if (j->len > 0) {
    json_error_t je;
    root = json_loadb(j->body, j->len, JSON_REJECT_DUPLICATES, &je);
    if (!root || !json_is_object(root))
      rc = ts_errf(&err, TS_EINVAL, "refit's body must be a JSON object: %s",
                   root ? "got another JSON value" : je.text);
  }
  tl_free(j->body);
  j->body = NULL;
  const json_t *params = root ? json_object_get(root, "parameters") : NULL;
  if (!rc && root) {
    const char *key;
    json_t *v;
    json_object_foreach(root, key, v) {
      if (strcmp(key, "parameters") == 0) continue;
      rc = ts_errf(&err, TS_EINVAL,
                   "unknown field '%.60s' in refit's body: it takes {\"parameters\": {the fit's "
                   "parameters}} and fits on the model's logged, labelled rows",
                   key);
      break;
    }
  }
  if (!rc && params && !json_is_object(params))
    rc = ts_errf(&err, TS_EINVAL, "'parameters' must be an object");
  if (!rc) {
    const md_kind *k = repo_ver_kind(j->ver);
    if (!k->fit)
      rc = ts_errf(&err, TS_EINVAL, "model '%s' (kind %s) does not support fit", j->rt.model,
                   k->name);
    else if (params) {
      /* the protocol's names (timeout, ...) mean nothing here: only the fit's */
      const char *key;
      json_t *v;
      json_object_foreach((json_t *)params, key, v) {
        if (md_kind_takes_param(k, MD_OP_FIT, key)) continue;
        rc = server_check_params(k, MD_OP_FIT, j->rt.model, params, &err);
        if (!rc)
          rc = ts_errf(&err, TS_EINVAL, "unknown parameter '%.60s' for refit on model '%s'", key,
                       j->rt.model);
        break;
      }
    }
  }
  if (!rc)
    rc = learn_refit(j->srv->learn, j->ver, params, &j->claim, atomic_load(&j->deadline), &res,
                     &err);
  if (root) json_decref(root);
  answer(j, rc, res, &err);
}

void ep_candidates(job *j) {
  ts_err err = {0};
  json_t *res = NULL;
  int rc = learn_candidates(j->srv->learn, j->ver, &res, &err);
  answer(j, rc, res, &err);
}
