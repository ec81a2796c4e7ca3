/* transformer.c - model kind `transformer`: a GPT-2-layout decoder that
 * scores token sequences, statelessly (infer) or through KV-cache sessions.
 *
 * See transformer.h for the model and its memory. Infer: input_ids [B, L]
 * (INT32, INT64, or any numeric dtype holding integers) -> token_logprobs
 * [B, L-1], nll [B], next_token_logits [B, V], FP32. Request parameters
 * "attention", "p", "offset_rows" override config.json; "query_offset" is
 * checked (read_query_offset says why only 0, or a session's position).
 *
 * One forward pass (tf_run) serves both paths. Without a session the keys
 * and values are read in place from the fused [L, 3E] projection; with one,
 * the new rows are appended to the session's per-layer cache and the kernel
 * reads keys 0..pos+n-1 with query_offset = pos. A session's visible state
 * (position, cache contents up to it, last hidden row) changes only after a
 * chunk has been computed completely, so a chunk that fails (a deadline, a
 * bad token, memory) leaves the session as it was. */
#include "transformer.h"

#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>

#include "../base/log.h"
#include "../base/mem.h"
#include "../base/safetensors.h"
#include "../kernels/sgemm.h"
#include "../kernels/vmath.h"
#include "../methods/sample.h"
#include "generate.h"
#include "attention.h"

typedef struct tf_layer {
  ts_tensor ln1_w, ln1_b, attn_w, attn_b, proj_w, proj_b;
  ts_tensor ln2_w, ln2_b, fc_w, fc_b, fcp_w, fcp_b;
} tf_layer;

struct tf_model {
  int n_layer, H, E, d, F;
  int64_t V, P;
  float eps;
  int rope;
  int kv_f16; /* "kv_cache_dtype": "float16": sequences keep K and V as float16 */
  double theta;
  double *inv_freq; /* [d/2]: theta^(-2m/d), RoPE only */
  attn_params attn; /* config.json's variant, p and offset rows */
  ts_tensor wte, wpe, lnf_w, lnf_b;
  tf_layer *layers;
  tk_tokenizer *tok;          /* NULL: no text endpoints */
  char tok_error[TS_ERR_MSG]; /* why tokenizer files found beside the weights were not used */
  pthread_mutex_t engine_mu;
  struct gen_engine *engine; /* made by the first generation (tf_engine) */
};

/* A session's state. n_layer is kept because session_free has no model.
 * Each layer's keys and values live in an attn_kvc, packed the way the
 * attention kernels read them, and new rows are appended in place: a decode
 * step reads the cache once and never copies it. */
struct tf_seq {
  int n_layer;
  int64_t pos, cap; /* cap: rows every layer's cache has room for */
  attn_kvc *kv;     /* [n_layer] */
  float *last;      /* [E] final hidden state of token pos-1 */
  attn_params attn;
};

/* ---- loading ------------------------------------------------------------- */

static int cfg_int(const json_t *cfg, const char *key, int64_t lo, int64_t hi, int64_t *out,
                   ts_err *err) {
  json_t *v = json_object_get(cfg, key);
  if (!v) return ts_errf(err, TS_EINVAL, "config.json: missing '%s'", key);
  if (md_param_int(cfg, key, 0, out, err) || *out < lo || *out > hi)
    return ts_errf(err, TS_EINVAL, "config.json: '%s' must be an integer in [%lld, %lld]", key,
                   (long long)lo, (long long)hi);
  return 0;
}

static int get_w(st_file *w, const char *prefix, const char *name, int ndim, int64_t d0, int64_t d1,
                 ts_tensor *out, ts_err *err) {
  char full[160];
  snprintf(full, sizeof full, "%s%s", prefix, name);
  int64_t shape[2] = {d0, d1};
  return st_get_f32(w, full, ndim, shape, out, err);
}

static void free_weights(tf_model *m) {
  if (m->layers)
    for (int i = 0; i < m->n_layer; i++) {
      ts_tensor *t = &m->layers[i].ln1_w;
      for (int j = 0; j < 12; j++) ts_free(&t[j]);
    }
  ts_free(&m->wte);
  ts_free(&m->wpe);
  ts_free(&m->lnf_w);
  ts_free(&m->lnf_b);
}

void tf_free(tf_model *m) {
  if (!m) return;
  if (m->engine) gen_engine_free(m->engine);
  pthread_mutex_destroy(&m->engine_mu);
  free_weights(m);
  tk_free(m->tok);
  tl_free(m->layers);
  tl_free(m->inv_freq);
  tl_free(m);
}

