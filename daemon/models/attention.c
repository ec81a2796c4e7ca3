/* attention.c - model kind `attention` (attention as a service) and the
 * attention device and parameters shared with the transformer kind (see
 * attention.h).
 *
 * config.json: {"kind": "attention", "max_sequence_length": 131072}; no
 * weights. Inputs query [H, Lq, d], key [Hkv, Lk, d], value [Hkv, Lk, dv],
 * each with an optional leading batch dimension B (all three or none), any
 * float or integer dtype (converted to FP32; NaN and Inf refused). Output
 * `output` [H, Lq, dv] (or [B, H, Lq, dv]), FP32. Request parameters:
 * "attention", "p", "offset_rows", "causal" (default true), "query_offset"
 * (default Lk - Lq when causal, else 0). The tiled kernels never hold an
 * Lq x Lk matrix, so the only memory is the inputs, the output and a packed
 * copy of K and V (attn.h). */
#include "attention.h"

#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "../base/mem.h"
#include "../kernels/attn_cuda.h"
#include "model.h"

/* ---- the device ---------------------------------------------------------- */

static md_device g_device = MD_DEVICE_CPU; /* written once at start, before workers run */

int md_attn_set_device(const char *name, ts_err *err) {
  if (!name) name = "auto";
  int want_cuda = strcmp(name, "cuda") == 0;
  if (!want_cuda && strcmp(name, "auto") != 0 && strcmp(name, "cpu") != 0)
    return ts_errf(err, TS_EINVAL, "--device must be auto, cpu or cuda, not '%s'", name);
  g_device = MD_DEVICE_CPU;
  if (strcmp(name, "cpu") == 0) return 0;
#ifdef TALLYD_CUDA
  if (attn_cuda_available()) {
    g_device = MD_DEVICE_CUDA;
    return 0;
  }
  if (want_cuda) return ts_errf(err, TS_EINVAL, "--device cuda: no CUDA device is available");
#else
  if (want_cuda)
    return ts_errf(err, TS_EINVAL,
                   "--device cuda: this build has no CUDA (build with make CUDA=1)");
#endif
  return 0;
}

md_device md_attn_device(void) {
  return g_device;
}
const char *md_attn_device_name(void) {
  return g_device == MD_DEVICE_CUDA ? "cuda" : "cpu";
}

int md_attn_forward(pool_t *pool, const attn_params *prm, int H, int Hkv, int64_t Lq, int64_t Lk,
                    int d, int dv, attn_tensor q, attn_tensor k, attn_tensor v, attn_out out,
                    ts_err *err) {
#ifdef TALLYD_CUDA
  if (g_device == MD_DEVICE_CUDA && Lq > 0)
    return attn_cuda_forward(prm, H, Hkv, Lq, Lk, d, dv, q, k, v, out, err);
#endif
  return attn_forward(pool, prm, H, Hkv, Lq, Lk, d, dv, q, k, v, out, err);
}

int md_attn_kvc_forward(pool_t *pool, const attn_params *prm, int H, int64_t Lq, int64_t Lk,
                        attn_tensor q, const attn_kvc *kv, attn_out out, ts_err *err) {
#ifdef TALLYD_CUDA
  if (g_device == MD_DEVICE_CUDA && Lq >= MD_ATTN_KVC_GPU_ROWS && kv && Lk > 0 && Lk <= kv->cap) {
    int64_t rk = (int64_t)kv->Hkv * kv->d, rv = (int64_t)kv->Hkv * kv->dv;
    float *k = tl_malloc(sizeof(float) * (size_t)(Lk * rk));
    float *v = tl_malloc(sizeof(float) * (size_t)(Lk * rv));
    int rc;
    if (!k || !v) {
      rc = ts_errf(err, TS_ENOMEM, "out of memory unpacking %lld cached keys", (long long)Lk);
    } else {
      for (int64_t j = 0; j < Lk; j++)
        for (int h = 0; h < kv->Hkv; h++)
          attn_kvc_read(kv, j, h, k + j * rk + (int64_t)h * kv->d,
                        v + j * rv + (int64_t)h * kv->dv);
      attn_tensor tk = {k, kv->d, rk}, tv = {v, kv->dv, rv};
      rc = attn_cuda_forward(prm, H, kv->Hkv, Lq, Lk, kv->d, kv->dv, q, tk, tv, out, err);
    }
    tl_free(k);
    tl_free(v);
    return rc;
  }
#endif
  return attn_kvc_forward(pool, prm, H, Lq, Lk, q, kv, out, err);
}

