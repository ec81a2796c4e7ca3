/* attn_cuda.cu - softmax, LSSA and LSSAR attention on an NVIDIA GPU.
 *
 * The same tiled algorithm as the CPU driver in attn.c, one thread block per
 * (head, query tile), heaviest causal tiles first:
 *   shared memory holds the query tile (pre-scaled: 1/sqrt(d) for softmax,
 *   ln d ln N_i / ||q_i|| for LSSA/LSSAR), one K tile (QK-normalised for
 *   LSSA/LSSAR; rows padded by one float against bank conflicts), one V
 *   tile, the BQ x BK scores and the BQ x dv accumulator;
 *   all threads compute scores and P.V, one thread per query row applies the
 *   row transform (online max / softplus / LSSAR weight) and keeps the row's
 *   statistics in double, as the CPU driver does;
 *   softmax and LSSA stream over the key tiles once, LSSAR twice (Z and the
 *   row's largest score, then the guarded weights y^p, y = x / x_max).
 * Tiles that the causal mask hides entirely are never loaded. The host side
 * gathers strided views with cudaMemcpy2D and scatters the result back. */
extern "C" {
#include "attn_cuda.h"
}

#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

#define ATTN_CUDA_THREADS 128

struct attn_dev_args {
  int variant, causal, H, g, d, dv, BQ, BK, offset_rows;
  long long qoff, Lq, Lk;
  float scale;
  double lnd, p;
  float ythr;
  const float *q, *k, *v; /* [H][Lq][d], [Hkv][Lk][d], [Hkv][Lk][dv] */
  float *o;               /* [H][Lq][dv] */
};

__device__ static float dev_softplus(float x) { return fmaxf(x, 0.0f) + log1pf(expf(-fabsf(x))); }
__device__ static double dev_softplus_d(double x) { return fmax(x, 0.0) + log1p(exp(-fabs(x))); }

/* Shared layout: doubles first (8-byte aligned), then floats. */
static size_t attn_smem_bytes(int BQ, int BK, int d, int dv) {
  size_t dbl = 3 * (size_t)BQ;
  size_t flt = (size_t)BQ * d + (size_t)BK * (d + 1) + (size_t)BK * dv + (size_t)BQ * (BK + 1) +
               (size_t)BQ * dv + 7 * (size_t)BQ;
  return dbl * sizeof(double) + flt * sizeof(float) + (size_t)BQ * 2 * sizeof(int);
}

