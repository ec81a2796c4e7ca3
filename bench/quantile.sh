#!/usr/bin/env bash
# bench/quantile.sh - the quantile_ensemble kind over HTTP, end to end:
#   (a) fit time of a global-fine and a local-medium aggregator on ROWS rows
#       (default 100,000), M = 6 external bases, K = 99 levels, D = 8 features,
#       sent with the binary tensor extension; rows per second per epoch;
#   (b) infer throughput (wrk, as bench/run.sh) of B = 1 (JSON body) and
#       B = 1024 (binary body, binary output) requests on the global-fine model.
# The fit time includes decoding the ~240 MB body, the "before"/"after"
# metrics and writing the new version; the per-epoch rate divides the whole
# request's time, so it is a lower bound on the training loop's own rate
# (bench/bench_qfit.c measures that one alone).
# Usage: bench/quantile.sh [EPOCHS] [SECONDS] [ROWS]   (needs wrk)
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build}
EPOCHS=${1:-2}
SECS=${2:-5}
ROWS=${3:-100000}
PY=${PYTHON:-python3}
command -v wrk >/dev/null || bash deploy/deps.sh --bench >/dev/null
command -v wrk >/dev/null || { echo "wrk is not installed" >&2; exit 1; }
[ -x "$BUILD/tallyd" ] || make -s "$BUILD/tallyd"
tmp=$(mktemp -d)
pid=
trap '[ -n "$pid" ] && kill $pid 2>/dev/null; wait 2>/dev/null; rm -rf "$tmp"' EXIT

# Repository and request bodies. 512 distinct rows are tiled up to ROWS:
# the fit's cost does not depend on the values (no validation split, so no
# early stopping), and tiling keeps the standard-library generator fast.
"$PY" - "$tmp" "$ROWS" "$EPOCHS" <<'PY'
import json, math, os, random, struct, sys
tmp, rows, epochs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
M, K, D, U = 6, 99, 8, 512
levels = [round(0.01 * i, 2) for i in range(1, K + 1)]
def probit(p):  # Acklam's rational approximation, enough for synthetic bases
    a = [-39.6968302866538, 220.946098424521, -275.928510446969, 138.357751867269, -30.6647980661472, 2.50662827745924]
    b = [-54.4760987982241, 161.585836858041, -155.698979859887, 66.8013118877197, -13.2806815528857]
    q = p - 0.5; r = q * q
    if abs(q) < 0.425:
        return (((((a[0]*r+a[1])*r+a[2])*r+a[3])*r+a[4])*r+a[5])*q / (((((b[0]*r+b[1])*r+b[2])*r+b[3])*r+b[4])*r+1)
    r = math.sqrt(-math.log(min(p, 1 - p)))
    c = [-0.00778489400243029, -0.322396458041136, -2.40075827716184, -2.54973253934373, 4.37466414146497, 2.93816398269878]
    d = [0.00778469570904146, 0.32246712907004, 2.445134137143, 3.75440866190742]
    x = (((((c[0]*r+c[1])*r+c[2])*r+c[3])*r+c[4])*r+c[5]) / ((((d[0]*r+d[1])*r+d[2])*r+d[3])*r+1)
    return x if q < 0 else -x
z = [probit(t) for t in levels]
rng = random.Random(1)
zb, xb, yb = [], [], []
for _ in range(U):
    x = [rng.uniform(-1, 1) for _ in range(D)]
    m, s = x[0] + 0.5 * x[1], 0.2 + abs(x[2])
    for j in range(M):
        c, w = m + 0.3 * (j - 2.5) * x[3], s * (0.7 + 0.15 * j)
        zb += [c + w * zz for zz in z]
    xb += x
    yb.append(m + s * rng.gauss(0, 1))
rep = (rows + U - 1) // U
Z = (struct.pack("<%df" % len(zb), *zb) * rep)[: rows * M * K * 4]
X = (struct.pack("<%df" % len(xb), *xb) * rep)[: rows * D * 4]
Y = (struct.pack("<%df" % len(yb), *yb) * rep)[: rows * 4]
def body(B, parts, params, binary_out=False):
    names = [("base_quantiles", [B, M, K]), ("features", [B, D]), ("targets", [B])][: len(parts)]
    head = {"inputs": [{"name": n, "shape": s, "datatype": "FP32",
                        "parameters": {"binary_data_size": len(p)}} for (n, s), p in zip(names, parts)]}
    if params:
        head["parameters"] = params
    if binary_out:
        head["outputs"] = [{"name": "quantiles", "parameters": {"binary_data": True}}]
    js = json.dumps(head).encode()
    return js, b"".join(parts)
def write(name, B, parts, params=None, binary_out=False):
    js, data = body(B, parts, params, binary_out)
    with open(os.path.join(tmp, name), "wb") as f:
        f.write(js + data)
    with open(os.path.join(tmp, name + ".hlen"), "w") as f:
        f.write(str(len(js)))
