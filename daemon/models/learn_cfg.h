/* learn_cfg.h - the learning loop's settings in config.json: "log" (the
 * served-row log) and "refit" (the refit and promotion policy). Read here,
 * on the models floor, so that a kind refuses a bad setting when the model
 * loads (400 naming the key), the same way as its own keys; the loop itself
 * is in daemon/learn (docs/learning.md). */
#ifndef TALLYD_LEARN_CFG_H
#define TALLYD_LEARN_CFG_H

#include <jansson.h>
#include <stdint.h>

#include "../base/err.h"
#include "model.h"

#define LC_MAX_ROWS 1000000 /* the most rows a model's log (and its index) may hold */

typedef struct lc_config {
  int log;                /* "log" present */
  double sample_rate;     /* (0, 1]; default 1 */
  int64_t max_rows;       /* default 100000 */
  int refit;              /* "refit" present */
  int64_t every_rows;     /* a refit after this many new labelled rows; 0: never by rows */
  double every_seconds;   /* a refit after this long since the last; 0: never by time */
  int64_t window_rows;    /* the newest labelled rows a refit fits on; default 1000 */
  int64_t min_rows;       /* no refit on fewer labelled rows; default 50 */
  double margin;          /* promote when cand < served * (1 - margin); default 0.02 */
  int64_t compare_rows;   /* fresh labelled rows scored before a decision; default 100 */
  double max_age_seconds; /* a candidate undecided this long is dropped; default 3600; 0 none */
  const json_t *params;   /* the fit's parameters for policy refits (borrowed); NULL: none */
  char metric[16];        /* the comparison's score; "": the kind's default (log_loss, wis) */
} lc_config;

/* Reads "log" and "refit" from config (both optional; "refit" needs "log").
 * Unknown keys, wrong types and values out of range are a 400 naming them;
 * so is a name in refit.params that kind's fit does not take. */
int lc_parse(const json_t *config, const md_kind *kind, lc_config *out, ts_err *err);

#endif