/* ---- parameters ---------------------------------------------------------- */

int md_attn_variant_from_name(const char *s, attn_variant *out) {
  static const attn_variant all[] = {ATTN_SOFTMAX, ATTN_LSSA, ATTN_LSSAR};
  for (int i = 0; s && i < 3; i++)
    if (strcmp(s, attn_variant_name(all[i])) == 0) {
      *out = all[i];
      return 0;
    }
  return -1;
}

int md_attn_params_read(const json_t *obj, const char *where, attn_params *prm, ts_err *err) {
  const char *name;
  int rc = md_param_string(obj, "attention", attn_variant_name(prm->variant), &name, err);
  if (rc) return ts_errf(err, TS_EINVAL, "%s: 'attention' must be a string", where);
  if (md_attn_variant_from_name(name, &prm->variant))
    return ts_errf(err, TS_EINVAL, "%s: attention '%.60s' is not one of softmax, lssa, lssar",
                   where, name);
  double p;
  if ((rc = md_param_double(obj, "p", prm->p, &p, err)) || !(p > 0.0) || p > 1e6)
    return ts_errf(err, TS_EINVAL, "%s: 'p' must be a number in (0, 1e6]", where);
  prm->p = p;
  int64_t off;
  if ((rc = md_param_int(obj, "offset_rows", prm->offset_rows, &off, err)) || off < 0 ||
      off > INT_MAX)
    return ts_errf(err, TS_EINVAL, "%s: 'offset_rows' must be an integer >= 0", where);
  prm->offset_rows = (int)off;
  return 0;
}

/* ---- the kind ------------------------------------------------------------ */

/* 2^40 positions: more than any memory holds, far below INT64_MAX. */
#define ATT_MAX_LEN (INT64_C(1) << 40)

typedef struct att_state {
  int64_t max_len;
} att_state;

static int load(const md_load_ctx *ctx, void **state, ts_err *err) {
  static const char *const keys[] = {"max_sequence_length", NULL};
  int rc = md_config_check_keys(ctx->config, keys, err);
  if (rc) return rc;
  int64_t max_len;
  /* bounded so that every position (query_offset + Lq) stays far from int64's end */
  if (md_param_int(ctx->config, "max_sequence_length", 131072, &max_len, err) || max_len < 1 ||
      max_len > ATT_MAX_LEN)
    return ts_errf(err, TS_EINVAL,
                   "config.json: 'max_sequence_length' must be an integer in [1, %lld]",
                   (long long)ATT_MAX_LEN);
  att_state *s = tl_calloc(1, sizeof *s);
  if (!s) return ts_errf(err, TS_ENOMEM, "out of memory");
  s->max_len = max_len;
  *state = s;
  return 0;
}

static void signature(void *state, md_sig *sig) {
  (void)state;
  memset(sig, 0, sizeof *sig);
  md_sig_add(sig, MD_IN, "query", TS_FP32, 3, -1, -1, -1);
  md_sig_add(sig, MD_IN, "key", TS_FP32, 3, -1, -1, -1);
  md_sig_add(sig, MD_IN, "value", TS_FP32, 3, -1, -1, -1);
  md_sig_add(sig, MD_OUT, "output", TS_FP32, 3, -1, -1, -1);
}

