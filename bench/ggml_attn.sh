#!/usr/bin/env bash
# bench/ggml_attn.sh - decode attention (one query per head, 12 heads, d = 64,
# kv = 4,096 and 16,384) beside ggml's CPU flash attention, in one command:
# ggml, then build/bench/bench_decode_attn (float32 cache, float16 cache and
# the old re-packing path), then ggml again, so that a change in the machine's
# load shows as a difference between the two ggml runs.
#
# ggml is not part of this repository: GGML_SRC names a ggml source tree (a
# snapshot of github.com/ggml-org/ggml), built here with cmake into a temporary
# folder (GGML_BUILD to keep one), CPU only, -march=native (ggml's default).
# Without GGML_SRC the script says so and runs tallyd's side alone.
#
#   GGML_SRC=/path/to/ggml bash bench/ggml_attn.sh     (THREADS, ROUNDS optional)
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build}
THREADS=${THREADS:-$(nproc)}
ROUNDS=${ROUNDS:-15}
make -s "$BUILD/bench/bench_decode_attn"
ours() { "$BUILD/bench/bench_decode_attn" --threads "$THREADS" --rounds "$ROUNDS" --variants softmax,lssar; }
if [ -z "${GGML_SRC:-}" ] || [ ! -f "$GGML_SRC/include/ggml.h" ]; then
  echo "skip ggml: set GGML_SRC to a ggml source tree to print its figures beside these"
  ours
  exit 0
fi
work=${GGML_BUILD:-$(mktemp -d)}
[ -n "${GGML_BUILD:-}" ] || trap 'rm -rf "$work"' EXIT
cmake -S "$GGML_SRC" -B "$work" -DCMAKE_BUILD_TYPE=Release -DGGML_BUILD_TESTS=OFF \
  -DGGML_BUILD_EXAMPLES=OFF -DBUILD_SHARED_LIBS=OFF >/dev/null
cmake --build "$work" -j"$THREADS" >/dev/null
libs=("$work/src/libggml.a" "$work/src/libggml-cpu.a" "$work/src/libggml-base.a")
cc -O2 -I "$GGML_SRC/include" -o "$work/decode_attn" bench/ggml/decode_attn.c "${libs[@]}" \
  -lm -lpthread -lstdc++ $(cc -print-file-name=libgomp.so >/dev/null 2>&1 && echo -lgomp)
"$work/decode_attn" "$THREADS" "$ROUNDS"
ours
"$work/decode_attn" "$THREADS" "$ROUNDS" | tail -2
