/* repo_json.c - the repository's index and a model's metadata as the
 * protocol's JSON (repo_json.h). */
#include "repo_json.h"

#include <stdio.h>

#include "../base/mem.h"
#include "../base/tensor.h"
#include "../models/model.h"

static void index_row(void *data, const char *model, int64_t version, const char *state,
                      const char *reason) {
  json_t *a = data;
  char b[32] = "";
  if (version > 0) snprintf(b, sizeof b, "%lld", (long long)version);
  json_array_append_new(a, json_pack("{s:s, s:s, s:s, s:s}", "name", model, "version", b, "state",
                                     state, "reason", reason));
}

json_t *repo_index_json(repo_t *r) {
  json_t *a = json_array();
  if (!a) return NULL;
  repo_index_foreach(r, index_row, a);
  return a;
}

static json_t *io_json(const md_io *io, int n) {
  json_t *a = json_array();
  for (int i = 0; i < n; i++) {
    json_t *shape = json_array();
    for (int k = 0; k < io[i].ndim; k++) json_array_append_new(shape, json_integer(io[i].shape[k]));
    json_array_append_new(a, json_pack("{s:s, s:s, s:o}", "name", io[i].name, "datatype",
                                       ts_dtype_name(io[i].dtype), "shape", shape));
  }
  return a;
}

int model_metadata_json(repo_t *r, const char *name, int64_t version, json_t **out, ts_err *err) {
  repo_ver *v;
  int rc = repo_acquire(r, name, version, &v, err);
  if (rc) return rc;
  /* the served set may change between the two calls: the second is capped */
  int cap = repo_served_versions(r, name, NULL, 0);
  int64_t *vs = tl_malloc((size_t)(cap > 0 ? cap : 1) * sizeof *vs);
  int n = vs ? repo_served_versions(r, name, vs, cap) : 0;
  if (n > cap) n = cap;
  json_t *vers = json_array();
  for (int i = 0; i < n; i++) {
    char b[32];
    snprintf(b, sizeof b, "%lld", (long long)vs[i]);
    json_array_append_new(vers, json_string(b));
  }
  tl_free(vs);
  char vb[32];
  snprintf(vb, sizeof vb, "%lld", (long long)repo_ver_version(v));
  const md_sig *sig = repo_ver_sig(v);
  json_t *j = json_pack("{s:s, s:o, s:s, s:o, s:o}", "name", name, "versions", vers, "platform",
                        repo_ver_kind(v)->name, "inputs", io_json(sig->inputs, sig->n_inputs),
                        "outputs", io_json(sig->outputs, sig->n_outputs));
  json_t *params = json_object();
  json_object_set_new(params, "version", json_string(vb));
  const char *sha = repo_ver_sha256(v);
  if (sha && sha[0]) json_object_set_new(params, "sha256", json_string(sha));
  if (repo_ver_info(v)) json_object_set(params, "version_info", (json_t *)repo_ver_info(v));
  json_object_set_new(j, "parameters", params);
  repo_release(v);
  *out = j;
  return 0;
}