static int read_config(tf_model *m, const json_t *cfg, ts_err *err) {
  int64_t v;
  int rc;
  if (!json_is_object(cfg)) return ts_errf(err, TS_EINVAL, "config.json is not a JSON object");
  if ((rc = md_config_check_common(cfg, err))) return rc;
  if ((rc = cfg_int(cfg, "n_layer", 1, 4096, &v, err))) return rc;
  m->n_layer = (int)v;
  if ((rc = cfg_int(cfg, "n_head", 1, 4096, &v, err))) return rc;
  m->H = (int)v;
  if ((rc = cfg_int(cfg, "n_embd", 1, 1 << 20, &v, err))) return rc;
  m->E = (int)v;
  if ((rc = cfg_int(cfg, "vocab_size", 1, INT_MAX, &m->V, err))) return rc;
  if ((rc = cfg_int(cfg, "n_positions", 1, INT64_C(1) << 40, &m->P, err))) return rc;
  if (m->E % m->H)
    return ts_errf(err, TS_EINVAL, "config.json: n_embd %d is not a multiple of n_head %d", m->E,
                   m->H);
  m->d = m->E / m->H;
  double eps;
  if (md_param_double(cfg, "layer_norm_epsilon", 1e-5, &eps, err) || !(eps > 0) || eps > 1)
    return ts_errf(err, TS_EINVAL, "config.json: 'layer_norm_epsilon' must be a number in (0, 1]");
  m->eps = (float)eps;
  const char *pos;
  if (md_param_string(cfg, "positions", "learned", &pos, err) ||
      (strcmp(pos, "learned") != 0 && strcmp(pos, "rope") != 0))
    return ts_errf(err, TS_EINVAL, "config.json: 'positions' must be \"learned\" or \"rope\"");
  m->rope = strcmp(pos, "rope") == 0;
  if (md_param_double(cfg, "rope_theta", 10000.0, &m->theta, err) || !(m->theta > 1.0))
    return ts_errf(err, TS_EINVAL, "config.json: 'rope_theta' must be a number > 1");
  if (m->rope && m->d % 2)
    return ts_errf(err, TS_EINVAL, "config.json: RoPE needs an even head dimension, got %d", m->d);
  /* HF keys that would change the computation and that this kind does not do */
  const char *act;
  if (md_param_string(cfg, "activation_function", "gelu_new", &act, err) ||
      (strcmp(act, "gelu_new") != 0 && strcmp(act, "gelu_pytorch_tanh") != 0 &&
       strcmp(act, "gelu_fast") != 0))
    return ts_errf(err, TS_EINVAL,
                   "config.json: activation_function must be the tanh GELU (gelu_new, "
                   "gelu_pytorch_tanh or gelu_fast)");
  json_t *sc = json_object_get(cfg, "scale_attn_by_inverse_layer_idx");
  if (sc && json_is_true(sc))
    return ts_errf(err, TS_EINVAL, "config.json: scale_attn_by_inverse_layer_idx is not supported");
  const char *kvd;
  if (md_param_string(cfg, "kv_cache_dtype", "float32", &kvd, err) ||
      (strcmp(kvd, "float32") != 0 && strcmp(kvd, "float16") != 0))
    return ts_errf(err, TS_EINVAL,
                   "config.json: 'kv_cache_dtype' must be \"float32\" or \"float16\"");
  m->kv_f16 = strcmp(kvd, "float16") == 0;
  m->attn = attn_params_default(ATTN_SOFTMAX);
  return md_attn_params_read(cfg, "config.json", &m->attn, err);
}

int tf_load(const json_t *cfg, st_file *w, tf_model **out, ts_err *err) {
  *out = NULL;
  tf_model *m = tl_calloc(1, sizeof *m);
  if (!m) return ts_errf(err, TS_ENOMEM, "out of memory");
  pthread_mutex_init(&m->engine_mu, NULL);
  int rc = read_config(m, cfg, err);
  if (rc) goto fail;
  if (!w) {
    rc = ts_errf(err, TS_EINVAL, "the version has no model.safetensors");
    goto fail;
  }
  const char *pre = st_find(w, "transformer.wte.weight") >= 0 ? "transformer." : "";
  int64_t E = m->E;
  if ((rc = get_w(w, pre, "wte.weight", 2, m->V, E, &m->wte, err))) goto fail;
  if (m->rope) {
    m->inv_freq = tl_malloc(sizeof(double) * (size_t)(m->d / 2));
    if (!m->inv_freq) {
      rc = ts_errf(err, TS_ENOMEM, "out of memory");
      goto fail;
    }
    for (int i = 0; i < m->d / 2; i++)
      m->inv_freq[i] = pow(m->theta, -2.0 * (double)i / (double)m->d);
  } else if ((rc = get_w(w, pre, "wpe.weight", 2, -1, E, &m->wpe, err))) {
    goto fail;
  } else if (m->wpe.shape[0] < m->P) {
    rc = ts_errf(err, TS_EINVAL, "weights: wpe.weight has %lld rows, n_positions is %lld",
                 (long long)m->wpe.shape[0], (long long)m->P);
    goto fail;
  }
  if ((rc = get_w(w, pre, "ln_f.weight", 1, E, 0, &m->lnf_w, err)) ||
      (rc = get_w(w, pre, "ln_f.bias", 1, E, 0, &m->lnf_b, err)))
    goto fail;
  m->layers = tl_calloc((size_t)m->n_layer, sizeof *m->layers);
  if (!m->layers) {
    rc = ts_errf(err, TS_ENOMEM, "out of memory");
    goto fail;
  }
  for (int i = 0; i < m->n_layer && !rc; i++) {
    tf_layer *l = &m->layers[i];
    char p[64];
    snprintf(p, sizeof p, "%sh.%d.", pre, i);
    if ((rc = get_w(w, p, "ln_1.weight", 1, E, 0, &l->ln1_w, err)) ||
        (rc = get_w(w, p, "ln_1.bias", 1, E, 0, &l->ln1_b, err)) ||
        (rc = get_w(w, p, "attn.c_attn.weight", 2, E, 3 * E, &l->attn_w, err)) ||
        (rc = get_w(w, p, "attn.c_attn.bias", 1, 3 * E, 0, &l->attn_b, err)) ||
        (rc = get_w(w, p, "attn.c_proj.weight", 2, E, E, &l->proj_w, err)) ||
        (rc = get_w(w, p, "attn.c_proj.bias", 1, E, 0, &l->proj_b, err)) ||
        (rc = get_w(w, p, "ln_2.weight", 1, E, 0, &l->ln2_w, err)) ||
        (rc = get_w(w, p, "ln_2.bias", 1, E, 0, &l->ln2_b, err)) ||
        (rc = get_w(w, p, "mlp.c_fc.weight", 2, E, -1, &l->fc_w, err)))
      break;
    int64_t F = l->fc_w.shape[1];
    if (i == 0) m->F = (int)F;
    if (F < 1 || F != m->F || F > (1 << 24)) {
      rc = ts_errf(err, TS_EINVAL, "weights: %smlp.c_fc.weight has width %lld, layer 0 has %d", p,
                   (long long)F, m->F);
      break;
    }
    if ((rc = get_w(w, p, "mlp.c_fc.bias", 1, F, 0, &l->fc_b, err)) ||
        (rc = get_w(w, p, "mlp.c_proj.weight", 2, F, E, &l->fcp_w, err)) ||
        (rc = get_w(w, p, "mlp.c_proj.bias", 1, E, 0, &l->fcp_b, err)))
      break;
  }
  if (rc) goto fail;
  *out = m;
  return 0;
fail:
  tf_free(m);
  return rc;
}

