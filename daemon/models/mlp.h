/* mlp.h - dense networks, shared by the `mlp` kind and by kinds that embed
 * one (hosted members, the local quantile aggregator's weight network).
 *
 * Weights are borrowed from the version's safetensors (or owned copies when
 * converted); mlp_net_free releases what the net owns. */
#ifndef TALLYD_MLP_H
#define TALLYD_MLP_H

#include <jansson.h>
#include <stdint.h>

#include "../base/err.h"
#include "../base/pool.h"
#include "../base/tensor.h"

#define MLP_MAX_LAYERS 64

typedef enum mlp_act {
  MLP_NONE,
  MLP_RELU,
  MLP_GELU,
  MLP_GELU_TANH,
  MLP_ELU,
  MLP_TANH,
  MLP_SIGMOID,
  MLP_SOFTMAX
} mlp_act;

typedef struct st_file st_file;

typedef struct mlp_net {
  int n;
  int64_t in, out, widest;
  mlp_act act[MLP_MAX_LAYERS];
  ts_tensor w[MLP_MAX_LAYERS], b[MLP_MAX_LAYERS]; /* FP32 [out, in], [out] */
} mlp_net;

int mlp_act_from_name(const char *s, mlp_act *out);
void mlp_apply_act(mlp_act a, float *x, int64_t rows, int64_t cols);
/* Loads `<prefix>layers.{i}.weight/bias`; expect_in < 0: any input width. */
int mlp_net_load(mlp_net *net, st_file *w, const char *prefix, const json_t *acts,
                 int64_t expect_in, ts_err *err);
void mlp_net_free(mlp_net *net);
/* y [B, out] = net(x [B, in]). */
int mlp_net_forward(const mlp_net *net, pool_t *pool, int64_t B, const float *x, float *y,
                    ts_err *err);

#endif
