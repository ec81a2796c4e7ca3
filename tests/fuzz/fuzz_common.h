/* fuzz_common.h - helpers shared by the libFuzzer targets in tests/fuzz and by
 * the unit test that replays their regressions (tests/unit/test_fuzz_regressions.c).
 *
 * Each target defines FUZZ_ENTRY (LLVMFuzzerTestOneInput by default); the
 * replay test includes every target with FUZZ_ENTRY renamed, so everything
 * here is static and guarded, and each target's own helpers carry its prefix.
 *
 * The model table: fuzz_models[] lists tiny in-memory models, at least one per
 * kind (mlp, ensemble, quantile_ensemble, attention, transformer), each with
 * a config.json and a function that writes its weights. The OIP targets run
 * every decoded request through every model's infer, fit, evaluate,
 * calibrate and session functions, so covering a new kind is one line in
 * the table (plus its weights function). */
#ifndef TALLYD_FUZZ_COMMON_H
#define TALLYD_FUZZ_COMMON_H

#include <jansson.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../../daemon/base/fsutil.h"
#include "../../daemon/base/mem.h"
#include "../../daemon/base/safetensors.h"
#include "../../daemon/base/sbuf.h"
#include "../../daemon/models/model.h"
#include "../../daemon/server/oip.h"

#ifndef FUZZ_ENTRY
#define FUZZ_ENTRY LLVMFuzzerTestOneInput
#endif

