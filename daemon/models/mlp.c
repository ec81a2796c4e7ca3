/* mlp.c - model kind `mlp`: a stack of dense layers.
 *
 * config.json: {"kind": "mlp", "activations": ["relu", ..., "none"]}, one
 * activation per layer; weights `layers.{i}.weight` [out, in] (a torch
 * Linear) and `layers.{i}.bias` [out]. Input `features` [B, D], output
 * `output` [B, O], FP32. Each layer is one SIMD sgemm (x W^T) plus bias and
 * the activation; the weights are borrowed from the mmap'ed file. */
#include <stdio.h>
#include <string.h>

#include "../base/mem.h"
#include "../base/safetensors.h"
#include "../kernels/sgemm.h"
#include "../kernels/vmath.h"
#include "mlp.h"
#include "model.h"

static const char *const act_names[] = {"none", "relu",    "gelu",    "gelu_tanh", "elu",
                                        "tanh", "sigmoid", "softmax", NULL};

int mlp_act_from_name(const char *s, mlp_act *out) {
  for (int i = 0; s && act_names[i]; i++)
    if (strcmp(s, act_names[i]) == 0) {
      *out = (mlp_act)i;
      return 0;
    }
  return -1;
}

void mlp_apply_act(mlp_act a, float *x, int64_t rows, int64_t cols) {
  int64_t n = rows * cols;
  switch (a) {
    case MLP_RELU: vm_relu(x, n); break;
    case MLP_GELU: vm_gelu(x, n); break;
    case MLP_GELU_TANH: vm_gelu_tanh(x, n); break;
    case MLP_ELU: vm_elu(x, n); break;
    case MLP_TANH: vm_tanh(x, n); break;
    case MLP_SIGMOID: vm_sigmoid(x, n); break;
    case MLP_SOFTMAX: vm_softmax_rows(x, rows, cols); break;
    default: break;
  }
}

int mlp_net_load(mlp_net *net, st_file *w, const char *prefix, const json_t *acts,
                 int64_t expect_in, ts_err *err) {
  memset(net, 0, sizeof *net);
  if (!json_is_array(acts) || json_array_size(acts) == 0 || json_array_size(acts) > MLP_MAX_LAYERS)
    return ts_errf(err, TS_EINVAL, "config.json: 'activations' must be a list of 1 to %d names",
                   MLP_MAX_LAYERS);
  if (!w) return ts_errf(err, TS_EINVAL, "the version has no model.safetensors");
  net->n = (int)json_array_size(acts);
  int64_t prev = expect_in;
  for (int i = 0; i < net->n; i++) {
    const char *an = json_string_value(json_array_get(acts, (size_t)i));
    if (mlp_act_from_name(an, &net->act[i])) {
      mlp_net_free(net);
      return ts_errf(err, TS_EINVAL,
                     "config.json: activation %d '%s' is not one of none, relu, gelu, gelu_tanh, "
                     "elu, tanh, sigmoid, softmax",
                     i, an ? an : "(not a string)");
    }
    char name[128];
    int64_t wshape[2] = {-1, prev > 0 ? prev : -1};
    snprintf(name, sizeof name, "%slayers.%d.weight", prefix, i);
    int rc = st_get_f32(w, name, 2, wshape, &net->w[i], err);
    if (rc) {
      mlp_net_free(net);
      return rc;
    }
    int64_t out = net->w[i].shape[0];
    snprintf(name, sizeof name, "%slayers.%d.bias", prefix, i);
    rc = st_get_f32(w, name, 1, &out, &net->b[i], err);
    if (rc) {
      mlp_net_free(net);
      return rc;
    }
    if (i == 0) net->in = net->w[0].shape[1];
    prev = out;
  }
  net->out = prev;
  int64_t widest = net->in;
  for (int i = 0; i < net->n; i++)
    if (net->w[i].shape[0] > widest) widest = net->w[i].shape[0];
  net->widest = widest;
  return 0;
}

void mlp_net_free(mlp_net *net) {
  for (int i = 0; i < net->n; i++) {
    ts_free(&net->w[i]);
    ts_free(&net->b[i]);
  }
  memset(net, 0, sizeof *net);
}

int mlp_net_forward(const mlp_net *net, pool_t *pool, int64_t B, const float *x, float *y,
                    ts_err *err) {
  /* two ping-pong buffers of the widest layer */
  size_t cap = (size_t)B * (size_t)net->widest;
  float *buf[2] = {tl_malloc(sizeof(float) * (cap ? cap : 1)),
                   tl_malloc(sizeof(float) * (cap ? cap : 1))};
  if (!buf[0] || !buf[1]) {
    tl_free(buf[0]);
    tl_free(buf[1]);
    return ts_errf(err, TS_ENOMEM, "out of memory for %lld rows", (long long)B);
  }
  const float *in = x;
  for (int i = 0; i < net->n; i++) {
    int64_t o = net->w[i].shape[0], k = net->w[i].shape[1];
    float *dst = i == net->n - 1 ? y : buf[i & 1];
    sg_gemm(pool, 1, B, o, k, in, k, net->w[i].data, k, 0.0f, dst, o);
    sg_add_bias(B, o, dst, o, net->b[i].data);
    mlp_apply_act(net->act[i], dst, B, o);
    in = dst;
  }
  tl_free(buf[0]);
  tl_free(buf[1]);
  return 0;
}

/* ---- the kind ----------------------------------------------------------- */

static int load(const md_load_ctx *ctx, void **state, ts_err *err) {
  static const char *const keys[] = {"activations", NULL};
  int rc = md_config_check_keys(ctx->config, keys, err);
  if (rc) return rc;
  mlp_net *net = tl_calloc(1, sizeof *net);
  if (!net) return ts_errf(err, TS_ENOMEM, "out of memory");
  rc = mlp_net_load(net, ctx->weights, "", json_object_get(ctx->config, "activations"), -1, err);
  if (rc) {
    tl_free(net);
    return rc;
  }
  *state = net;
  return 0;
}

static void signature(void *state, md_sig *sig) {
  mlp_net *net = state;
  memset(sig, 0, sizeof *sig);
  md_sig_add(sig, MD_IN, "features", TS_FP32, 2, -1, net->in, 0);
  md_sig_add(sig, MD_OUT, "output", TS_FP32, 2, -1, net->out, 0);
}

static int infer(void *state, md_call *c, ts_err *err) {
  mlp_net *net = state;
  const ts_tensor *t;
  int rc = md_input(c, "features", &t, err);
  if (rc) return rc;
  int64_t dims[2] = {-1, net->in};
  if ((rc = md_check_shape(t, 2, dims, err))) return rc;
  float *x;
  if ((rc = ts_to_f32(t, 0, &x, err))) return rc;
  int64_t oshape[2] = {t->shape[0], net->out};
  float *y = md_output(c, "output", TS_FP32, 2, oshape, err);
  rc = y ? mlp_net_forward(net, c->pool, t->shape[0], x, y, err) : -TS_ENOMEM;
  tl_free(x);
  return rc;
}

static void free_state(void *state) {
  mlp_net_free(state);
  tl_free(state);
}

const md_kind md_kind_mlp = {
    .name = "mlp", .load = load, .signature = signature, .infer = infer, .free = free_state};
