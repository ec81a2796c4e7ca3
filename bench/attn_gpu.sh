#!/usr/bin/env bash
# attn_gpu.sh - build tallyd's attention with CUDA and measure it on the GPU.
#
# Builds with `make CUDA=1` (toolkit from $CUDA_HOME, else deploy/cuda_home.sh),
# runs the GPU-vs-CPU-reference unit test, then bench_attn --cuda: each line
# times attn_cuda_forward (host<->device copies included) beside the CPU
# tiled kernel and prints the largest difference between the two.
#
#   bench/attn_gpu.sh [bench_attn options]     e.g. --max-len 65536 --no-naive
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build-cuda}
make -s CUDA=1 BUILD="$BUILD" ${CUDA_HOME:+CUDA_HOME="$CUDA_HOME"} \
  "$BUILD/libtallyd.a" "$BUILD/tests/test_attn_cuda" "$BUILD/bench/bench_attn"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
"$BUILD/tests/test_attn_cuda"
if [ $# -eq 0 ]; then set -- --no-naive; fi
"$BUILD/bench/bench_attn" --cuda "$@"
