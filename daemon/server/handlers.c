/* handlers.c - the model and health endpoints of the OIP v2 server.
 *
 * One handler per row of the route table (routes.h). Cheap endpoints
 * (health, server and model metadata, readiness, index, metrics) answer on
 * the loop thread from the repository's table and the metrics' counters.
 * Everything that decodes tensors, computes, loads or writes runs on a
 * worker. The session endpoints are in sessions.c; the repository's load
 * and unload and the calls Triton's clients make beyond the OIP (model
 * config, statistics, the refused ones) in triton.c. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../base/log.h"
#include "../base/mem.h"
#include "../learn/learn.h"
#include "../models/model.h"
#include "metrics.h"
#include "oip.h"
#include "batch.h"
#include "repo_json.h"
#include "sched.h"
#include "server.h"

/* ---- loop-thread endpoints --------------------------------------------- */

/* Answers j with j->out = json (taking the reference), or 503 without it. */
static void answer_json(job *j, int status, json_t *json) {
  if (!json) {
    resp_errorf(&j->out, TS_ENOMEM, "out of memory");
    return;
  }
  resp_json(&j->out, status, json);
  json_decref(json);
}

void ep_live(job *j) { /* probes are hit often: a fixed body, no JSON building */
  resp_text(&j->out, 200, "{\"live\":true}");
}

void ep_ready(job *j) {
  server *s = j->srv;
  int ready = !atomic_load(&s->draining) && repo_all_ready(s->repo);
  resp_text(&j->out, ready ? 200 : 503, ready ? "{\"ready\":true}" : "{\"ready\":false}");
}

void ep_server(job *j) {
  json_t *ext =
      json_pack("[s,s,s,s,s,s,s,s,s]", "model_repository", "binary_tensor_data", "classification",
                "model_configuration", "statistics", "fit", "evaluate", "calibrate", "sessions");
  answer_json(
      j, 200,
      json_pack("{s:s, s:s, s:o}", "name", "tallyd", "version", TALLYD_VERSION, "extensions", ext));
}

void ep_model_meta(job *j) {
  json_t *m = NULL;
  ts_err err = {0};
  if (model_metadata_json(j->srv->repo, j->rt.model, j->rt.version, &m, &err)) {
    resp_error(&j->out, &err);
    return;
  }
  answer_json(j, 200, m);
}

void ep_model_ready(job *j) {
  repo_ver *v;
  ts_err err = {0};
  int rc = repo_acquire(j->srv->repo, j->rt.model, j->rt.version, &v, &err);
  if (rc == -TS_ENOTFOUND) {
    resp_error(&j->out, &err);
    return;
  }
  if (!rc) repo_release(v);
  answer_json(j, rc == 0 ? 200 : 503,
              json_pack("{s:s, s:b}", "name", j->rt.model, "ready", rc == 0));
}

void ep_repo_index(job *j) {
  answer_json(j, 200, repo_index_json(j->srv->repo));
}

void ep_metrics(job *j) {
  server *s = j->srv;
  sbuf b;
  sbuf_init(&b);
  metrics_render(&b, s->repo, pool_queued(s->pool), s->inflight);
  sched_render(&b, s);
  learn_metrics(s->learn, &b);
  if (sbuf_failed(&b)) {
    sbuf_free(&b);
    resp_errorf(&j->out, TS_ENOMEM, "out of memory");
    return;
  }
  resp_free(&j->out);
  j->out.status = 200;
  j->out.content_type = "text/plain; version=0.0.4; charset=utf-8";
  j->out.body = sbuf_take(&b, &j->out.len);
}

/* ---- worker endpoints --------------------------------------------------- */

typedef int (*kind_op)(void *state, md_call *call, ts_err *err);

/* Decodes, runs one of the kind's operations and answers: tensors (infer)
 * or the operation's JSON result; a route with RF_FIT publishes the new
 * version under the job's claim. */
static void run_model(job *j, kind_op fn, int tensors) {
  server *s = j->srv;
  const route_def *d = route_get(j->rt.id);
  ts_err err = {0};
  oip_request req;
  md_call call;
  md_call_init(&call);
  /* fit, evaluate and calibrate take many labelled rows by design: their
   * size is bounded by --max-body-bytes and --max-request-elements */
  int rc = job_decode(j, j->ver, (d->flags & RF_LIMITS) != 0, &req, &call, &err);
  if (rc) goto fail;
  j->t_decoded = md_now(); /* the statistics' compute_input ends here */
  if (call.inputs && call.inputs->n > 0 && call.inputs->items[0].ndim >= 1)
    j->batch = call.inputs->items[0].shape[0];
  /* a model with dynamic batching: the batcher runs it with others */
  if (tensors && fn && j->rt.id == R_INFER && batch_offer(j, &req, &call)) return;
  const md_kind *k = repo_ver_kind(j->ver);
  const char *what = d->name;
  if (!fn) {
    rc = ts_errf(&err, TS_EINVAL, "model '%s' (kind %s) does not support %s", call.model_name,
                 k->name, what);
    goto fail;
  }
  if ((rc = fn(repo_ver_state(j->ver), &call, &err))) goto fail;
  j->t_computed = md_now();
  if (tensors) {
    if ((rc = md_check_finite_outputs(&call, &err))) goto fail;
    if ((rc = job_encode(j, &req, &call, NULL, &err))) goto fail;
    if (j->rt.id == R_INFER) /* the served-row log and the candidate's shadow answer */
      learn_after_infer(s->learn, j->ver, req.id ? req.id : j->request_id, call.inputs,
                        &call.outputs);
    goto done;
  }
  json_t *ans = call.result ? json_incref(call.result) : json_object();
  json_object_set_new(ans, "model_name", json_string(call.model_name));
  if (d->flags & RF_FIT) {
    int64_t nv;
    /* a client already answered 504 (or gone) must not find a new version */
    int running = 0;
    if (!atomic_compare_exchange_strong(&j->claim, &running, 1)) {
      json_decref(ans);
      rc = ts_errf(&err, TS_ETIMEOUT,
                   "the deadline passed before the new version was saved; "
                   "nothing was saved");
      goto fail;
    }
    if ((rc = repo_commit_version(s->repo, j->ver, &call, &nv, &err))) {
      json_decref(ans);
      goto fail;
    }
    char b[32];
    snprintf(b, sizeof b, "%lld", (long long)nv);
    json_object_set_new(ans, "model_version", json_string(b));
    json_object_set_new(ans, "parent_version", json_integer(call.version));
  } else {
    char b[32];
    snprintf(b, sizeof b, "%lld", (long long)call.version);
    json_object_set_new(ans, "model_version", json_string(b));
  }
  if (req.id) json_object_set_new(ans, "id", json_string(req.id));
  resp_json(&j->out, 200, ans);
  json_decref(ans);
  goto done;
fail:
  if (err.status == TS_EINTERNAL) log_error("%s %s: %s", d->name, j->rt.model, err.msg);
  resp_error(&j->out, &err);
done:
  md_call_free(&call);
  oip_request_free(&req);
}

void ep_infer(job *j) {
  run_model(j, repo_ver_kind(j->ver)->infer, 1);
}
void ep_fit(job *j) {
  run_model(j, repo_ver_kind(j->ver)->fit, 0);
}
void ep_evaluate(job *j) {
  run_model(j, repo_ver_kind(j->ver)->evaluate, 0);
}
void ep_calibrate(job *j) {
  run_model(j, repo_ver_kind(j->ver)->calibrate, 0);
}
