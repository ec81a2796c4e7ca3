/* repo_json.h - the protocol's JSON about the repository: the index
 * (POST /v2/repository/index) and a model's metadata (GET /v2/models/{m}),
 * written from what repo.h reports. The repository itself speaks no JSON
 * of the protocol. */
#ifndef TALLYD_REPO_JSON_H
#define TALLYD_REPO_JSON_H

#include <jansson.h>
#include <stdint.h>

#include "../base/err.h"
#include "../repo/repo.h"

/* [{"name", "version", "state", "reason"}] (a new reference; NULL when out
 * of memory). */
json_t *repo_index_json(repo_t *r);
/* {"name", "versions", "platform", "inputs", "outputs", "parameters"}:
 * 404/503 as repo_acquire. */
int model_metadata_json(repo_t *r, const char *name, int64_t version, json_t **out, ts_err *err);

#endif
