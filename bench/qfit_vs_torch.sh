#!/usr/bin/env bash
# qfit_vs_torch.sh - tallyd's quantile aggregator fit beside the PyTorch
# transcription (bench/qfit_torch.py), in one run: fine-global and
# medium-local, batch 64 and 256, one epoch over ROWS rows (M = 6, K = 99).
# Each cell runs tallyd and PyTorch alternately ROUNDS times (the machine is
# shared; alternating spreads its load over both) and prints the median
# rows/s of each and their ratio. Both use 2 threads: bench_qfit a pool of 2,
# PyTorch torch.set_num_threads(2) with OPENBLAS_NUM_THREADS=1. PyTorch on
# one thread is printed too: on a loaded machine its two OpenMP threads can
# spin against each other and fall far below its one-thread figure, and the
# stronger of the two is the fair yardstick.
#
#   bench/qfit_vs_torch.sh [ROWS=100000] [ROUNDS=3]
#
# PyTorch is Debian's python3-torch (bash deploy/deps.sh baselines); it is
# never a dependency of tallyd itself. Without it the script says so and exits 0.
set -eu
ROWS=${1:-100000}
ROUNDS=${2:-3}
BUILD=${BUILD:-build}
PY=${PYTHON:-/usr/bin/python3}
cd "$(dirname "$0")/.."
make -s "$BUILD/bench/bench_qfit" >/dev/null
if ! OPENBLAS_NUM_THREADS=1 "$PY" -c 'import torch' 2>/dev/null; then
  echo "qfit_vs_torch: PyTorch is not installed (bash deploy/deps.sh baselines); skipped"
  exit 0
fi
median() { sort -n | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
printf '# quantile aggregator fit, %s rows, one epoch, 2 threads, median of %s alternating rounds\n' "$ROWS" "$ROUNDS"
printf '# %-13s %5s %14s %14s %14s %8s\n' aggregator batch tallyd_rows/s torch2T_rows/s torch1T_rows/s ratio
for name in fine-global medium-local; do
  for batch in 64 256; do
    t=""; p=""; p1=""
    for _ in $(seq "$ROUNDS"); do
      t="$t $("$BUILD/bench/bench_qfit" "$ROWS" 1 2 "$batch" "$name" | awk -v n="$name" '$1 == n {print $3}')"
      p="$p $(OPENBLAS_NUM_THREADS=1 "$PY" bench/qfit_torch.py "$ROWS" "$batch" "$name" 2 | awk '{print $3}')"
      p1="$p1 $(OPENBLAS_NUM_THREADS=1 "$PY" bench/qfit_torch.py "$ROWS" "$batch" "$name" 1 | awk '{print $3}')"
    done
    tm=$(echo $t | tr ' ' '\n' | median)
    pm=$(echo $p | tr ' ' '\n' | median)
    p1m=$(echo $p1 | tr ' ' '\n' | median)
    # the ratio is against the faster PyTorch figure
    printf '  %-13s %5s %14.0f %14.0f %14.0f %8.2f\n' "$name" "$batch" "$tm" "$pm" "$p1m" \
      "$(echo "$tm $pm $p1m" | awk '{print $1 / ($2 > $3 ? $2 : $3)}')"
  done
done
