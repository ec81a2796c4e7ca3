#!/usr/bin/env bash
# bench/run.sh - HTTP throughput of tallyd, measured with wrk on loopback:
#   (a) GET /v2/health/live   (b) a one-row, 16-feature mlp infer (demo_mlp)
# printed side by side with the ratio b/a. Both run against the same daemon in
# the same invocation, so the ratio is fair on a noisy machine.
# Usage: bench/run.sh [SECONDS] [CONNECTIONS]   (needs wrk: deploy/deps.sh --bench)
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build}
SECS=${1:-5}
CONNS=${2:-64}
bash deploy/deps.sh --bench >/dev/null
command -v wrk >/dev/null || { echo "wrk is not installed" >&2; exit 1; }
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
bport=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$BUILD/tallyd" --model-repository deploy/models --listen 127.0.0.1:$port --log-level warn &
pid=$!
"$BUILD/bench/mhd_baseline" $bport 2 &
bpid=$!
trap 'kill $pid $bpid 2>/dev/null; wait $pid $bpid 2>/dev/null; rm -f "$tmp"' EXIT
tmp=$(mktemp)
for i in $(seq 100); do curl -sf localhost:$port/v2/health/ready >/dev/null && break; sleep 0.1; done
cat > "$tmp" <<'LUA'
wrk.method = "POST"
wrk.body = '{"inputs":[{"name":"features","shape":[1,16],"datatype":"FP32","data":[0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0,1.1,1.2,1.3,1.4,1.5,1.6]}]}'
wrk.headers["Content-Type"] = "application/json"
LUA
run() { wrk -t2 -c$CONNS -d${SECS}s --latency "$@" 2>&1; }
# each baseline right before its tallyd counterpart, so load drifts hit both alike
ya=$(run http://127.0.0.1:$bport/)
a=$(run http://127.0.0.1:$port/v2/health/live)
yb=$(run -s "$tmp" http://127.0.0.1:$bport/)
b=$(run -s "$tmp" http://127.0.0.1:$port/v2/models/demo_mlp/infer)
rps() { awk '/Requests\/sec/ {print $2}' <<<"$1"; }
pct() { awk -v p="$2" '$1==p {print $2}' <<<"$1"; }
errs() { awk '/Non-2xx|Socket errors/ {print}' <<<"$1" | tr '\n' ' '; }
printf '%-34s %12s %10s %10s\n' "endpoint ($CONNS conns, ${SECS}s)" "requests/s" "p50" "p99"
printf '%-34s %12s %10s %10s\n' "baseline: MHD GET, 16 bytes" "$(rps "$ya")" "$(pct "$ya" 50%)" "$(pct "$ya" 99%)"
printf '%-34s %12s %10s %10s\n' "(a) tallyd GET /v2/health/live" "$(rps "$a")" "$(pct "$a" 50%)" "$(pct "$a" 99%)"
printf '%-34s %12s %10s %10s\n' "baseline: MHD POST + jansson" "$(rps "$yb")" "$(pct "$yb" 50%)" "$(pct "$yb" 99%)"
printf '%-34s %12s %10s %10s\n' "(b) tallyd demo_mlp infer, 1x16" "$(rps "$b")" "$(pct "$b" 50%)" "$(pct "$b" 99%)"
awk -v a="$(rps "$a")" -v b="$(rps "$b")" -v ya="$(rps "$ya")" -v yb="$(rps "$yb")" 'BEGIN {
  printf "ratio b/a: %.3f   (a) / MHD GET: %.0f%% (aim 80%%)   (b) / MHD POST: %.0f%% (aim 70%%)\n",
         b / a, 100 * a / ya, 100 * b / yb }'
e="$(errs "$a")$(errs "$b")"; [ -n "$e" ] && echo "errors: $e"
echo "(the baselines are bench/mhd_baseline.c: plain libmicrohttpd, thread pool + epoll)"
