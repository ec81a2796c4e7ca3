/* learn.h - the learning loop: served rows logged, labels joined to them by
 * request id, refits written as candidate versions, candidates shadowed and
 * promoted or dropped (docs/learning.md).
 *
 * This floor sits between the repository and the server: it knows models
 * through the kind interface (model.h) and versions through repo.h, and no
 * HTTP. The server calls it after an infer is answered (learn_after_infer),
 * and for the feedback, refit and candidates endpoints.
 *
 * Per model (created when a served version's config.json has "log"): a
 * row log on disk (<repository>/<model>/.rowlog, rowlog.h) and an index in
 * memory of the newest log.max_rows rows by id, rebuilt from the log at
 * start; labels are kept on their rows (the later label for an id wins)
 * and appended to the log too, so joined rows survive a restart.
 *
 * The kinds whose weights the loop learns: "ensemble" (feedback input
 * `labels`, scored answer `probability`, log loss) and "quantile_ensemble"
 * (`targets`, `quantiles`, WIS). A row of a batch of B > 1 rows has the id
 * "<id>:<row>" (0-based); a batch of one keeps the id as it is.
 *
 * Threads: every function may be called from any worker; each model has a
 * mutex held for index updates only (never across a fit, a load or I/O but
 * the log's in-memory queue). Shadow answers run as pool jobs. */
#ifndef TALLYD_LEARN_H
#define TALLYD_LEARN_H

#include <jansson.h>

#include "../base/err.h"
#include "../base/pool.h"
#include "../base/sbuf.h"
#include "../base/tensor.h"
#include "../repo/repo.h"

typedef struct learn learn_t;

int learn_create(learn_t **out, repo_t *repo, pool_t *pool, ts_err *err);
/* After the pool is destroyed (no shadow job may still run): flushes and
 * closes every log, gives candidates back. NULL is fine. */
void learn_free(learn_t *L);

/* After an infer answered 200: logs the request's rows when the model's
 * config asks (sampled by a hash of the id, so a retried id is sampled the
 * same way), and queues the candidate's shadow answer. id: the OIP "id" or
 * the X-Request-Id. Never fails the request: problems are counted. */
void learn_after_infer(learn_t *L, repo_ver *ver, const char *id, const ts_list *inputs,
                       const ts_list *outputs);

/* POST /v2/models/{m}/feedback: inputs `id` BYTES [N] and `labels` or
 * `targets` [N]. *result: accepted, unknown (count and the first ids),
 * labelled rows, and any candidate decision the labels led to. */
int learn_feedback(learn_t *L, repo_ver *ver, const ts_list *inputs, json_t **result, ts_err *err);

/* POST /v2/models/{m}/refit: fits on the newest window of labelled rows
 * with the fit's `params` and saves the result as a candidate version (not
 * served). claim: the server's claim on the answer (md_call.claim), taken
 * before the version is written. The caller holds the model's fit claim. */
int learn_refit(learn_t *L, repo_ver *ver, const json_t *params, _Atomic int *claim,
                double deadline, json_t **result, ts_err *err);

/* GET /v2/models/{m}/candidates: the log, the labelled rows, the candidate
 * under comparison and the last decisions. */
int learn_candidates(learn_t *L, repo_ver *ver, json_t **result, ts_err *err);

/* Prometheus lines of every model the loop has seen (tallyd_learn_*). */
void learn_metrics(learn_t *L, sbuf *b);

/* Waits until every row logged so far is written and fsynced (tests, drain). */
void learn_flush(learn_t *L);

#endif