/* The shapes of one request, checked against each other. */
typedef struct att_shape {
  int64_t B, H, Hkv, Lq, Lk, d, dv;
  int batched;
} att_shape;

static int check_shapes(const att_state *s, const ts_tensor *q, const ts_tensor *k,
                        const ts_tensor *v, att_shape *sh, ts_err *err) {
  char a[96], b[96], c[96];
  if (q->ndim != 3 && q->ndim != 4)
    return ts_errf(err, TS_EINVAL,
                   "input 'query': expected shape [H, Lq, d] or [B, H, Lq, d], got %s",
                   ts_shape_str(q->shape, q->ndim, a, sizeof a));
  if (k->ndim != q->ndim || v->ndim != q->ndim)
    return ts_errf(err, TS_EINVAL,
                   "inputs 'query' %s, 'key' %s and 'value' %s must all have a batch "
                   "dimension or none",
                   ts_shape_str(q->shape, q->ndim, a, sizeof a),
                   ts_shape_str(k->shape, k->ndim, b, sizeof b),
                   ts_shape_str(v->shape, v->ndim, c, sizeof c));
  int o = q->ndim - 3;
  sh->batched = o;
  sh->B = o ? q->shape[0] : 1;
  if (o && (k->shape[0] != sh->B || v->shape[0] != sh->B))
    return ts_errf(err, TS_EINVAL, "batch sizes differ: query %lld, key %lld, value %lld",
                   (long long)q->shape[0], (long long)k->shape[0], (long long)v->shape[0]);
  sh->H = q->shape[o];
  sh->Lq = q->shape[o + 1];
  sh->d = q->shape[o + 2];
  sh->Hkv = k->shape[o];
  sh->Lk = k->shape[o + 1];
  sh->dv = v->shape[o + 2];
  if (k->shape[o + 2] != sh->d)
    return ts_errf(err, TS_EINVAL, "input 'key': head dimension %lld differs from the query's %lld",
                   (long long)k->shape[o + 2], (long long)sh->d);
  if (v->shape[o] != sh->Hkv || v->shape[o + 1] != sh->Lk)
    return ts_errf(
        err, TS_EINVAL, "input 'value': expected %lld heads of %lld rows like 'key', got %s",
        (long long)sh->Hkv, (long long)sh->Lk, ts_shape_str(v->shape, v->ndim, a, sizeof a));
  if (sh->H < 1 || sh->Hkv < 1 || sh->H % sh->Hkv)
    return ts_errf(err, TS_EINVAL,
                   "%lld query heads cannot share %lld key/value heads (heads must be >= 1 "
                   "and a multiple of the key/value heads)",
                   (long long)sh->H, (long long)sh->Hkv);
  if (sh->d < 1 || sh->dv < 1 || sh->H > INT_MAX || sh->d > INT_MAX || sh->dv > INT_MAX)
    return ts_errf(err, TS_EINVAL, "head dimensions must be >= 1, got d=%lld dv=%lld",
                   (long long)sh->d, (long long)sh->dv);
  if (sh->Lq > s->max_len || sh->Lk > s->max_len)
    return ts_errf(err, TS_EINVAL,
                   "%lld queries and %lld keys: this model serves sequences up to "
                   "max_sequence_length %lld",
                   (long long)sh->Lq, (long long)sh->Lk, (long long)s->max_len);
  return 0;
}

