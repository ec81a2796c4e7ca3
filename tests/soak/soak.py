#!/usr/bin/env python3
"""Soak: SOAK_REQUESTS (default 1,000,000) mixed requests over keep-alive
connections from tests/tools/loadgen against one tallyd serving deploy/models.

The mix holds, for every model the repository serves (whatever kinds are
present), a valid infer built from its metadata plus invalid ones (wrong
shape, malformed JSON, NaN in binary data, an unknown model, a bad route),
and the cheap endpoints. After a 5% warm-up the daemon's resident memory
(VmRSS) and open descriptors (/proc/PID/fd) are the baseline; they are
sampled after each tenth of the run. Passes when there are zero 5xx, zero
transport errors, the daemon is alive, RSS grew < 5% over the baseline and
the descriptor count did not grow. Not part of `make test` (minutes)."""
import json
import os
import struct
import subprocess
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "tests", "integration"))
from harness import Daemon  # noqa: E402

BUILD = os.environ.get("BUILD", "build")
LOADGEN = os.path.join(ROOT, BUILD, "tests", "tools", "loadgen")
N = int(os.environ.get("SOAK_REQUESTS", "1000000"))
CONNS = int(os.environ.get("SOAK_CONNECTIONS", "16"))


def rss_kb(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])


def nfds(pid):
    return len(os.listdir("/proc/%d/fd" % pid))


def http(method, path, body=b"", headers=()):
    h = ["%s %s HTTP/1.1" % (method, path), "Host: soak"] + list(headers)
    if method == "POST":
        h.append("Content-Length: %d" % len(body))
    return ("\r\n".join(h) + "\r\n\r\n").encode() + body


def values(dt, n, k):
    if dt == "BOOL":
        return [bool((i + k) % 2) for i in range(n)]
    if dt.startswith("FP"):
        return [((i * 7 + k) % 11 - 5) / 5.0 for i in range(n)]
    return [(i + k) % 8 for i in range(n)]


def valid_request(meta, k):
    inputs = []
    for io in meta["inputs"]:
        shape = [2 if d == -1 else d for d in io["shape"]]
        n = 1
        for d in shape:
            n *= d
        inputs.append({"name": io["name"], "shape": shape, "datatype": io["datatype"],
                       "data": values(io["datatype"], n, k)})
    return {"inputs": inputs}


def build_mix(d):
    mix = []  # (expected class, raw bytes)
    models = [e["name"] for e in d.post("/v2/repository/index", {}).json() if e["state"] == "READY"]
    for m in models:
        meta = d.get("/v2/models/%s" % m).json()
        path = "/v2/models/%s/infer" % m
        for k in range(3):
            b = json.dumps(valid_request(meta, k)).encode()
            r = d.post(path, b, headers={"Content-Type": "application/json"})
            # a kind whose inputs are alternatives may refuse the full set:
            # then it is kept as an invalid request
            mix.append((2 if r.status == 200 else 4, http("POST", path, b)))
        io = meta["inputs"][0]
        bad = {"inputs": [{"name": io["name"], "shape": [1, 3, 5, 7], "datatype": io["datatype"],
                           "data": [0] * 105}]}
        mix.append((4, http("POST", path, json.dumps(bad).encode())))
        mix.append((4, http("POST", path, b'{"inputs": [{"name": ')))
        if io["datatype"] in ("FP32",):
            shape = [2 if x == -1 else x for x in io["shape"]]
            n = 1
            for x in shape:
                n *= x
            blob = struct.pack("<%df" % n, *([float("nan")] + [0.5] * (n - 1)))
            head = json.dumps({"inputs": [{"name": io["name"], "shape": shape, "datatype": "FP32",
                                           "parameters": {"binary_data_size": len(blob)}}]}).encode()
            mix.append((4, http("POST", path, head + blob,
                                ["Inference-Header-Content-Length: %d" % len(head)])))
        mix.append((2, http("GET", "/v2/models/%s" % m)))
        mix.append((2, http("GET", "/v2/models/%s/ready" % m)))
    mix.append((4, http("POST", "/v2/models/no_such_model/infer", b"{}")))
    mix.append((4, http("GET", "/v2/no/such/route")))
    mix.append((4, http("DELETE", "/v2/health/live")))
    mix.append((2, http("GET", "/v2/health/ready")))
    mix.append((2, http("GET", "/v2")))
    return models, mix


def main():
    repo = os.path.join(ROOT, "deploy", "models")
    d = Daemon(repo, ["--threads", "2", "--log-level", "warn", "--queue-depth", "1024"]).start()
    ok = True
    try:
        models, mix = build_mix(d)
        fd, mix_path = tempfile.mkstemp(prefix="tallyd-soak-mix-")
        with os.fdopen(fd, "wb") as f:
            for cls, raw in mix:
                f.write(b"%d %d\n" % (cls, len(raw)) + raw + b"\n")
        print("soak: %d requests over %d connections; models %s; mix of %d requests"
              % (N, CONNS, ", ".join(models), len(mix)))

        def run(n):
            r = subprocess.run([LOADGEN, "--port", str(d.port), "--mix", mix_path,
                                "--requests", str(n), "--connections", str(CONNS)],
                               capture_output=True, text=True)
            print("  " + (r.stdout.strip() or r.stderr.strip()))
            return r.returncode, r.stdout

        warm = max(N // 20, 1000)
        rc, _ = run(warm)
        ok &= rc == 0
        pid = d.proc.pid
        time.sleep(0.5)  # let the daemon close the load generator's connections
        rss0, fd0 = rss_kb(pid), nfds(pid)
        print("  after warm-up: RSS %.1f MB, %d fds" % (rss0 / 1024, fd0))
        rest = N - warm
        t0 = time.time()
        peak = rss0
        for i in range(10):
            rc, _ = run(rest // 10)
            ok &= rc == 0
            time.sleep(0.5)
            rss, fds = rss_kb(pid), nfds(pid)
            peak = max(peak, rss)
            print("  tenth %d: RSS %.1f MB (%+.1f%%), %d fds" % (i + 1, rss / 1024,
                                                               100.0 * (rss - rss0) / rss0, fds))
        dt = time.time() - t0
        time.sleep(0.5)
        rss1, fd1 = rss_kb(pid), nfds(pid)
        growth = 100.0 * (rss1 - rss0) / rss0
        alive = d.proc.poll() is None
        print("soak: %d requests in %.0f s after warm-up; RSS %.1f -> %.1f MB (%+.2f%%, peak %.1f); "
              "fds %d -> %d; daemon %s" % (N, dt, rss0 / 1024, rss1 / 1024, growth, peak / 1024,
                                          fd0, fd1, "alive" if alive else "DEAD"))
        ok &= alive and growth < 5.0 and fd1 <= fd0
        os.unlink(mix_path)
    finally:
        rc = d.stop()
        print("soak: daemon exit %s" % rc)
        ok &= rc == 0
    print("soak: %s" % ("PASS" if ok else "FAIL"))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