__global__ void attn_cuda_kernel(attn_dev_args a) {
  extern __shared__ double smem[];
  const int BQ = a.BQ, BK = a.BK, d = a.d, dv = a.dv, nt = blockDim.x, tid = threadIdx.x;
  double *rl = smem, *rz = rl + BQ, *rceps = rz + BQ;
  float *Qs = (float *)(rceps + BQ);
  float *Ks = Qs + BQ * d;         /* [BK][d + 1] */
  float *Vs = Ks + BK * (d + 1);   /* [BK][dv] */
  float *Ss = Vs + BK * dv;        /* [BQ][BK + 1] */
  float *Os = Ss + BQ * (BK + 1);  /* [BQ][dv] */
  float *rm = Os + BQ * dv, *ralpha = rm + BQ, *rsmax = ralpha + BQ, *rc1 = rsmax + BQ;
  float *ro = rc1 + BQ, *rinvx = ro + BQ, *rip = rinvx + BQ;
  int *rnv = (int *)(rip + BQ), *rdead = rnv + BQ;

  const long long ntq = (a.Lq + BQ - 1) / BQ, ntk = (a.Lk + BK - 1) / BK;
  const long long qt = ntq - 1 - blockIdx.x / a.H;
  const int h = blockIdx.x % a.H, kvh = h / a.g;
  const long long q0 = qt * BQ, t0 = a.qoff + q0;
  const int rows = (int)(a.Lq - q0 < BQ ? a.Lq - q0 : BQ);
  const int norm = a.variant != ATTN_SOFTMAX;

  for (int i = tid; i < BQ * d; i += nt) {
    int r = i / d, c = i % d;
    Qs[i] = r < rows ? a.q[((long long)h * a.Lq + q0 + r) * d + c] : 0.0f;
  }
  for (int i = tid; i < BQ * dv; i += nt) Os[i] = 0.0f;
  __syncthreads();
  if (tid < rows) {
    float *qr = Qs + tid * d;
    float f = a.scale;
    if (norm) {
      double s = 0;
      for (int c = 0; c < d; c++) s += (double)qr[c] * qr[c];
      double N = a.causal ? (double)(t0 + tid + 1) : (double)a.Lk;
      f = (float)(a.lnd * log(N) / fmax(sqrt(s), ATTN_NORM_FLOOR));
    }
    for (int c = 0; c < d; c++) qr[c] *= f;
    rm[tid] = -INFINITY;
    rsmax[tid] = -INFINITY;
    rl[tid] = 0.0;
    rz[tid] = 0.0;
    rdead[tid] = 0;
  }

  long long kt_end = ntk;
  if (a.causal) {
    long long last = (t0 + rows - 1) / BK + 1;
    if (last < kt_end) kt_end = last;
  }
  const int npass = a.variant == ATTN_LSSAR ? 2 : 1;
  for (int pass = 0; pass < npass; pass++) {
    const int values = pass == npass - 1;
    if (a.variant == ATTN_LSSAR && pass == 1 && tid < rows) {
      long long t = t0 + tid;
      double N = a.causal ? (double)(t + 1) : (double)a.Lk, O = t < a.offset_rows ? 0.0 : 1.0;
      double x = N * dev_softplus_d(rsmax[tid]) / (rz[tid] + ATTN_EPS) - O;
      double c = x > 0.0 ? exp(log(ATTN_EPS) - a.p * log(x)) : 0.0;
      if (!(x > 0.0) || !isfinite(c) || c > 1e300) {
        rdead[tid] = 1;
      } else {
        rc1[tid] = (float)(N / (rz[tid] + ATTN_EPS));
        ro[tid] = (float)O;
        rinvx[tid] = (float)(1.0 / x);
        rceps[tid] = c;
      }
    }
    __syncthreads();
    for (long long kt = 0; kt < kt_end; kt++) {
      const long long k0 = kt * BK;
      const int kvalid = (int)(a.Lk - k0 < BK ? a.Lk - k0 : BK);
      const float *kg = a.k + ((long long)kvh * a.Lk + k0) * d;
      for (int i = tid; i < BK * d; i += nt) {
        int j = i / d, c = i % d;
        Ks[j * (d + 1) + c] = j < kvalid ? kg[(long long)j * d + c] : 0.0f;
      }
      if (values) {
        const float *vg = a.v + ((long long)kvh * a.Lk + k0) * dv;
        for (int i = tid; i < BK * dv; i += nt) Vs[i] = i / dv < kvalid ? vg[i] : 0.0f;
      }
      __syncthreads();
      if (norm)
        for (int j = tid; j < kvalid; j += nt) {
          float *kr = Ks + j * (d + 1);
          double s = 0;
          for (int c = 0; c < d; c++) s += (double)kr[c] * kr[c];
          float inv = (float)(1.0 / fmax(sqrt(s), ATTN_NORM_FLOOR));
          for (int c = 0; c < d; c++) kr[c] *= inv;
        }
      __syncthreads();
      for (int i = tid; i < rows * BK; i += nt) {
        int r = i / BK, j = i % BK;
        const float *qr = Qs + r * d, *kr = Ks + j * (d + 1);
        float s = 0.0f;
        for (int c = 0; c < d; c++) s = fmaf(qr[c], kr[c], s);
        Ss[r * (BK + 1) + j] = s;
      }
      __syncthreads();
      if (tid < rows) {
        const int r = tid;
        long long nvl = kvalid;
        if (a.causal) {
          nvl = t0 + r + 1 - k0;
          nvl = nvl < 0 ? 0 : nvl > kvalid ? kvalid : nvl;
        }
        const int nv = rdead[r] ? 0 : (int)nvl;
        float *sr = Ss + r * (BK + 1);
        float alpha = 1.0f;
        if (a.variant == ATTN_SOFTMAX) {
          float mt = -INFINITY;
          for (int j = 0; j < nv; j++) mt = fmaxf(mt, sr[j]);
          if (nv > 0) {
            float mnew = fmaxf(rm[r], mt);
            alpha = expf(rm[r] - mnew);
            double sum = 0;
            for (int j = 0; j < nv; j++) sum += sr[j] = expf(sr[j] - mnew);
            rl[r] = rl[r] * alpha + sum;
            rm[r] = mnew;
          }
        } else if (a.variant == ATTN_LSSA || pass == 0) {
          double sum = 0;
          for (int j = 0; j < nv; j++) {
            rsmax[r] = fmaxf(rsmax[r], sr[j]);
            sum += sr[j] = dev_softplus(sr[j]);
          }
          if (a.variant == ATTN_LSSA) rl[r] += sum;
          else rz[r] += sum;
        } else {
          double sum = 0;
          for (int j = 0; j < nv; j++) {
            float y = (dev_softplus(sr[j]) * rc1[r] - ro[r]) * rinvx[r];
            sum += sr[j] = y >= a.ythr ? powf(y, (float)a.p) : 0.0f;
          }
          rl[r] += sum;
        }
        for (int j = nv; j < BK; j++) sr[j] = 0.0f;
        ralpha[r] = alpha;
      }
      __syncthreads();
      if (values) {
        for (int i = tid; i < rows * dv; i += nt) {
          int r = i / dv, c = i % dv;
          const float *pr = Ss + r * (BK + 1);
          float acc = Os[i] * ralpha[r];
          for (int j = 0; j < BK; j++) acc = fmaf(pr[j], Vs[j * dv + c], acc);
          Os[i] = acc;
        }
      }
      __syncthreads();
    }
  }
  for (int i = tid; i < rows * dv; i += nt) {
    int r = i / dv;
    double nrm = a.variant == ATTN_SOFTMAX ? rl[r]
                 : a.variant == ATTN_LSSA  ? rl[r] + ATTN_EPS
                 : rdead[r]                ? 0.0
                                           : rl[r] + rceps[r];
    float inv = nrm > 0.0 ? (float)(1.0 / nrm) : 0.0f;
    a.o[((long long)h * a.Lq + q0) * dv + i] = Os[i] * inv;
  }
}