int64_t tf_vocab(const tf_model *m) {
  return m->V;
}
attn_params tf_attn_defaults(const tf_model *m) {
  return m->attn;
}

/* ---- row-parallel helpers ------------------------------------------------ */

typedef struct rows_arg {
  const float *x;
  float *y;
  int64_t cols;
  const float *g, *b;
  float eps;
} rows_arg;

static void ln_range(void *arg, int64_t b, int64_t e) {
  rows_arg *a = arg;
  vm_layernorm_rows(a->x + b * a->cols, a->y + b * a->cols, e - b, a->cols, a->g, a->b, a->eps);
}

static void layernorm(pool_t *pool, const float *x, float *y, int64_t rows, int64_t cols,
                      const ts_tensor *g, const ts_tensor *b, float eps) {
  rows_arg a = {x, y, cols, g->data, b->data, eps};
  pool_parallel_for(pool, rows, 64, ln_range, &a);
}

static void gelu_range(void *arg, int64_t b, int64_t e) {
  rows_arg *a = arg;
  vm_gelu_tanh(a->y + b * a->cols, (e - b) * a->cols);
}

static void bias_gelu(pool_t *pool, float *h, int64_t rows, int64_t cols, const float *bias) {
  sg_add_bias(rows, cols, h, cols, bias);
  rows_arg a = {NULL, h, cols, NULL, NULL, 0};
  pool_parallel_for(pool, rows, 16, gelu_range, &a);
}

/* RoPE on the q and k thirds of qkv rows [n, 3E], token t at position pos0+t:
 * pairs (m, m + d/2) of each head rotated by pos * inv_freq[m], the angle and
 * its sine and cosine in double (positions reach 10^5 and beyond). */
typedef struct rope_arg {
  const tf_model *m;
  float *qkv;
  int64_t pos0;
  const int64_t *pos; /* per-row positions (a decode batch); NULL: pos0 + t */
} rope_arg;

static void rope_range(void *arg, int64_t b, int64_t e) {
  rope_arg *a = arg;
  const tf_model *m = a->m;
  int half = m->d / 2;
  for (int64_t t = b; t < e; t++) {
    double p = (double)(a->pos ? a->pos[t] : a->pos0 + t);
    float *row = a->qkv + t * 3 * (int64_t)m->E;
    for (int i = 0; i < half; i++) {
      double ang = p * m->inv_freq[i];
      float c = (float)cos(ang), s = (float)sin(ang);
      for (int part = 0; part < 2; part++) /* q, then k */
        for (int h = 0; h < m->H; h++) {
          float *x = row + part * m->E + h * m->d;
          float x1 = x[i], x2 = x[i + half];
          x[i] = x1 * c - x2 * s;
          x[i + half] = x2 * c + x1 * s;
        }
    }
  }
}

/* Log-probabilities of targets from hidden rows: logits of a chunk of rows
 * (rows x wte^T), each row's log-softmax, the target's entry. */
typedef struct score_arg {
  float *logits;
  int64_t V;
  const int64_t *targets;
  float *lp;
  const tf_top *top; /* NULL, or the k most likely ids of each row as well */
  int64_t row0;      /* the first row's index in top's arrays */
} score_arg;

static void score_range(void *arg, int64_t b, int64_t e) {
  score_arg *a = arg;
  for (int64_t r = b; r < e; r++) {
    float *row = a->logits + r * a->V;
    vm_log_softmax_rows(row, 1, a->V);
    a->lp[r] = row[a->targets[r]];
    if (a->top) {
      int64_t at = (a->row0 + r) * a->top->k;
      int64_t got = smp_top_ids(row, a->V, a->top->k, a->top->ids + at);
      for (int64_t i = 0; i < got; i++) a->top->lp[at + i] = row[a->top->ids[at + i]];
    }
  }
}

static void score_rows(const tf_model *m, pool_t *pool, const float *x, int64_t rows,
                       const int64_t *targets, float *lp, float *buf, const tf_top *top,
                       int64_t top_row0) {
  for (int64_t r0 = 0; r0 < rows; r0 += TF_SCORE_ROWS) {
    int64_t n = rows - r0 < TF_SCORE_ROWS ? rows - r0 : TF_SCORE_ROWS;
    sg_gemm(pool, 1, n, m->V, m->E, x + r0 * m->E, m->E, m->wte.data, m->E, 0.0f, buf, m->V);
    score_arg a = {buf, m->V, targets + r0, lp + r0, top, top_row0 + r0};
    pool_parallel_for(pool, n, 1, score_range, &a);
  }
}

/* ---- the forward pass ---------------------------------------------------- */

static int check_ids(const tf_model *m, const int64_t *ids, int64_t n, int64_t pos0, ts_err *err) {
  for (int64_t t = 0; t < n; t++)
    if (ids[t] < 0 || ids[t] >= m->V)
      return ts_errf(err, TS_EINVAL,
                     "input 'input_ids': token %lld at position %lld is outside the "
                     "vocabulary [0, %lld)",
                     (long long)ids[t], (long long)(pos0 + t), (long long)m->V);
  if (!m->rope && pos0 + n > m->P)
    return ts_errf(err, TS_EINVAL,
                   "input 'input_ids': %lld tokens, but this model's learned positions stop at "
                   "n_positions %lld",
                   (long long)(pos0 + n), (long long)m->P);
  return 0;
}

