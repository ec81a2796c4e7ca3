#!/usr/bin/env bash
# bench/sustained.sh - sustained mixed infer load at half the measured
# maximum throughput, with TLS off and on. Prints p50/p99/p99.9 latency,
# the rate achieved and the daemon's peak resident memory (VmHWM).
#
#   bash bench/sustained.sh            (SECONDS_PER_RUN=30; BUILD=build)
#
# Method (wrk 4.1 has no rate control, unlike wrk2):
#  1. max: wrk -t2 -c32 for 5 s against the same mix; its requests/s is the
#     measured maximum.
#  2. sustained: wrk -t2 for $SECONDS_PER_RUN s where each connection waits 10 ms
#     after every answer (wrk's Lua delay()), with target x 10.5 ms
#     connections, so that the offered rate is about 50% of the maximum:
#     C connections x 1/(latency + 10 ms) requests/s. The load stays
#     closed-loop: like wrk, not wrk2, it does not correct for coordinated
#     omission, and when latency grows the rate falls below the target. The
#     achieved rate is printed beside the target.
# The mix: every ready model of the example repository whose input is one
# FP32 tensor [-1, D] gets a one-row request; requests alternate between
# them. Runs on loopback only; the daemon is stopped at the end.
set -eu
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build}
SECS=${SECONDS_PER_RUN:-30}   # not $SECONDS: bash counts seconds in it
[ "$SECS" -gt 600 ] 2>/dev/null && SECS=30
MODELS=${MODELS:-deploy/models}
PY=${PYTHON:-python3}
command -v wrk >/dev/null || { echo "sustained.sh: wrk is missing (bash deploy/deps.sh --bench)"; exit 1; }
command -v openssl >/dev/null || { echo "sustained.sh: openssl is missing"; exit 1; }
[ -x "$BUILD/tallyd" ] || make -j2 "$BUILD/tallyd" >/dev/null
[ -f "$MODELS/.generated" ] || make models MODELS="$MODELS" >/dev/null

work=$(mktemp -d)
pid=""
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT

openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=127.0.0.1 \
  -addext subjectAltName=IP:127.0.0.1 -keyout "$work/key.pem" -out "$work/cert.pem" 2>/dev/null

port=$($PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')

start() { # $1: extra flags
  "$BUILD/tallyd" --model-repository "$MODELS" --listen "127.0.0.1:$port" --log-level warn \
    --queue-depth 4096 $1 >"$work/daemon.log" 2>&1 &
  pid=$!
  for _ in $(seq 200); do
    curl -skf "$2://127.0.0.1:$port/v2/health/ready" >/dev/null 2>&1 && return 0
    sleep 0.05
  done
  echo "sustained.sh: the daemon did not start:"; cat "$work/daemon.log"; exit 1
}
stop() { kill "$pid"; wait "$pid" 2>/dev/null || true; pid=""; }

# the request mix, from the models' metadata
start "" http
$PY - "$port" "$work/mix.lua" <<'PYEOF'
import json, sys, urllib.request
port, out = sys.argv[1], sys.argv[2]
base = "http://127.0.0.1:%s" % port
idx = json.load(urllib.request.urlopen(urllib.request.Request(base + "/v2/repository/index", data=b"{}")))
reqs = []
for e in idx:
    if e.get("state") != "READY":
        continue
    meta = json.load(urllib.request.urlopen(base + "/v2/models/" + e["name"]))
    ins = meta["inputs"]
    if len(ins) != 1 or ins[0]["datatype"] != "FP32" or len(ins[0]["shape"]) != 2:
        continue
    d = ins[0]["shape"][1]
    if d <= 0:
        continue
    body = {"inputs": [{"name": ins[0]["name"], "shape": [1, d], "datatype": "FP32",
                        "data": [round(0.1 * ((i % 7) - 3), 3) for i in range(d)]}]}
    reqs.append(("/v2/models/%s/infer" % e["name"], json.dumps(body)))
if not reqs:
    sys.exit("no example model takes a single FP32 [B, D] input")
with open(out, "w") as f:
    f.write("local reqs = {\n")
    for path, body in reqs:
        f.write("  wrk.format('POST', %s, {['Content-Type'] = 'application/json'}, %s),\n"
                % (json.dumps(path), json.dumps(body)))
    f.write("}\n")
    f.write("""local n = 0
local wait_ms = tonumber(os.getenv('WAIT_MS') or '0')
request = function()
  n = n + 1
  return reqs[(n % #reqs) + 1]
end
if wait_ms > 0 then
  delay = function() return wait_ms end
end
response = function(status, headers, body)
  if status ~= 200 then errors_seen = (errors_seen or 0) + 1 end
end
done = function(summary, latency, requests)
  io.write(string.format("RESULT requests=%d secs=%.2f p50_ms=%.3f p99_ms=%.3f p999_ms=%.3f non2xx=%d\\n",
    summary.requests, summary.duration / 1e6, latency:percentile(50) / 1000,
    latency:percentile(99) / 1000, latency:percentile(99.9) / 1000,
    (summary.errors.status or 0)))
end
""")
print("mix: " + ", ".join(p.split("/")[3] for p, _ in reqs))
PYEOF
stop

run() { # $1 label, $2 flags, $3 scheme
  start "$2" "$3"
  url="$3://127.0.0.1:$port"
  max=$(WAIT_MS=0 wrk -t2 -c32 -d5s -s "$work/mix.lua" "$url" | sed -n 's/^RESULT requests=\([0-9]*\) secs=\([0-9.]*\).*/\1 \2/p' |
        awk '{printf "%.0f", $1 / $2}')
  target=$((max / 2))
  # each connection sends one request per (latency + 10 ms wait): with a
  # sub-millisecond latency, target x 10.5 ms connections offer the target
  wait_ms=10
  conns=$(awk -v t=$target 'BEGIN { c = int(t * 0.0105 + 0.5); if (c < 1) c = 1; print c }')
  line=$(WAIT_MS=$wait_ms wrk -t2 -c$conns -d${SECS}s -s "$work/mix.lua" "$url" | grep '^RESULT')
  hwm=$(awk '/VmHWM/ {print $2 " " $3}' /proc/$pid/status)
  stop
  echo "$line" | awk -v l="$1" -v m="$max" -v t="$target" -v c="$conns" -v w="$wait_ms" -v h="$hwm" '{
    split($2, a, "="); split($3, b, "=");
    printf "%-8s max %6d req/s | target %6d req/s (%d conns, %d ms wait) achieved %6.0f req/s | %s %s %s %s | VmHWM %s\n",
      l, m, t, c, w, a[2] / b[2], $4, $5, $6, $7, h }'
}

echo "tallyd sustained load: ${SECS} s per run, $(nproc) cores, wrk $(wrk -v 2>&1 | head -1 | awk '{print $2}')"
run "tls-off" "" http
run "tls-on" "--tls-cert $work/cert.pem --tls-key $work/key.pem" https
