#!/usr/bin/env bash
# prefill.sh - transformer prefill throughput (bench/prefill.c), on the CPU
# and, when a CUDA build and a GPU are there, with attention on the GPU.
#
#   bench/prefill.sh [prefill options]     default: --tokens 4096,32768
# With CUDA=1 the build goes to build-cuda (toolkit from $CUDA_HOME, else
# deploy/cuda_home.sh). The
# 12-layer, 768-wide model at 32768 tokens takes minutes on 2 cores:
# attention is ~20 TFLOP of the ~28 there.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${CUDA:-}" ]; then
  BUILD=${BUILD:-build-cuda}
  make -s -j"$(nproc)" CUDA=1 BUILD="$BUILD" ${CUDA_HOME:+CUDA_HOME="$CUDA_HOME"} "$BUILD/bench/prefill"
else
  BUILD=${BUILD:-build}
  make -s -j"$(nproc)" BUILD="$BUILD" "$BUILD/bench/prefill"
fi
if [ $# -eq 0 ]; then set -- --tokens 4096,32768; fi
"$BUILD/bench/prefill" --device cpu "$@"
if [ -n "${CUDA:-}" ]; then "$BUILD/bench/prefill" --device cuda "$@"; fi