static int seq_reserve(const tf_model *m, tf_seq *s, int64_t need, ts_err *err) {
  if (need <= s->cap) return 0;
  /* Layers already grown when a later one fails just hold spare room; the
   * cache is valid up to s->cap in every layer either way. */
  for (int l = 0; l < m->n_layer; l++) {
    int rc = attn_kvc_reserve(&s->kv[l], need, err);
    if (rc) return rc;
  }
  s->cap = s->kv[0].cap;
  return 0;
}

/* Rows t = 0..n-1 of a fused [n, 3E] q|k|v projection become cache rows
 * row0 + t of layer li. */
static void seq_write(const tf_model *m, tf_seq *s, int li, int64_t row0, int64_t n,
                      const float *qkv) {
  int64_t E = m->E;
  attn_tensor k = {qkv + E, m->d, 3 * E}, v = {qkv + 2 * E, m->d, 3 * E};
  attn_kvc_write(&s->kv[li], row0, n, k, v);
}

/* Runs n new tokens at positions pos0..pos0+n-1 (pos0 = seq ? seq->pos : 0).
 * lp receives the log-probability of each new token that has a token before
 * it (n entries when seq->pos > 0, else n - 1); next_logits [V] the logits
 * after the last one. */
static int tf_run_top(const tf_model *m, pool_t *pool, const attn_params *prm, const int64_t *ids,
                      int64_t n, tf_seq *seq, float *lp, float *next_logits, const tf_top *top,
                      const md_call *c, tf_prof *prof, ts_err *err) {
  const int64_t E = m->E, E3 = 3 * E, pos0 = seq ? seq->pos : 0;
  int rc = check_ids(m, ids, n, pos0, err);
  if (rc) return rc;
  if (n < 1) return ts_errf(err, TS_EINVAL, "input 'input_ids': at least one token is needed");
  if (seq && (rc = seq_reserve(m, seq, pos0 + n, err))) return rc;
  int64_t mrows = n < TF_MLP_ROWS ? n : TF_MLP_ROWS;
  int64_t srows = n < TF_SCORE_ROWS ? n : TF_SCORE_ROWS;
  float *x = tl_malloc(sizeof(float) * (size_t)(n * E));
  float *a = tl_malloc(sizeof(float) * (size_t)(n * E));
  float *qkv = tl_malloc(sizeof(float) * (size_t)(n * E3));
  float *ao = tl_malloc(sizeof(float) * (size_t)(n * E));
  float *h = tl_malloc(sizeof(float) * (size_t)(mrows * m->F));
  /* logits of TF_SCORE_ROWS rows at a time, only when log-probabilities
   * are asked for (a generation prompt needs none but the last row's) */
  float *lg = lp ? tl_malloc(sizeof(float) * (size_t)(srows * m->V)) : NULL;
  if (!x || !a || !qkv || !ao || !h || (lp && !lg)) {
    rc = ts_errf(err, TS_ENOMEM, "out of memory for %lld tokens", (long long)n);
    goto out;
  }
  for (int64_t t = 0; t < n; t++) {
    const float *te = (const float *)m->wte.data + ids[t] * E;
    float *xr = x + t * E;
    if (m->rope) {
      memcpy(xr, te, sizeof(float) * (size_t)E);
    } else {
      const float *pe = (const float *)m->wpe.data + (pos0 + t) * E;
      for (int64_t i = 0; i < E; i++) xr[i] = te[i] + pe[i];
    }
  }
  attn_params ap = *prm;
  ap.causal = 1;
  ap.query_offset = pos0;
  for (int li = 0; li < m->n_layer; li++) {
    const tf_layer *L = &m->layers[li];
    layernorm(pool, x, a, n, E, &L->ln1_w, &L->ln1_b, m->eps);
    sg_gemm(pool, 0, n, E3, E, a, E, L->attn_w.data, E3, 0.0f, qkv, E3);
    sg_add_bias(n, E3, qkv, E3, L->attn_b.data);
    if (m->rope) {
      rope_arg ra = {m, qkv, pos0, NULL};
      pool_parallel_for(pool, n, 32, rope_range, &ra);
    }
    attn_tensor q = {qkv, m->d, E3};
    attn_out o = {ao, m->d, E};
    double t0 = prof ? md_now() : 0;
    if (seq) { /* appended in place; the kernels read the packed cache */
      seq_write(m, seq, li, pos0, n, qkv);
      rc = md_attn_kvc_forward(pool, &ap, m->H, n, pos0 + n, q, &seq->kv[li], o, err);
    } else {
      attn_tensor k = {qkv + E, m->d, E3}, v = {qkv + 2 * E, m->d, E3};
      rc = md_attn_forward(pool, &ap, m->H, m->H, n, n, m->d, m->d, q, k, v, o, err);
    }
    if (prof) prof->attn_s += md_now() - t0;
    if (rc) goto out;
    sg_gemm(pool, 0, n, E, E, ao, E, L->proj_w.data, E, 1.0f, x, E);
    sg_add_bias(n, E, x, E, L->proj_b.data);
    layernorm(pool, x, a, n, E, &L->ln2_w, &L->ln2_b, m->eps);
    for (int64_t r0 = 0; r0 < n; r0 += mrows) {
      int64_t r = n - r0 < mrows ? n - r0 : mrows;
      sg_gemm(pool, 0, r, m->F, E, a + r0 * E, E, L->fc_w.data, m->F, 0.0f, h, m->F);
      bias_gelu(pool, h, r, m->F, L->fc_b.data);
      sg_gemm(pool, 0, r, E, m->F, h, m->F, L->fcp_w.data, E, 1.0f, x + r0 * E, E);
      sg_add_bias(r, E, x + r0 * E, E, L->fcp_b.data);
    }
    if (c && (rc = md_check_deadline(c, err))) goto out;
  }
  layernorm(pool, x, a, n, E, &m->lnf_w, &m->lnf_b, m->eps);
  double t0 = prof ? md_now() : 0;
  int64_t k0 = 0;
  if (lp && seq && pos0 > 0) { /* the first new token, predicted from the cached last row */
    score_rows(m, pool, seq->last, 1, ids, lp, lg, top, 0);
    k0 = 1;
  }
  if (lp) score_rows(m, pool, a, n - 1, ids + 1, lp + k0, lg, top, k0);
  if (next_logits)
    sg_gemm(pool, 1, 1, m->V, E, a + (n - 1) * E, E, m->wte.data, E, 0.0f, next_logits, m->V);
  if (prof) prof->head_s += md_now() - t0;
  /* commit: only now does the session move, and only while its answer is
   * still wanted (a chunk answered 504 must not be fed twice by a retry) */
  if (seq && c && (rc = md_claim(c, err))) goto out;
  if (seq) {
    memcpy(seq->last, a + (n - 1) * E, sizeof(float) * (size_t)E);
    seq->pos += n;
  }
out:
  tl_free(x);
  tl_free(a);
  tl_free(qkv);
  tl_free(ao);
  tl_free(h);
  tl_free(lg);
  return rc;
}

