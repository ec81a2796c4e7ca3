/* attention.h - what the `attention` and `transformer` kinds share: the
 * device that runs attention, and the per-request attention parameters.
 *
 * Device. The daemon's --device flag (auto, cpu, cuda) is set once at start
 * with md_attn_set_device, before any model loads; md_attn_forward then runs
 * attn_cuda_forward (kernels/attn_cuda.h) on the GPU or attn_forward on the
 * pool. `cuda` is refused at start when the build has no CUDA (make CUDA=1)
 * or no device answers; `auto` takes the GPU when both are there, else the
 * CPU. The setting is process-wide because the GPU is: one device, shared
 * by every model.
 *
 * Parameters. "attention" (softmax | lssa | lssar), "p" (> 0), "offset_rows"
 * (>= 0) come from config.json and may be overridden per request by the
 * request's "parameters" of the same names; md_attn_params_read does both
 * with the config's values as defaults. */
#ifndef TALLYD_MODELS_ATTENTION_H
#define TALLYD_MODELS_ATTENTION_H

#include <jansson.h>

#include "../base/err.h"
#include "../base/pool.h"
#include "../kernels/attn.h"

typedef enum md_device { MD_DEVICE_CPU = 0, MD_DEVICE_CUDA = 1 } md_device;

/* name: "auto", "cpu" or "cuda" (NULL: auto). -TS_EINVAL with a message when
 * the name is unknown or cuda is asked for and cannot be had. */
int md_attn_set_device(const char *name, ts_err *err);
md_device md_attn_device(void);
const char *md_attn_device_name(void);

/* attn_forward on the chosen device (pool is used only on the CPU). */
int md_attn_forward(pool_t *pool, const attn_params *prm, int H, int Hkv, int64_t Lq, int64_t Lk,
                    int d, int dv, attn_tensor q, attn_tensor k, attn_tensor v, attn_out out,
                    ts_err *err);

/* Attention over a packed KV cache (attn_kvc_forward). On the GPU, a chunk
 * of MD_ATTN_KVC_GPU_ROWS queries or more goes there (the cache's rows
 * unpacked for the copy, as the infer path copies its K and V); fewer
 * queries (decoding) stay on the CPU kernels, which read the cache in place:
 * copying the whole cache to the device for one query costs more than the
 * one pass over it. */
#define MD_ATTN_KVC_GPU_ROWS 64
int md_attn_kvc_forward(pool_t *pool, const attn_params *prm, int H, int64_t Lq, int64_t Lk,
                        attn_tensor q, const attn_kvc *kv, attn_out out, ts_err *err);

int md_attn_variant_from_name(const char *s, attn_variant *out);

/* Reads "attention", "p" and "offset_rows" from obj (a config.json or a
 * request's parameters; NULL: nothing) over the values already in *prm, and
 * checks them (400 naming `where` and the key). */
int md_attn_params_read(const json_t *obj, const char *where, attn_params *prm, ts_err *err);

#endif
