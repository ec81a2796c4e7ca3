#!/usr/bin/env python3
"""bench/compression.py - what Content-Encoding and Accept-Encoding cost and
save, beside the plain requests of the same run: one keep-alive connection to
a fresh tallyd (deploy/models), N infer requests of demo_mlp with ROWS rows of
16 features, JSON in and out, in four ways:

  plain                  no compression (the baseline)
  gzip body              Content-Encoding: gzip (tritonclient's request_compression_algorithm)
  gzip answer            Accept-Encoding: gzip (response_compression_algorithm)
  gzip both

Prints bytes sent and received per request and the median and p90 latency,
each next to the baseline's; then a gzip bomb (256 MiB of zeros) refused at
--max-body-bytes, with the time it took and the daemon's peak memory growth.

Usage: bench/compression.py [N] [ROWS]   (defaults 300, 256; BUILD=build)"""
import gzip
import http.client
import json
import os
import random
import socket
import subprocess
import sys
import time
import zlib

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
BUILD = os.environ.get("BUILD", "build")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def vm_kb(pid, key):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    rows = int(sys.argv[2]) if len(sys.argv) > 2 else 256
    port = free_port()
    proc = subprocess.Popen([os.path.join(ROOT, BUILD, "tallyd"), "--model-repository",
                             os.path.join(ROOT, "deploy", "models"), "--listen",
                             "127.0.0.1:%d" % port, "--log-level", "warn", "--threads", "2"])
    try:
        for _ in range(200):
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                c.request("GET", "/v2/health/ready")
                if c.getresponse().status == 200:
                    break
            except OSError:
                pass
            time.sleep(0.05)
        rng = random.Random(1)  # features as a client would send them: 7-8 digits, no pattern
        x = [[round(rng.gauss(0, 1), 7) for _ in range(16)] for _ in range(rows)]
        body = json.dumps({"inputs": [{"name": "features", "shape": [rows, 16],
                                       "datatype": "FP32", "data": x}]}).encode()
        gz = gzip.compress(body)
        modes = [("plain", body, {}),
                 ("gzip body", gz, {"Content-Encoding": "gzip"}),
                 ("gzip answer", body, {"Accept-Encoding": "gzip"}),
                 ("gzip both", gz, {"Content-Encoding": "gzip", "Accept-Encoding": "gzip"})]
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        res = {}
        for rnd in range(2):  # round 0 warms up; modes interleaved so drift hits all alike
            lat = {m[0]: [] for m in modes}
            recv = {}
            for _ in range(n if rnd else 20):
                for name, b, h in modes:
                    t = time.perf_counter()
                    conn.request("POST", "/v2/models/demo_mlp/infer", body=b, headers=h)
                    r = conn.getresponse()
                    data = r.read()
                    lat[name].append(time.perf_counter() - t)
                    if r.status != 200:
                        sys.exit("%s: %d %s" % (name, r.status, data[:200]))
                    recv[name] = len(data)
            res = {k: (sorted(v), recv[k]) for k, v in lat.items()}
        base_lat = res["plain"][0]

        def q(v, p):
            return v[min(len(v) - 1, int(p * len(v)))] * 1e6

        print("demo_mlp infer, %d rows x 16 FP32, %d requests per mode, one connection" % (rows, n))
        print("%-12s %10s %10s %10s %10s %8s" % ("mode", "sent B", "recv B", "p50 us", "p90 us",
                                                  "p50/base"))
        for name, b, _ in modes:
            v, rb = res[name]
            print("%-12s %10d %10d %10.0f %10.0f %8.2f" % (name, len(b), rb, q(v, 0.5), q(v, 0.9),
                                                         q(v, 0.5) / q(base_lat, 0.5)))
        # the bomb: --max-body-bytes is 64 MiB by default
        co = zlib.compressobj(9, zlib.DEFLATED, 31)
        bomb = b"".join(co.compress(b"\0" * (1 << 20)) for _ in range(256)) + co.flush()
        hwm0 = vm_kb(proc.pid, "VmHWM")
        t = time.perf_counter()
        conn.request("POST", "/v2/models/demo_mlp/infer", body=bomb,
                     headers={"Content-Encoding": "gzip"})
        r = conn.getresponse()
        r.read()
        dt = time.perf_counter() - t
        print("gzip bomb: 256 MiB of zeros in %d KiB -> %d in %.0f ms; peak RSS +%d MiB "
              "(--max-body-bytes 64 MiB)" % (len(bomb) // 1024, r.status, dt * 1000,
                                             (vm_kb(proc.pid, "VmHWM") - hwm0) // 1024))
    finally:
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
    main()