static int tf_run(const tf_model *m, pool_t *pool, const attn_params *prm, const int64_t *ids,
                  int64_t n, tf_seq *seq, float *lp, float *next_logits, const md_call *c,
                  tf_prof *prof, ts_err *err) {
  return tf_run_top(m, pool, prm, ids, n, seq, lp, next_logits, NULL, c, prof, err);
}

int tf_score(const tf_model *m, pool_t *pool, const attn_params *prm, const int64_t *ids, int64_t L,
             float *lp, double *nll, float *next_logits, const md_call *c, tf_prof *prof,
             ts_err *err) {
  int rc = tf_run(m, pool, prm, ids, L, NULL, lp, next_logits, c, prof, err);
  if (rc) return rc;
  double s = 0;
  for (int64_t t = 0; t + 1 < L; t++) s -= lp[t];
  *nll = L > 1 ? s / (double)(L - 1) : 0.0;
  return 0;
}

/* ---- the kind ------------------------------------------------------------ */

static int load(const md_load_ctx *ctx, void **state, ts_err *err) {
  /* An HF GPT-2 config.json is taken as it is: no key check here. */
  tf_model *m;
  int rc = tf_load(ctx->config, ctx->weights, &m, err);
  if (rc) return rc;
  /* the tokenizer: config.json's "tokenizer", or files in the version
   * directory, then the model directory. Named in config.json, it must
   * load; found only as files beside the weights (an imported checkpoint's
   * vocabulary, say), a tokenizer that cannot serve this model leaves it
   * scoring token ids, and the text calls say why. */
  char model_dir[4096] = "";
  const char *slash = ctx->version_dir ? strrchr(ctx->version_dir, '/') : NULL;
  if (slash && (size_t)(slash - ctx->version_dir) < sizeof model_dir)
    snprintf(model_dir, sizeof model_dir, "%.*s", (int)(slash - ctx->version_dir),
             ctx->version_dir);
  int named = json_object_get(ctx->config, "tokenizer") != NULL;
  ts_err terr = {0};
  rc = tk_load(ctx->config, ctx->version_dir, model_dir[0] ? model_dir : NULL, &m->tok, &terr);
  if (!rc && m->tok && tk_vocab_size(m->tok) > m->V) {
    rc = ts_errf(&terr, TS_EINVAL,
                 "the tokenizer has %lld tokens but the model's vocab_size is %lld: every token "
                 "id must be a row of wte",
                 (long long)tk_vocab_size(m->tok), (long long)m->V);
    tk_free(m->tok);
    m->tok = NULL;
  }
  if (rc) {
    if (named) {
      if (err) *err = terr;
      tf_free(m);
      return rc;
    }
    memcpy(m->tok_error, terr.msg, sizeof m->tok_error);
    log_warn("model '%s' version %lld: no text calls (it scores token ids): %s",
             ctx->model_name ? ctx->model_name : "?", (long long)ctx->version, terr.msg);
  }
  *state = m;
  return 0;
}

const tk_tokenizer *tf_tokenizer(const tf_model *m) {
  return m->tok;
}

const char *tf_tokenizer_error(const tf_model *m) {
  return m->tok_error[0] ? m->tok_error : NULL;
}

int tf_engine(tf_model *m, pool_t *pool, const gen_config *cfg, gen_engine **out, ts_err *err) {
  pthread_mutex_lock(&m->engine_mu);
  int rc = 0;
  if (!m->engine) rc = gen_engine_new(m, pool, cfg, &m->engine, err);
  *out = m->engine;
  pthread_mutex_unlock(&m->engine_mu);
  return rc;
}

static void signature(void *state, md_sig *sig) {
  tf_model *m = state;
  memset(sig, 0, sizeof *sig);
  md_sig_add(sig, MD_IN, "input_ids", TS_INT64, 2, -1, -1, 0);
  md_sig_add(sig, MD_OUT, "token_logprobs", TS_FP32, 2, -1, -1, 0);
  md_sig_add(sig, MD_OUT, "nll", TS_FP32, 1, -1, 0, 0);
  md_sig_add(sig, MD_OUT, "next_token_logits", TS_FP32, 2, -1, m->V, 0);
}

