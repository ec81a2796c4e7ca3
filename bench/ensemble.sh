#!/usr/bin/env bash
# bench/ensemble.sh - throughput and fit cost of the `ensemble` kind.
#
#   bash bench/ensemble.sh            (after make; BUILD=build-san etc. to pick a build)
#
# 1. Infer over HTTP with wrk: the 9-member AWARE-NET example (3 families x 3
#    hosted mlp 8 -> 16 -> 1, run in parallel per request) against one of its
#    members alone (the same mlp), at B = 1 and B = 256; prints requests/s,
#    rows/s and the ensemble/single ratio.
# 2. Fit on 1,000,000 rows x 9 member_outputs sent with the binary tensor
#    extension (36 MB FP32 + 4 MB INT32 labels, under the default 64 MiB body
#    cap), 1 and 2 epochs, timed with curl: the difference is the cost of one
#    epoch per million rows, the rest is decoding, P, metrics and the commit.
#    Reports the daemon's peak RSS (VmHWM) after the fits.
# Env: SECONDS_PER_RUN (default 5), CONNS (default 8), THREADS (wrk, default 2).
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build}
PY=${PYTHON:-python3}
DUR=${SECONDS_PER_RUN:-5}
CONNS=${CONNS:-8}
WT=${THREADS:-2}
BIN=$PWD/$BUILD/tallyd
[ -x "$BIN" ] || { echo "build $BIN first (make)"; exit 1; }
command -v wrk >/dev/null || { echo "wrk is needed (apt-get install wrk)"; exit 1; }

work=$(mktemp -d)
pid=
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT

$PY deploy/gen_models.py "$work/repo" >/dev/null
port=$($PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$BIN" --model-repository "$work/repo" --listen 127.0.0.1:$port --log-level warn >"$work/log" 2>&1 &
pid=$!
url=http://127.0.0.1:$port
for _ in $(seq 100); do curl -sf $url/v2/health/ready >/dev/null && break; sleep 0.1; done
curl -sf $url/v2/health/ready >/dev/null || { cat "$work/log"; exit 1; }

$PY - "$work" <<'PYEOF'
import json, random, sys
w = sys.argv[1]
rng = random.Random(1)
for B in (1, 256):
    x = [[round(rng.gauss(0, 1), 4) for _ in range(8)] for _ in range(B)]
    with open("%s/infer_%d.json" % (w, B), "w") as f:
        json.dump({"inputs": [{"name": "features", "shape": [B, 8], "datatype": "FP32", "data": x}]}, f)
PYEOF

cat >"$work/post.lua" <<'LUAEOF'
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local f = io.open(os.getenv("BODY"), "rb")
wrk.body = f:read("*a")
f:close()
LUAEOF

rps() { # model, body -> requests/s
  local out
  out=$(BODY=$2 wrk -t"$WT" -c"$CONNS" -d"${DUR}s" -s "$work/post.lua" "$url/v2/models/$1/infer")
  if echo "$out" | grep -q "Non-2xx"; then echo "$out" >&2; echo "non-2xx answers from $1" >&2; exit 1; fi
  echo "$out" | awk '/Requests\/sec/ {print $2}'
}

echo "== infer over HTTP (wrk -t$WT -c$CONNS, ${DUR}s each, $(nproc) cores)"
printf "%-6s %-16s %12s %14s\n" B model req/s rows/s
for B in 1 256; do
  e=$(rps aware_ensemble "$work/infer_$B.json")
  s=$(rps aware_xception_1 "$work/infer_$B.json")
  printf "%-6s %-16s %12.0f %14.0f\n" $B "ensemble (9)" "$e" "$(echo "$e * $B" | bc -l)"
  printf "%-6s %-16s %12.0f %14.0f\n" $B "single mlp" "$s" "$(echo "$s * $B" | bc -l)"
  printf "%-6s ensemble/single = %.3f\n" $B "$(echo "$e / $s" | bc -l)"
done

echo "== fit: 1,000,000 rows x 9 member_outputs, binary tensor extension"
$PY - "$work" <<'PYEOF'
import array, json, random, sys
w = sys.argv[1]
N, n = 1000000, 9
rng = random.Random(5)
labels = array.array("i", (rng.getrandbits(1) for _ in range(N)))
# family 0 (members 0-2) informative, the others noise: z = s * k + noise
g = [rng.gauss(0, 1) for _ in range(4096)]
z = array.array("f", bytes(4 * N * n))
k = 0
for b in range(N):
    s = 1.0 if labels[b] else -1.0
    base = b * n
    for m in range(n):
        z[base + m] = (1.5 * s if m < 3 else 0.0) + g[k & 4095] * (1.0 + 0.1 * m)
        k += 7
for epochs in (1, 2):
    head = {"parameters": {"epochs": epochs, "patience": 0, "seed": 1},
            "inputs": [{"name": "member_outputs", "shape": [N, n], "datatype": "FP32",
                        "parameters": {"binary_data_size": 4 * N * n}},
                       {"name": "labels", "shape": [N], "datatype": "INT32",
                        "parameters": {"binary_data_size": 4 * N}}]}
    js = json.dumps(head).encode()
    with open("%s/fit_%d.bin" % (w, epochs), "wb") as f:
        f.write(js)
        f.write(z.tobytes())
        f.write(labels.tobytes())
    with open("%s/fit_%d.hlen" % (w, epochs), "w") as f:
        f.write(str(len(js)))
PYEOF
ls -la "$work"/fit_1.bin | awk '{printf "request body: %.1f MB\n", $5 / 1e6}'
declare -A T
for e in 1 2; do
  out=$(curl -s -o "$work/fit_$e.out" -w "%{http_code} %{time_total}" -X POST "$url/v2/models/aware_ensemble/fit" \
    -H "Content-Type: application/octet-stream" \
    -H "Inference-Header-Content-Length: $(cat "$work/fit_$e.hlen")" --data-binary @"$work/fit_$e.bin")
  code=${out% *}
  [ "$code" = 200 ] || { echo "fit answered $code: $(head -c 400 "$work/fit_$e.out")"; exit 1; }
  T[$e]=${out#* }
  printf "epochs=%d: %.2f s total; alpha %s\n" $e "${T[$e]}" \
    "$($PY -c 'import json,sys; print([round(a, 3) for a in json.load(open(sys.argv[1]))["weights"]["alpha"]])' "$work/fit_$e.out")"
done
printf "one epoch on 1M rows (800k train + 200k validation monitored): %.2f s\n" "$(echo "${T[2]} - ${T[1]}" | bc -l)"
printf "fixed cost (upload, decode, sha256, P, metrics, commit): %.2f s\n" "$(echo "2 * ${T[1]} - ${T[2]}" | bc -l)"
awk '/VmHWM/ {printf "daemon peak RSS: %.0f MB\n", $2 / 1024}' /proc/$pid/status