/* Abort on a broken invariant: libFuzzer records the input as a crash. */
#define FUZZ_ASSERT(c)                                                              \
  do {                                                                              \
    if (!(c)) {                                                                     \
      fprintf(stderr, "fuzz invariant failed: %s (%s:%d)\n", #c, __FILE__, __LINE__); \
      abort();                                                                      \
    }                                                                               \
  } while (0)

/* TALLYD_FUZZ_VERBOSE=1 prints every error, to see which paths a seed reaches. */
static inline int fuzz_verbose(void) {
  static int v = -1;
  if (v < 0) v = getenv("TALLYD_FUZZ_VERBOSE") != NULL;
  return v;
}

/* Every error must carry a known status and a non-empty message. */
static inline void fuzz_check_err(int rc, const ts_err *err) {
  if (!rc) return;
  if (fuzz_verbose()) fprintf(stderr, "  error %d: %s\n", rc, err->msg);
  FUZZ_ASSERT(rc < 0 && -rc < TS_STATUS_COUNT);
  FUZZ_ASSERT(err->msg[0] != 0);
  FUZZ_ASSERT(memchr(err->msg, 0, sizeof err->msg) != NULL);
}

/* Reads every byte of a tensor, so that ASan sees an out-of-bounds borrow. */
static inline unsigned fuzz_touch(const ts_tensor *t) {
  unsigned s = 0;
  const unsigned char *p = t->data;
  for (size_t i = 0; i < t->nbytes; i++) s += p[i];
  return s;
}

/* ---- the model table ---------------------------------------------------- */

typedef int (*fuzz_weights_fn)(st_writer *w, ts_err *err);

/* One FP32 tensor of small deterministic values in [-0.75, 0.75]. */
static inline int fuzz_w_tensor(st_writer *w, const char *name, int ndim, const int64_t *shape,
                                ts_err *err) {
  int64_t n = 1;
  for (int i = 0; i < ndim; i++) n *= shape[i];
  float *v = tl_calloc((size_t)(n ? n : 1), sizeof(float));
  if (!v) return ts_errf(err, TS_ENOMEM, "out of memory");
  for (int64_t i = 0; i < n; i++) v[i] = (float)((i * 7919) % 13 - 6) / 8.0f;
  int rc = st_writer_add(w, name, TS_FP32, ndim, shape, v, err);
  tl_free(v);
  return rc;
}

static inline int fuzz_w_dense(st_writer *w, const char *prefix, int layer, int64_t out, int64_t in,
                               ts_err *err) {
  char name[96];
  int64_t ws[2] = {out, in};
  snprintf(name, sizeof name, "%slayers.%d.weight", prefix, layer);
  int rc = fuzz_w_tensor(w, name, 2, ws, err);
  snprintf(name, sizeof name, "%slayers.%d.bias", prefix, layer);
  return rc ? rc : fuzz_w_tensor(w, name, 1, &out, err);
}

/* mlp: 4 features -> 8 (relu) -> 3 (softmax); also the quantile model's
 * hosted base (3 quantile levels) */
static inline int fuzz_weights_mlp(st_writer *w, ts_err *err) {
  int rc = fuzz_w_dense(w, "", 0, 8, 4, err);
  return rc ? rc : fuzz_w_dense(w, "", 1, 3, 8, err);
}

/* mlp1: 4 features -> 8 (relu) -> 1 logit; the ensemble's hosted members */
static inline int fuzz_weights_mlp1(st_writer *w, ts_err *err) {
  int rc = fuzz_w_dense(w, "", 0, 8, 4, err);
  return rc ? rc : fuzz_w_dense(w, "", 1, 1, 8, err);
}

/* quantile_ensemble: the linear base "lin" over 4 features, 3 levels */
static inline int fuzz_weights_quantile(st_writer *w, ts_err *err) {
  int64_t ws[2] = {3, 4}, bs[1] = {3};
  int rc = fuzz_w_tensor(w, "bases.lin.weight", 2, ws, err);
  return rc ? rc : fuzz_w_tensor(w, "bases.lin.bias", 1, bs, err);
}

/* transformer: GPT-2 layout, 1 layer, 2 heads of 2, vocabulary 8, 16
 * positions, MLP width 8 */
static inline int fuzz_weights_transformer(st_writer *w, ts_err *err) {
  static const struct {
    const char *name;
    int ndim;
    int64_t d0, d1;
  } t[] = {{"wte.weight", 2, 8, 4},           {"wpe.weight", 2, 16, 4},
           {"ln_f.weight", 1, 4, 0},          {"ln_f.bias", 1, 4, 0},
           {"h.0.ln_1.weight", 1, 4, 0},      {"h.0.ln_1.bias", 1, 4, 0},
           {"h.0.attn.c_attn.weight", 2, 4, 12}, {"h.0.attn.c_attn.bias", 1, 12, 0},
           {"h.0.attn.c_proj.weight", 2, 4, 4},  {"h.0.attn.c_proj.bias", 1, 4, 0},
           {"h.0.ln_2.weight", 1, 4, 0},      {"h.0.ln_2.bias", 1, 4, 0},
           {"h.0.mlp.c_fc.weight", 2, 4, 8},  {"h.0.mlp.c_fc.bias", 1, 8, 0},
           {"h.0.mlp.c_proj.weight", 2, 8, 4}, {"h.0.mlp.c_proj.bias", 1, 4, 0}};
  int rc = 0;
  for (size_t i = 0; i < sizeof t / sizeof *t && !rc; i++) {
    int64_t sh[2] = {t[i].d0, t[i].d1};
    rc = fuzz_w_tensor(w, t[i].name, t[i].ndim, sh, err);
  }
  return rc;
}

typedef struct fuzz_model_def {
  const char *name; /* the model's name for the fuzz host */
  const char *kind;
  const char *config;
  fuzz_weights_fn weights; /* NULL: no model.safetensors */
} fuzz_model_def;

/* One line per model; every kind appears at least once. The ensemble's
 * members h1..h3 and the quantile model's base q1 are served by the fuzz
 * host from the mlp1 and mlp lines, so hosted members run too. Members and
 * bases come first: the host finds them by index. */
static const fuzz_model_def fuzz_models[] = {
    {"mlp", "mlp", "{\"kind\": \"mlp\", \"activations\": [\"relu\", \"softmax\"]}",
     fuzz_weights_mlp},
    {"mlp1", "mlp", "{\"kind\": \"mlp\", \"activations\": [\"relu\", \"none\"]}",
     fuzz_weights_mlp1},
    {"ensemble", "ensemble",
     "{\"kind\": \"ensemble\", \"member_output\": \"logit\", \"classes\": 1, \"families\": ["
     "{\"name\": \"a\", \"members\": [{\"model\": \"h1\"}, {\"model\": \"h2\"}]},"
     "{\"name\": \"b\", \"members\": [{\"model\": \"h3\"}]}]}",
     NULL},
    {"ensemble_ext", "ensemble",
     "{\"kind\": \"ensemble\", \"member_output\": \"probability\", \"classes\": 3, \"families\": ["
     "{\"name\": \"a\", \"members\": [{\"external\": \"x1\"}, {\"external\": \"x2\"}]},"
     "{\"name\": \"b\", \"members\": [{\"external\": \"x3\"}]}]}",
     NULL},
    {"quantile", "quantile_ensemble",
     "{\"kind\": \"quantile_ensemble\", \"levels\": [0.1, 0.5, 0.9], \"features\": 4,"
     " \"bases\": [{\"model\": \"q1\"}, {\"linear\": \"lin\"}, {\"external\": \"e1\"},"
     " {\"external\": \"e2\"}], \"monotone\": \"isotonic\"}",
     fuzz_weights_quantile},
    {"quantile_ext", "quantile_ensemble",
     "{\"kind\": \"quantile_ensemble\", \"levels\": [0.25, 0.5, 0.75],"
     " \"bases\": [{\"external\": \"e1\"}, {\"external\": \"e2\"}],"
     " \"aggregator\": {\"granularity\": \"fine\", \"scope\": \"global\", \"simplex\": false}}",
     NULL},
    {"attention", "attention", "{\"kind\": \"attention\", \"max_sequence_length\": 64}", NULL},
    {"transformer", "transformer",
     "{\"kind\": \"transformer\", \"n_layer\": 1, \"n_head\": 2, \"n_embd\": 4, \"vocab_size\": 8,"
     " \"n_positions\": 16}",
     fuzz_weights_transformer},
};
#define FUZZ_N_MODELS (sizeof fuzz_models / sizeof *fuzz_models)

typedef struct fuzz_model {
  const md_kind *kind;
  void *state;
  st_file *weights;
  json_t *config;
} fuzz_model;

static fuzz_model fuzz_loaded[FUZZ_N_MODELS];
static int fuzz_models_ready;

static inline void fuzz_die(const char *what, const ts_err *err) {
  fprintf(stderr, "fuzz setup: %s: %s\n", what, err->msg);
  abort();
}

/* The fuzz host: h1..h3 are mlp1 (one logit), q1 is mlp (three values);
 * anything else is unknown, as a missing repository model would be. */
static int fuzz_host_acquire(md_host *h, const char *model, void **handle, const md_kind **kind,
                             void **state, ts_err *err) {
  (void)h;
  int idx = -1;
  if (model[0] == 'h' && model[1] >= '1' && model[1] <= '3' && !model[2]) idx = 1;
  if (strcmp(model, "q1") == 0) idx = 0;
  if (idx < 0 || !fuzz_loaded[idx].state)
    return ts_errf(err, TS_ENOTFOUND, "unknown model '%s'", model);
  *handle = &fuzz_loaded[idx];
  *kind = fuzz_loaded[idx].kind;
  *state = fuzz_loaded[idx].state;
  return 0;
}
static void fuzz_host_release(md_host *h, void *handle) {
  (void)h;
  (void)handle;
}
static md_host fuzz_host = {.acquire = fuzz_host_acquire, .release = fuzz_host_release};

/* Loads every model of the table once per process (weights go through a
 * temporary file because the loader maps files). */
static inline void fuzz_models_init(void) {
  if (fuzz_models_ready) return;
  fuzz_models_ready = 1;
  for (size_t i = 0; i < FUZZ_N_MODELS; i++) {
    ts_err err = {0};
    fuzz_model *m = &fuzz_loaded[i];
    if (fuzz_models[i].weights) {
      char path[] = "/tmp/tallyd-fuzz-weights-XXXXXX";
      int fd = mkstemp(path);
      if (fd < 0) abort();
      close(fd);
      st_writer *w = st_writer_new();
      if (!w || fuzz_models[i].weights(w, &err) || st_writer_save(w, path, &err))
        fuzz_die(fuzz_models[i].name, &err);
      st_writer_free(w);
      if (st_open(&m->weights, path, &err)) fuzz_die(path, &err);
      unlink(path); /* the mapping stays valid */
    }
    json_error_t je;
    m->config = json_loads(fuzz_models[i].config, 0, &je);
    if (!m->config) fuzz_die(fuzz_models[i].name, &(ts_err){.msg = "config is not JSON"});
    m->kind = md_kind_find(fuzz_models[i].kind);
    if (!m->kind) abort();
    md_load_ctx ctx = {.model_name = fuzz_models[i].name, .version = 1,
                       .version_dir = "/nonexistent", .config = m->config,
                       .weights = m->weights, .host = &fuzz_host};
    if (m->kind->load(&ctx, &m->state, &err)) fuzz_die(fuzz_models[i].name, &err);
  }
}

/* Checks what a kind's function left in the call: a well-formed error, or
 * outputs that are fully readable and encode to JSON that parses, or a
 * result object that serialises. */
static inline void fuzz_check_call(int rc, const ts_err *err, const oip_request *req,
                                   md_call *call, int infer) {
  fuzz_check_err(rc, err);
  if (rc) return;
  if (!infer) {
    if (call->result) {
      char *s = json_dumps(call->result, JSON_COMPACT);
      FUZZ_ASSERT(s != NULL);
      free(s);
    }
    return;
  }
  for (int k = 0; k < call->outputs.n; k++) fuzz_touch(&call->outputs.items[k]);
  sbuf b;
  sbuf_init(&b);
  size_t json_len = 0;
  ts_err eerr = {0};
  rc = oip_encode(call->model_name, 1, req, &call->outputs, NULL, &b, &json_len, &eerr);
  fuzz_check_err(rc, &eerr);
  if (!rc) {
    /* the JSON part must parse */
    json_error_t je;
    json_t *j = json_loadb(b.data, json_len ? json_len : b.len, 0, &je);
    FUZZ_ASSERT(j != NULL);
    json_decref(j);
  }
  sbuf_free(&b);
}

/* Runs a decoded request through every model's infer, fit, evaluate and
 * calibrate (where the kind has them) and, for kinds with sessions, through
 * a session opened with the request's parameters, as the server would.
 * Fit and the others get a 20 ms deadline, so that a request asking for a
 * million epochs exercises the deadline checks instead of stalling the
 * fuzzer; the new weights of a fit are dropped (md_call_free). */
static inline void fuzz_infer_all(const oip_request *req) {
  fuzz_models_init();
  for (size_t i = 0; i < FUZZ_N_MODELS; i++) {
    fuzz_model *m = &fuzz_loaded[i];
    int (*fns[4])(void *, md_call *, ts_err *) = {m->kind->infer, m->kind->fit,
                                                  m->kind->evaluate, m->kind->calibrate};
    for (int f = 0; f < 4; f++) {
      if (!fns[f]) continue;
      ts_err err = {0};
      md_call call;
      md_call_init(&call);
      call.inputs = &req->inputs;
      call.params = req->params;
      call.host = &fuzz_host;
      call.model_name = fuzz_models[i].name;
      call.version = 1;
      if (f) call.deadline = md_now() + 0.02;
      int rc = fns[f](m->state, &call, &err);
      if (fuzz_verbose()) fprintf(stderr, "%s fn %d: rc %d\n", fuzz_models[i].name, f, rc);
      fuzz_check_call(rc, &err, req, &call, f == 0);
      md_call_free(&call);
    }
    if (m->kind->session_open) {
      ts_err err = {0};
      void *sess = NULL;
      size_t bytes = 0;
      int rc = m->kind->session_open(m->state, req->params, &sess, &bytes, &err);
      fuzz_check_err(rc, &err);
      for (int chunk = 0; !rc && chunk < 2; chunk++) {
        md_call call;
        md_call_init(&call);
        call.inputs = &req->inputs;
        call.params = chunk ? NULL : req->params;
        call.model_name = fuzz_models[i].name;
        call.version = 1;
        int64_t before = m->kind->session_position(sess);
        int r2 = m->kind->session_infer(m->state, sess, &call, &bytes, &err);
        fuzz_check_call(r2, &err, req, &call, 1);
        /* a refused chunk leaves the session where it was; an answered one
         * moves it forward */
        if (r2) FUZZ_ASSERT(m->kind->session_position(sess) == before);
        else FUZZ_ASSERT(m->kind->session_position(sess) > before);
        md_call_free(&call);
      }
      if (sess) m->kind->session_free(sess);
    }
  }
}

/* Decodes body[0..len) with json_len (0: all JSON), checks, runs the models. */
static inline void fuzz_decode_and_infer(const char *body, size_t len, size_t json_len) {
  oip_request req;
  ts_err err = {0};
  /* 1M elements per tensor: large enough for real shapes, small enough that
   * a hostile shape cannot exhaust the fuzzer's memory. */
  int rc = oip_decode(body, len, json_len, 1 << 20, &req, &err);
  fuzz_check_err(rc, &err);
  if (!rc) {
    for (int k = 0; k < req.inputs.n; k++) {
      const ts_tensor *t = &req.inputs.items[k];
      int64_t n = 0;
      ts_err e2;
      FUZZ_ASSERT(ts_numel(t->shape, t->ndim, &n, &e2) == 0);
      if (t->dtype != TS_BYTES) FUZZ_ASSERT(t->nbytes == (size_t)n * ts_dtype_size(t->dtype));
      fuzz_touch(t);
    }
    fuzz_infer_all(&req);
  }
  oip_request_free(&req);
}

#endif