/* input_ids [B, L] as int64; 400 for any other rank or a non-integer. */
static int read_ids(const md_call *c, int64_t **ids, int64_t *B, int64_t *L, ts_err *err) {
  const ts_tensor *t;
  int rc = md_input(c, "input_ids", &t, err);
  if (rc) return rc;
  char s[96];
  if (t->ndim != 2)
    return ts_errf(err, TS_EINVAL, "input 'input_ids': expected shape [B, L], got %s",
                   ts_shape_str(t->shape, t->ndim, s, sizeof s));
  if (t->shape[1] < 1)
    return ts_errf(err, TS_EINVAL, "input 'input_ids': at least one token is needed");
  *B = t->shape[0];
  *L = t->shape[1];
  return ts_to_i64(t, ids, err);
}

/* "query_offset" (api.md: the absolute position of the first query). Every
 * position-dependent part of the model reads absolute positions: the wpe
 * row, the RoPE angle, LSSA's N_i (the number of keys visible, = position
 * + 1) and LSSAR's offset rows. A position t > 0 therefore means "t tokens
 * came before", and their keys and values must be there: the kernels index
 * keys by absolute position and refuse query_offset + Lq > Lk, as the
 * attention kind does. A whole-sequence request holds no tokens before its
 * own (Lk = Lq = L), so its only sound offset is 0 (api.md's default Lk -
 * Lq). Honouring a larger one in part (shifting wpe rows or RoPE angles but
 * not N_i, or counting keys that are not there in N_i) would compute
 * something no sequence produces, so it is refused, pointing to sessions,
 * which hold the earlier tokens. A new session starts at 0 for the same
 * reason. In a session the offset is its position: a chunk may state it (a
 * guard against a lost or repeated chunk), and a mismatch is a conflict
 * with the session's state.
 * pos: the position the next token takes; chunk: a session's chunk. */
static int read_query_offset(const json_t *params, int64_t pos, int chunk, ts_err *err) {
  int64_t off;
  int rc = md_param_int(params, "query_offset", pos, &off, err);
  if (rc) return rc;
  if (off == pos) return 0;
  if (chunk)
    return ts_errf(err, TS_ECONFLICT,
                   "parameter 'query_offset' is %lld, but this session is at position %lld: its "
                   "next token goes there (a chunk lost or sent twice?); a session's positions "
                   "follow from the tokens fed to it",
                   (long long)off, (long long)pos);
  if (off < 0) return ts_errf(err, TS_EINVAL, "parameter 'query_offset' must be >= 0");
  return ts_errf(err, TS_EINVAL,
                 "parameter 'query_offset' %lld: a request without a session (and a new "
                 "session) holds no tokens before its own, so its first token is at position 0, "
                 "the only offset it accepts; to score tokens at position %lld, open a session "
                 "(POST /v2/models/{m}/sessions) and feed it the %lld tokens before them first",
                 (long long)off, (long long)off, (long long)off);
}

static int infer(void *state, md_call *c, ts_err *err) {
  tf_model *m = state;
  attn_params prm = m->attn;
  int rc = md_attn_params_read(c->params, "parameters", &prm, err);
  if (!rc) rc = read_query_offset(c->params, 0, 0, err);
  if (rc) return rc;
  int64_t *ids = NULL, B, L;
  if ((rc = read_ids(c, &ids, &B, &L, err))) return rc;
  for (int64_t b = 0; b < B && !rc; b++) rc = check_ids(m, ids + b * L, L, 0, err);
  int64_t s_lp[2] = {B, L - 1}, s_nll[1] = {B}, s_lg[2] = {B, m->V};
  float *lp = rc ? NULL : md_output(c, "token_logprobs", TS_FP32, 2, s_lp, err);
  float *nll = lp ? md_output(c, "nll", TS_FP32, 1, s_nll, err) : NULL;
  float *lg = nll ? md_output(c, "next_token_logits", TS_FP32, 2, s_lg, err) : NULL;
  if (!rc && !lg) rc = -TS_ENOMEM;
  for (int64_t b = 0; b < B && !rc; b++) {
    double v;
    rc = tf_score(m, c->pool, &prm, ids + b * L, L, lp + b * (L - 1), &v, lg + b * m->V, c, NULL,
                  err);
    nll[b] = (float)v;
  }
  tl_free(ids);
  return rc;
}

/* ---- sessions ------------------------------------------------------------ */

/* A session's memory as the allocator holds it (tl_held: headers and
 * rounding count; a fresh session is mostly those): the struct, the two
 * arrays of layer pointers, the last row, and each layer's keys and values. */
static size_t seq_bytes(const tf_model *m, const tf_seq *s) {
  size_t L = (size_t)m->n_layer, kv = 0;
  for (int l = 0; l < m->n_layer; l++) kv += attn_kvc_bytes(&s->kv[l]);
  return tl_held(sizeof *s) + tl_held(sizeof(attn_kvc) * L) +
         tl_held(sizeof(float) * (size_t)m->E) + kv;
}

static void seq_free(void *p);

static int session_open(void *state, const json_t *params, void **out, size_t *bytes, ts_err *err) {
  tf_model *m = state;
  attn_params prm = m->attn;
  int rc = md_attn_params_read(params, "parameters", &prm, err);
  if (!rc) rc = read_query_offset(params, 0, 0, err);
  if (rc) return rc;
  tf_seq *s = tf_seq_new(m, &prm);
  if (!s) return ts_errf(err, TS_ENOMEM, "out of memory");
  *out = s;
  *bytes = seq_bytes(m, s);
  return 0;
}