fitp = {"epochs": epochs, "validation_fraction": 0, "batch_size": 256, "learning_rate": 1e-3}
write("fit.bin", rows, [Z, X, Y], fitp)
write("infer1024.bin", 1024, [Z[: 1024 * M * K * 4], X[: 1024 * D * 4]], binary_out=True)
with open(os.path.join(tmp, "infer1.json"), "w") as f:
    json.dump({"inputs": [{"name": "base_quantiles", "shape": [1, M, K], "datatype": "FP32",
                           "data": zb[: M * K]},
                          {"name": "features", "shape": [1, D], "datatype": "FP32", "data": xb[:D]}]}, f)
for name, agg in (("q_fine", {"granularity": "fine", "scope": "global"}),
                  ("q_local", {"granularity": "medium", "scope": "local", "hidden": 64, "depth": 2})):
    os.makedirs(os.path.join(tmp, "repo", name, "1"))
    with open(os.path.join(tmp, "repo", name, "config.json"), "w") as f:
        json.dump({"kind": "quantile_ensemble", "levels": levels, "features": D,
                   "bases": [{"external": "b%d" % j} for j in range(M)], "aggregator": agg,
                   "monotone": "sort"}, f)
PY

port=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$BUILD/tallyd" --model-repository "$tmp/repo" --listen 127.0.0.1:$port --log-level warn \
  --max-body-bytes 1000000000 &
pid=$!
for i in $(seq 100); do curl -sf localhost:$port/v2/health/ready >/dev/null && break; sleep 0.1; done

echo "quantile_ensemble over HTTP: $ROWS rows, M=6, K=99, D=8, $EPOCHS epochs, $(nproc) cores"
printf '%-26s %10s %8s %16s %12s\n' "fit" "wall s" "epochs" "rows/s/epoch" "pinball"
for m in q_fine q_local; do
  t0=$(date +%s.%N)
  curl -sf -H "Inference-Header-Content-Length: $(cat "$tmp/fit.bin.hlen")" \
    -H "Content-Type: application/octet-stream" --data-binary @"$tmp/fit.bin" \
    localhost:$port/v2/models/$m/fit -o "$tmp/ans.json"
  t1=$(date +%s.%N)
  "$PY" - "$tmp/ans.json" "$t0" "$t1" "$m" <<'PY'
import json, sys
a = json.load(open(sys.argv[1])); w = float(sys.argv[3]) - float(sys.argv[2])
label = {"q_fine": "global fine", "q_local": "local medium (H=64, 2)"}[sys.argv[4]]
n, e = a["rows"]["train"], a["epochs_run"]
print("%-26s %10.2f %8d %16.0f %12.5f" % (label, w, e, n * e / w, a["metrics"]["after"]["pinball"]))
PY
done

cat > "$tmp/b1.lua" <<LUA
wrk.method = "POST"
local f = io.open("$tmp/infer1.json", "rb"); wrk.body = f:read("*a"); f:close()
wrk.headers["Content-Type"] = "application/json"
LUA
cat > "$tmp/b1024.lua" <<LUA
wrk.method = "POST"
local f = io.open("$tmp/infer1024.bin", "rb"); wrk.body = f:read("*a"); f:close()
wrk.headers["Content-Type"] = "application/octet-stream"
wrk.headers["Inference-Header-Content-Length"] = "$(cat "$tmp/infer1024.bin.hlen")"
LUA
run() { wrk -t2 -c$1 -d${SECS}s --latency -s "$2" http://127.0.0.1:$port/v2/models/q_fine/infer 2>&1; }
rps() { awk '/Requests\/sec/ {print $2}' <<<"$1"; }
pct() { awk -v p="$2" '$1==p {print $2}' <<<"$1"; }
errs() { awk '/Non-2xx|Socket errors/ {print}' <<<"$1" | tr '\n' ' '; }
a=$(run 64 "$tmp/b1.lua")
b=$(run 8 "$tmp/b1024.lua")
printf '%-34s %12s %12s %10s %10s\n' "infer, global fine (${SECS}s)" "requests/s" "rows/s" "p50" "p99"
printf '%-34s %12s %12s %10s %10s\n' "B = 1, JSON, 64 conns" "$(rps "$a")" \
  "$(awk -v r="$(rps "$a")" 'BEGIN{printf "%.0f", r}')" "$(pct "$a" 50%)" "$(pct "$a" 99%)"
printf '%-34s %12s %12s %10s %10s\n' "B = 1024, binary, 8 conns" "$(rps "$b")" \
  "$(awk -v r="$(rps "$b")" 'BEGIN{printf "%.0f", r * 1024}')" "$(pct "$b" 50%)" "$(pct "$b" 99%)"
e="$(errs "$a")$(errs "$b")"; [ -n "$e" ] && echo "errors: $e"
exit 0
