/* learn_int.h - what learn.c (rows, log, feedback) and candidate.c (refit,
 * shadow answers, decisions) share. Not a public face: learn.h is. */
#ifndef TALLYD_LEARN_INT_H
#define TALLYD_LEARN_INT_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>

#include "../models/learn_cfg.h"
#include "learn.h"
#include "rowlog.h"

/* What the loop knows of a kind: the feedback input, the scored output,
 * the metric. */
typedef struct lkind {
  const char *kind;
  const char *label_input; /* feedback and fit: "labels" / "targets" */
  const char *output;      /* the answer scored: "probability" / "quantiles" */
  const char *metric;      /* "log_loss" / "wis" */
  int integer_labels;
} lkind;

/* One logged row. `tens` is the tensor section of its log record: per
 * tensor u8 role (0 input), u8 name length, name, u8 dtype, u8 ndim, i64
 * dims (without the batch dimension), u32 byte count, the bytes. */
typedef struct lrow {
  struct lrow *hnext;
  char *id;
  double t; /* wall-clock seconds it was served */
  int64_t version;
  unsigned char *tens;
  size_t tens_len;
  float *out; /* the answer served: nout values */
  int nout;
  float *cand; /* the candidate's shadow answer; NULL: none */
  int64_t cand_version;
  int labelled;
  double label;
  int scored; /* counted in the candidate's comparison, with these losses */
  double loss_served, loss_cand;
} lrow;

typedef struct ldecision {
  int64_t version;
  char decision[16]; /* "promoted", "dropped", "replaced" */
  char why[200];
  double served, cand; /* mean scores */
  int64_t rows;
  double t;
} ldecision;

#define L_DECISIONS 8

typedef struct lmodel {
  struct lmodel *next;
  char *name;
  const lkind *lk;
  const char *metric; /* refit.metric or the kind's default (static strings) */
  int median;         /* the level 0.5's index (quantile models), -1 none */
  pthread_mutex_t mu;
  char *cfg_key;        /* "log" and "refit" as JSON text: the settings the state was built with */
  const void *cfg_seen; /* the config object and version last checked against cfg_key */
  int64_t cfg_seen_version;
  json_t *cfg_json;
  lc_config cfg;
  int K;           /* quantile levels in the config; 0 for ensembles */
  double *levels;  /* [K] */
  rl_store *store; /* NULL when the log could not open (log.reason says why) */
  char reason[TS_ERR_MSG];
  lrow **ring; /* arrival order, ring of cap */
  int64_t cap, head, count;
  lrow **buckets;
  size_t nb;
  int64_t labelled;
  int64_t labels_since_refit;
  double last_refit; /* monotonic */
  int refit_running;
  /* counters */
  uint64_t rows_logged, rows_skipped, feedback_accepted, feedback_unknown;
  uint64_t refits, refit_failures, promoted, dropped, shadow_rows, shadow_skipped, shadow_failed;
  /* the candidate under comparison */
  repo_ver *cand;
  int64_t cand_version;
  double cand_created; /* wall clock */
  int64_t cand_window;
  int64_t n_cmp;
  double sum_served, sum_cand;
  ldecision decisions[L_DECISIONS];
  int n_decisions;
} lmodel;

struct learn {
  repo_t *repo;
  pool_t *pool;
  pthread_mutex_t mu; /* the list */
  lmodel *models;
  atomic_int jobs; /* shadow and refit jobs queued or running */
};

double learn_wall(void);
double learn_mono(void);
/* The model's state for ver, created or brought up to date with its config;
 * NULL when its kind is not one the loop learns. Never freed before
 * learn_free. */
lmodel *learn_model(learn_t *L, repo_ver *ver);
lrow *lm_find(lmodel *m, const char *id);
/* The loss of one answer (nout values) for label y. */
double lm_score(const lmodel *m, const float *out, int nout, double y);

/* candidate.c */
/* Queues the candidate's answer to a logged request (called with m->mu held). */
void cand_shadow(learn_t *L, lmodel *m, const ts_list *inputs, char **ids, int64_t B);
/* Adds a labelled row to the comparison (m->mu held). */
void cand_score_row(lmodel *m, lrow *r);
/* Decides on the candidate when its rows or age say so; does the version.json
 * write and the rescan outside m->mu. Returns the decision as JSON or NULL. */
json_t *cand_decide(learn_t *L, lmodel *m);
/* A refit due by policy (labels since the last, or time): queued as a job. */
void cand_policy(learn_t *L, lmodel *m);
/* At a model's first sight: the newest pending candidate on disk resumes. */
void cand_resume(learn_t *L, lmodel *m);
json_t *cand_state_json(lmodel *m);
/* 1 when two rows' inputs have the same names, types and shapes. */
int learn_same_inputs(const lrow *a, const lrow *b);
/* The rows (all of one input shape, in the order given) as request tensors:
 * every input [n, ...] and the labels / targets [n] appended to list; with
 * served, the answers they were given ([n, nout] FP32, the kind's output
 * name) appended to it. m->mu held. */
int learn_rows_tensors(lmodel *m, lrow **rows, int64_t n, ts_list *list, ts_list *served,
                       ts_err *err);
void cand_release(lmodel *m);

#endif