static int session_infer(void *state, void *sess, md_call *c, size_t *bytes, ts_err *err) {
  tf_model *m = state;
  tf_seq *s = sess;
  /* A chunk's "attention", "p" and "offset_rows" override the session's for
   * that chunk (as they override the model's in infer): the cache holds keys
   * and values, which do not depend on them. */
  attn_params prm = s->attn;
  int rc = md_attn_params_read(c->params, "parameters", &prm, err);
  if (!rc) rc = read_query_offset(c->params, s->pos, 1, err);
  if (rc) return rc;
  int64_t *ids = NULL, B, n;
  rc = read_ids(c, &ids, &B, &n, err);
  if (rc) return rc;
  if (B != 1) {
    tl_free(ids);
    return ts_errf(err, TS_EINVAL,
                   "input 'input_ids': a session takes one sequence, shape [1, n]; "
                   "got %lld rows",
                   (long long)B);
  }
  int64_t k = s->pos > 0 ? n : n - 1;
  int64_t s_lp[2] = {1, k}, s_nll[1] = {1}, s_lg[2] = {1, m->V};
  float *lp = md_output(c, "token_logprobs", TS_FP32, 2, s_lp, err);
  float *nll = lp ? md_output(c, "nll", TS_FP32, 1, s_nll, err) : NULL;
  float *lg = nll ? md_output(c, "next_token_logits", TS_FP32, 2, s_lg, err) : NULL;
  if (!lg) rc = -TS_ENOMEM;
  /* what a chunk whose answer overflows must leave as it was: the position
   * and the last hidden state (cache rows past pos are overwritten later) */
  int64_t pos0 = s->pos;
  float *last0 = rc ? NULL : tl_malloc(sizeof(float) * (size_t)m->E);
  if (!rc && !last0) rc = ts_errf(err, TS_ENOMEM, "out of memory");
  if (!rc) memcpy(last0, s->last, sizeof(float) * (size_t)m->E);
  if (!rc) rc = tf_run(m, c->pool, &prm, ids, n, s, lp, lg, c, NULL, err);
  if (!rc) {
    double sum = 0;
    for (int64_t i = 0; i < k; i++) sum -= lp[i];
    nll[0] = k > 0 ? (float)(sum / (double)k) : 0.0f;
    /* the rule of every answer (md_check_finite_outputs), checked here so
     * that a chunk refused for it does not advance the session */
    rc = md_check_finite_outputs(c, err);
    if (rc) {
      s->pos = pos0;
      memcpy(s->last, last0, sizeof(float) * (size_t)m->E);
    }
  }
  tl_free(last0);
  *bytes = seq_bytes(m, s);
  tl_free(ids);
  return rc;
}

static int64_t session_position(void *sess) {
  return ((tf_seq *)sess)->pos;
}

static void seq_free(void *p) {
  tf_seq *s = p;
  if (!s) return;
  for (int l = 0; s->kv && l < s->n_layer; l++) attn_kvc_free(&s->kv[l]);
  tl_free(s->kv);
  tl_free(s->last);
  tl_free(s);
}

static void free_state(void *state) {
  tf_free(state);
}

/* Request parameters (model.h): the same for a plain request, a new session
 * and a session's chunk. */
static const char *const tf_params[] = {"attention", "p", "offset_rows", "query_offset", NULL};

const md_kind md_kind_transformer = {.name = "transformer",
                                     .params = {[MD_OP_INFER] = tf_params,
                                                [MD_OP_SESSION_OPEN] = tf_params,
                                                [MD_OP_SESSION_INFER] = tf_params},
                                     .load = load,
                                     .signature = signature,
                                     .infer = infer,
                                     .session_open = session_open,
                                     .session_infer = session_infer,
                                     .session_position = session_position,
                                     .session_free = seq_free,
                                     .free = free_state};

/* ---- sequences for generation (transformer.h) ---------------------------- */

tf_seq *tf_seq_new(const tf_model *m, const attn_params *prm) {
  tf_seq *s = tl_calloc(1, sizeof *s);
  if (!s) return NULL;
  s->n_layer = m->n_layer;
  s->attn = prm ? *prm : m->attn;
  s->kv = tl_calloc((size_t)m->n_layer, sizeof *s->kv);
  s->last = tl_malloc(sizeof(float) * (size_t)m->E);
  if (!s->kv || !s->last) {
    seq_free(s);
    return NULL;
  }
  for (int l = 0; l < m->n_layer; l++) {
    if (m->kv_f16)
      attn_kvc_init_f16(&s->kv[l], m->H, m->d, m->d);
    else
      attn_kvc_init(&s->kv[l], m->H, m->d, m->d);
  }
  return s;
}

void tf_seq_free(tf_seq *s) {
  seq_free(s);
}
int64_t tf_seq_pos(const tf_seq *s) {
  return s->pos;
}
size_t tf_seq_bytes(const tf_model *m, const tf_seq *s) {
  return seq_bytes(m, s);
}

size_t tf_seq_bytes_for(const tf_model *m, int64_t tokens) {
  size_t L = (size_t)m->n_layer;
  return tl_held(sizeof(tf_seq)) + tl_held(sizeof(attn_kvc) * L) +
         tl_held(sizeof(float) * (size_t)m->E) +
         L * attn_kvc_bytes_for(m->H, m->d, m->d, m->kv_f16, tokens > 0 ? tokens : 1);
}

int64_t tf_max_positions(const tf_model *m) {
  return m->rope ? INT64_MAX : m->P;
}

tf_seq *tf_seq_fork(const tf_model *m, const tf_seq *s) {
  tf_seq *f = tf_seq_new(m, &s->attn);
  if (!f) return NULL;
  if (s->pos > 0) {
    ts_err e;
    if (seq_reserve(m, f, s->pos, &e)) {
      seq_free(f);
      return NULL;
    }
    for (int l = 0; l < m->n_layer; l++)
      if (attn_kvc_copy(&f->kv[l], &s->kv[l], s->pos, &e)) {
        seq_free(f);
        return NULL;
      }
    memcpy(f->last, s->last, sizeof(float) * (size_t)m->E);
  }
  f->pos = s->pos;
  return f;
}