static int infer(void *state, md_call *c, ts_err *err) {
  att_state *s = state;
  const ts_tensor *tq, *tk, *tv;
  int rc;
  if ((rc = md_input(c, "query", &tq, err)) || (rc = md_input(c, "key", &tk, err)) ||
      (rc = md_input(c, "value", &tv, err)))
    return rc;
  att_shape sh = {0};
  if ((rc = check_shapes(s, tq, tk, tv, &sh, err))) return rc;

  attn_params prm = attn_params_default(ATTN_SOFTMAX);
  if ((rc = md_attn_params_read(c->params, "parameters", &prm, err))) return rc;
  if ((rc = md_param_bool(c->params, "causal", 1, &prm.causal, err))) return rc;
  json_t *qo = c->params ? json_object_get(c->params, "query_offset") : NULL;
  if (prm.causal && (!qo || json_is_null(qo)) && sh.Lk < sh.Lq)
    return ts_errf(err, TS_EINVAL,
                   "causal attention of %lld queries needs at least as many keys, got %lld "
                   "(send \"causal\": false for cross attention)",
                   (long long)sh.Lq, (long long)sh.Lk);
  int64_t off;
  if ((rc = md_param_int(c->params, "query_offset", prm.causal ? sh.Lk - sh.Lq : 0, &off, err)))
    return rc;
  if (off < 0) return ts_errf(err, TS_EINVAL, "parameter 'query_offset' must be >= 0");
  /* the queries sit at positions off .. off + Lq - 1, inside the model's
   * sequence length (Lq <= max_len was checked, so this cannot overflow) */
  if (off > s->max_len - sh.Lq)
    return ts_errf(err, TS_EINVAL,
                   "parameter 'query_offset' %lld: %lld queries from there pass this model's "
                   "max_sequence_length %lld",
                   (long long)off, (long long)sh.Lq, (long long)s->max_len);
  if (prm.causal && off > sh.Lk - sh.Lq)
    return ts_errf(err, TS_EINVAL,
                   "causal queries at positions %lld..%lld need %lld keys, got %lld "
                   "(query_offset + Lq must be <= Lk)",
                   (long long)off, (long long)(off + sh.Lq - 1), (long long)(off + sh.Lq),
                   (long long)sh.Lk);
  prm.query_offset = off;

  float *q = NULL, *k = NULL, *v = NULL;
  if ((rc = ts_to_f32(tq, 0, &q, err)) || (rc = ts_to_f32(tk, 0, &k, err)) ||
      (rc = ts_to_f32(tv, 0, &v, err)))
    goto out;
  int64_t oshape[4] = {sh.B, sh.H, sh.Lq, sh.dv};
  float *y = md_output(c, "output", TS_FP32, 3 + sh.batched, oshape + 1 - sh.batched, err);
  if (!y) {
    rc = -TS_ENOMEM;
    goto out;
  }
  int64_t qn = sh.H * sh.Lq * sh.d, kn = sh.Hkv * sh.Lk * sh.d, vn = sh.Hkv * sh.Lk * sh.dv,
          on = sh.H * sh.Lq * sh.dv;
  for (int64_t b = 0; b < sh.B && !rc; b++) {
    attn_tensor aq = {q + b * qn, sh.Lq * sh.d, sh.d};
    attn_tensor ak = {k + b * kn, sh.Lk * sh.d, sh.d};
    attn_tensor av = {v + b * vn, sh.Lk * sh.dv, sh.dv};
    attn_out ao = {y + b * on, sh.Lq * sh.dv, sh.dv};
    rc = md_attn_forward(c->pool, &prm, (int)sh.H, (int)sh.Hkv, sh.Lq, sh.Lk, (int)sh.d, (int)sh.dv,
                         aq, ak, av, ao, err);
    if (!rc) rc = md_check_deadline(c, err);
  }
out:
  tl_free(q);
  tl_free(k);
  tl_free(v);
  return rc;
}

static void free_state(void *state) {
  tl_free(state);
}

/* Request parameters (model.h): the variant, its p and offset rows, the
 * causal mask and the queries' offset. */
static const char *const infer_params[] = {"attention",    "p", "offset_rows", "causal",
                                           "query_offset", NULL};

const md_kind md_kind_attention = {.name = "attention",
                                   .params = {[MD_OP_INFER] = infer_params},
                                   .load = load,
                                   .signature = signature,
                                   .infer = infer,
                                   .free = free_state};
