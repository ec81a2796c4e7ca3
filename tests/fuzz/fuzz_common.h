/* fuzz_common.h - helpers shared by the libFuzzer targets in tests/fuzz and by
 * the unit test that replays their regressions (tests/unit/test_fuzz_regressions.c).
 *
 * Each target defines FUZZ_ENTRY (LLVMFuzzerTestOneInput by default); the
 * replay test includes every target with FUZZ_ENTRY renamed, so everything
 * here is static and guarded, and each target's own helpers carry its prefix.
 *
 * The model table: fuzz_models[] lists, per model kind, a config.json and a
 * function that writes its weights. The OIP targets run every decoded request
 * through every kind's infer, so covering a new kind is one line in the table
 * (plus its weights function). */
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

/* Every error must carry a known status and a non-empty message. */
static inline void fuzz_check_err(int rc, const ts_err *err) {
  if (!rc) return;
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

static inline int fuzz_w_dense(st_writer *w, const char *prefix, int layer, int64_t out, int64_t in,
                        ts_err *err) {
  float *v = tl_calloc((size_t)(out * in + out), sizeof(float));
  if (!v) return ts_errf(err, TS_ENOMEM, "out of memory");
  for (int64_t i = 0; i < out * in + out; i++) v[i] = (float)((i * 7919) % 13 - 6) / 8.0f;
  char name[96];
  int64_t ws[2] = {out, in};
  snprintf(name, sizeof name, "%slayers.%d.weight", prefix, layer);
  int rc = st_writer_add(w, name, TS_FP32, 2, ws, v, err);
  snprintf(name, sizeof name, "%slayers.%d.bias", prefix, layer);
  if (!rc) rc = st_writer_add(w, name, TS_FP32, 1, &out, v + out * in, err);
  tl_free(v);
  return rc;
}

/* mlp: 4 features -> 8 (relu) -> 3 (softmax) */
static inline int fuzz_weights_mlp(st_writer *w, ts_err *err) {
  int rc = fuzz_w_dense(w, "", 0, 8, 4, err);
  return rc ? rc : fuzz_w_dense(w, "", 1, 3, 8, err);
}

typedef struct fuzz_model_def {
  const char *kind;
  const char *config;
  fuzz_weights_fn weights;
} fuzz_model_def;

/* One line per kind. */
static const fuzz_model_def fuzz_models[] = {
    {"mlp", "{\"kind\": \"mlp\", \"activations\": [\"relu\", \"softmax\"]}", fuzz_weights_mlp},
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

/* Loads every model of the table once per process (weights go through a
 * temporary file because the loader maps files). */
static inline void fuzz_models_init(void) {
  if (fuzz_models_ready) return;
  fuzz_models_ready = 1;
  for (size_t i = 0; i < FUZZ_N_MODELS; i++) {
    ts_err err = {0};
    fuzz_model *m = &fuzz_loaded[i];
    char path[] = "/tmp/tallyd-fuzz-weights-XXXXXX";
    int fd = mkstemp(path);
    if (fd < 0) abort();
    close(fd);
    st_writer *w = st_writer_new();
    if (!w || fuzz_models[i].weights(w, &err) || st_writer_save(w, path, &err))
      fuzz_die(fuzz_models[i].kind, &err);
    st_writer_free(w);
    if (st_open(&m->weights, path, &err)) fuzz_die(path, &err);
    unlink(path); /* the mapping stays valid */
    json_error_t je;
    m->config = json_loads(fuzz_models[i].config, 0, &je);
    if (!m->config) abort();
    m->kind = md_kind_find(fuzz_models[i].kind);
    if (!m->kind) abort();
    md_load_ctx ctx = {.model_name = fuzz_models[i].kind, .version = 1, .version_dir = "/nonexistent",
                       .config = m->config, .weights = m->weights};
    if (m->kind->load(&ctx, &m->state, &err)) fuzz_die("load", &err);
  }
}

/* Runs a decoded request through every kind's infer and the encoder, as the
 * server would; errors must be well-formed, outputs fully readable. */
static inline void fuzz_infer_all(const oip_request *req) {
  fuzz_models_init();
  for (size_t i = 0; i < FUZZ_N_MODELS; i++) {
    fuzz_model *m = &fuzz_loaded[i];
    ts_err err = {0};
    md_call call;
    md_call_init(&call);
    call.inputs = &req->inputs;
    call.params = req->params;
    call.model_name = fuzz_models[i].kind;
    call.version = 1;
    int rc = m->kind->infer(m->state, &call, &err);
    fuzz_check_err(rc, &err);
    if (!rc) {
      for (int k = 0; k < call.outputs.n; k++) fuzz_touch(&call.outputs.items[k]);
      sbuf b;
      sbuf_init(&b);
      size_t json_len = 0;
      ts_err eerr = {0};
      rc = oip_encode(call.model_name, 1, req, &call.outputs, NULL, &b, &json_len, &eerr);
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
    md_call_free(&call);
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