extern "C" int attn_cuda_available(void) {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError(); /* clear the sticky "no driver" error */
    return 0;
  }
  return n > 0;
}

/* Copies heads x rows x cols floats between a strided host view and a
 * contiguous device buffer. */
static cudaError_t copy_view(float *dev, const float *host, int heads, int64_t rows, int cols,
                             int64_t hs, int64_t rs, int to_device) {
  for (int h = 0; h < heads && rows > 0; h++) {
    float *dp = dev + (int64_t)h * rows * cols;
    cudaError_t e;
    if (to_device)
      e = cudaMemcpy2D(dp, (size_t)cols * 4, host + h * hs, (size_t)rs * 4, (size_t)cols * 4,
                       (size_t)rows, cudaMemcpyHostToDevice);
    else
      e = cudaMemcpy2D((float *)host + h * hs, (size_t)rs * 4, dp, (size_t)cols * 4,
                       (size_t)cols * 4, (size_t)rows, cudaMemcpyDeviceToHost);
    if (e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

extern "C" int attn_cuda_forward(const attn_params *prm, int H, int Hkv, int64_t Lq, int64_t Lk,
                                 int d, int dv, attn_tensor q, attn_tensor k, attn_tensor v,
                                 attn_out out, ts_err *err) {
  int rc = attn_check_args(prm, H, Hkv, Lq, Lk, d, dv, q, k, v, out, err);
  if (rc) return rc;
  if (Lq == 0) return 0;
  if (!attn_cuda_available())
    return ts_errf(err, TS_EUNAVAIL, "attention: no CUDA device is available");
  int dev = 0, optin = 0;
  cudaGetDevice(&dev);
  if (cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess)
    optin = 48 * 1024;
  int BQ = 32, BK = 32;
  while (attn_smem_bytes(BQ, BK, d, dv) > (size_t)optin && BK > 4) {
    BQ /= 2;
    BK /= 2;
  }
  size_t smem = attn_smem_bytes(BQ, BK, d, dv);
  if (smem > (size_t)optin)
    return ts_errf(err, TS_EINVAL,
                   "attention: head dimensions d=%d dv=%d need %zu bytes of GPU shared memory, "
                   "the device has %d",
                   d, dv, smem, optin);

  size_t nq = (size_t)H * Lq * d, nk = (size_t)Hkv * Lk * d, nv = (size_t)Hkv * Lk * dv,
         no = (size_t)H * Lq * dv;
  float *dq = NULL, *dk = NULL, *dvv = NULL, *dout = NULL;
  cudaError_t e = cudaSuccess;
  const char *what = "";
  if ((e = cudaMalloc(&dq, nq * 4)) != cudaSuccess || (e = cudaMalloc(&dout, no * 4)) != cudaSuccess ||
      (Lk > 0 && ((e = cudaMalloc(&dk, nk * 4)) != cudaSuccess ||
                  (e = cudaMalloc(&dvv, nv * 4)) != cudaSuccess))) {
    cudaFree(dq);
    cudaFree(dk);
    cudaFree(dvv);
    cudaFree(dout);
    cudaGetLastError();
    return ts_errf(err, TS_ENOMEM, "attention: no GPU memory for %zu MiB of q/k/v/out: %s",
                   (nq + nk + nv + no) * 4 >> 20, cudaGetErrorString(e));
  }
  attn_dev_args a;
  a.variant = prm->variant;
  a.causal = prm->causal;
  a.H = H;
  a.g = H / Hkv;
  a.d = d;
  a.dv = dv;
  a.BQ = BQ;
  a.BK = BK;
  a.offset_rows = prm->offset_rows;
  a.qoff = prm->query_offset;
  a.Lq = Lq;
  a.Lk = Lk;
  a.scale = prm->scale != 0.0f ? prm->scale : (float)(1.0 / sqrt((double)d));
  a.lnd = log((double)d);
  a.p = prm->p;
  a.ythr = (float)exp(log(1e-30) / prm->p);
  a.q = dq;
  a.k = dk;
  a.v = dvv;
  a.o = dout;
  long long ntq = (Lq + BQ - 1) / BQ;
  if ((e = copy_view(dq, q.data, H, Lq, d, q.head_stride, q.row_stride, 1)) != cudaSuccess) {
    what = "copying q";
  } else if ((e = copy_view(dk, k.data, Hkv, Lk, d, k.head_stride, k.row_stride, 1)) != cudaSuccess) {
    what = "copying k";
  } else if ((e = copy_view(dvv, v.data, Hkv, Lk, dv, v.head_stride, v.row_stride, 1)) != cudaSuccess) {
    what = "copying v";
  } else if ((e = cudaFuncSetAttribute(attn_cuda_kernel,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       (int)smem)) != cudaSuccess) {
    what = "setting shared memory";
  } else if (ntq * H > 0x7fffffffLL) {
    e = cudaErrorInvalidValue;
    what = "sizing the grid (too many query tiles)";
  } else {
    attn_cuda_kernel<<<(unsigned)(ntq * H), ATTN_CUDA_THREADS, smem>>>(a);
    if ((e = cudaGetLastError()) != cudaSuccess || (e = cudaDeviceSynchronize()) != cudaSuccess)
      what = "running the kernel";
    else if ((e = copy_view(dout, out.data, H, Lq, dv, out.head_stride, out.row_stride, 0)) !=
             cudaSuccess)
      what = "copying the output back";
  }
  cudaFree(dq);
  cudaFree(dk);
  cudaFree(dvv);
  cudaFree(dout);
  if (e != cudaSuccess) {
    cudaGetLastError();
    return ts_errf(err, TS_EINTERNAL, "attention: CUDA error %s: %s", what,
                   cudaGetErrorString(e));
  }
  return 0;
}