int tf_prefill(const tf_model *m, pool_t *pool, tf_seq *s, const int64_t *ids, int64_t n, float *lp,
               float *next_logits, const tf_top *top, const md_call *c, ts_err *err) {
  /* Without lp (and top) no row is scored against the vocabulary, and
   * without next_logits the LM head does not run at all: a prompt's chunks
   * before its last cost the transformer's layers only. */
  float *lpb = lp;
  if (!lpb && top) lpb = tl_malloc(sizeof(float) * (size_t)(n > 0 ? n : 1));
  int rc = top && !lpb
               ? ts_errf(err, TS_ENOMEM, "out of memory for %lld tokens", (long long)n)
               : tf_run_top(m, pool, &s->attn, ids, n, s, lpb, next_logits, top, c, NULL, err);
  if (lpb != lp) tl_free(lpb);
  return rc;
}

/* Attention of the batch's new rows, one sequence at a time, each reading
 * its own packed cache in place (keys 0..pos, query at pos): nothing is
 * copied or packed per step. */
static int decode_attention(const tf_model *m, pool_t *pool, tf_seq *const *seqs,
                            const int64_t *pos, int64_t B, int li, const float *qkv, float *ao,
                            ts_err *err) {
  const int64_t E = m->E, E3 = 3 * E;
  for (int64_t b = 0; b < B; b++) {
    const tf_seq *s = seqs[b];
    attn_params ap = s->attn;
    ap.causal = 1;
    ap.query_offset = pos[b];
    attn_tensor q = {qkv + b * E3, m->d, E3};
    attn_out o = {ao + b * E, m->d, E};
    int rc = md_attn_kvc_forward(pool, &ap, m->H, 1, pos[b] + 1, q, &s->kv[li], o, err);
    if (rc) return rc;
  }
  return 0;
}

int tf_decode_batch(const tf_model *m, pool_t *pool, tf_seq *const *seqs, const int64_t *ids,
                    int64_t B, float *logits, const md_call *c, ts_err *err) {
  const int64_t E = m->E, E3 = 3 * E;
  if (B < 1) return ts_errf(err, TS_EINVAL, "decode: an empty batch");
  int64_t *pos = tl_malloc(sizeof(int64_t) * (size_t)B);
  float *x = tl_malloc(sizeof(float) * (size_t)(B * E));
  float *a = tl_malloc(sizeof(float) * (size_t)(B * E));
  float *qkv = tl_malloc(sizeof(float) * (size_t)(B * E3));
  float *ao = tl_malloc(sizeof(float) * (size_t)(B * E));
  float *h = tl_malloc(sizeof(float) * (size_t)(B * m->F));
  int rc = 0;
  if (!pos || !x || !a || !qkv || !ao || !h) {
    rc = ts_errf(err, TS_ENOMEM, "out of memory for a decode batch of %lld", (long long)B);
    goto out;
  }
  for (int64_t b = 0; b < B; b++) {
    pos[b] = seqs[b]->pos;
    if ((rc = check_ids(m, ids + b, 1, pos[b], err))) goto out;
    if ((rc = seq_reserve(m, seqs[b], pos[b] + 1, err))) goto out;
    const float *te = (const float *)m->wte.data + ids[b] * E;
    float *xr = x + b * E;
    if (m->rope) {
      memcpy(xr, te, sizeof(float) * (size_t)E);
    } else {
      const float *pe = (const float *)m->wpe.data + pos[b] * E;
      for (int64_t i = 0; i < E; i++) xr[i] = te[i] + pe[i];
    }
  }
  for (int li = 0; li < m->n_layer; li++) {
    const tf_layer *L = &m->layers[li];
    layernorm(pool, x, a, B, E, &L->ln1_w, &L->ln1_b, m->eps);
    sg_gemm(pool, 0, B, E3, E, a, E, L->attn_w.data, E3, 0.0f, qkv, E3);
    sg_add_bias(B, E3, qkv, E3, L->attn_b.data);
    if (m->rope) {
      rope_arg ra = {m, qkv, 0, pos};
      pool_parallel_for(pool, B, 8, rope_range, &ra);
    }
    /* Rows past a sequence's position are not part of it until the commit
     * below, so writing them now changes nothing visible on failure. */
    for (int64_t b = 0; b < B; b++) seq_write(m, seqs[b], li, pos[b], 1, qkv + b * E3);
    if ((rc = decode_attention(m, pool, seqs, pos, B, li, qkv, ao, err))) goto out;
    sg_gemm(pool, 0, B, E, E, ao, E, L->proj_w.data, E, 1.0f, x, E);
    sg_add_bias(B, E, x, E, L->proj_b.data);
    layernorm(pool, x, a, B, E, &L->ln2_w, &L->ln2_b, m->eps);
    sg_gemm(pool, 0, B, m->F, E, a, E, L->fc_w.data, m->F, 0.0f, h, m->F);
    bias_gelu(pool, h, B, m->F, L->fc_b.data);
    sg_gemm(pool, 0, B, E, m->F, h, m->F, L->fcp_w.data, E, 1.0f, x, E);
    sg_add_bias(B, E, x, E, L->fcp_b.data);
    if (c && (rc = md_check_deadline(c, err))) goto out;
  }
  layernorm(pool, x, a, B, E, &m->lnf_w, &m->lnf_b, m->eps);
  sg_gemm(pool, 1, B, m->V, E, a, E, m->wte.data, E, 0.0f, logits, m->V);
  for (int64_t b = 0; b < B; b++) { /* commit */
    memcpy(seqs[b]->last, a + b * E, sizeof(float) * (size_t)E);
    seqs[b]->pos = pos[b] + 1;
  }
out:
  tl_free(pos);
  tl_free(x);
  tl_free(a);
  tl_free(qkv);
  tl_free(ao);
  tl_free(h);
  return rc;
}
