/* attn_cuda.h - the attention variants of attn.h on an NVIDIA GPU.
 *
 * Same parameters, masks and strided views as attn_forward (attn.h); the
 * tensors are host memory: the call copies q, k, v to the device (gathering
 * strided rows), runs one kernel (query tiles x heads; K/V tiles in shared
 * memory; one pass over the keys for softmax and LSSA, two for LSSAR) and
 * copies the result back into out's view. Device memory is allocated and
 * freed inside the call. Built only with `make CUDA=1` (TALLYD_CUDA); the
 * CPU kernels never call it - the caller chooses the device.
 *
 * Ownership: every pointer is borrowed for the duration of the call. */
#ifndef TALLYD_ATTN_CUDA_H
#define TALLYD_ATTN_CUDA_H

#include <stdint.h>

#include "attn.h"

#ifdef __cplusplus
extern "C" {
#endif

/* 1 when a CUDA device can be used, else 0 (no driver, no device). */
int attn_cuda_available(void);

/* 0, -TS_EINVAL (bad arguments, head dims beyond the device's shared
 * memory), -TS_ENOMEM (device memory), -TS_EUNAVAIL (no device) or
 * -TS_EINTERNAL (a CUDA error, named in err). */
int attn_cuda_forward(const attn_params *prm, int H, int Hkv, int64_t Lq, int64_t Lk, int d, int dv,
                      attn_tensor q, attn_tensor k, attn_tensor v, attn_out out, ts_err *err);

#ifdef __cplusplus
}
#endif

#endif
