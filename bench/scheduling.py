#!/usr/bin/env python3
"""bench/scheduling.py - dynamic batching and the fit lane, each beside its
baseline in the same run, on one tallyd (docs/scheduling.md).

1. Dynamic batching: C concurrent clients (tests/tools/loadgen, C keep-alive
   connections) send 1-row requests with distinct rows to an mlp of 256
   inputs, two hidden layers of 1,024 and 1 output: once to the model without
   batching, once to the same weights with "dynamic_batching"
   {max_queue_delay_us: D, max_batch_size: 64}. Prints rows/s, p50 and p99 of
   both, and the aims: at least 2x rows/s, p99 no worse than without plus D.
2. The fit lane: 1-row infers (4 connections) on one model, alone, then while
   a fit of R rows (default 1,000,000) runs on an ensemble; prints p50/p99 of
   both and the aim: p99 within 2x.

    python3 bench/scheduling.py [--bin build/tallyd] [--clients 64] [--delay-us 2000]
                                [--requests 20000] [--fit-rows 1000000] [--threads N]
"""
import argparse
import http.client
import json
import os
import random
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(ROOT, "tests", "reference"))
import st  # noqa: E402


def write_model(repo, name, config, tensors):
    vdir = os.path.join(repo, name, "1")
    os.makedirs(vdir)
    with open(os.path.join(repo, name, "config.json"), "w") as f:
        json.dump(config, f)
    if tensors is not None:
        st.save_lists(os.path.join(vdir, "model.safetensors"), tensors)


def mlp_tensors(rng, sizes):
    t = {}
    for i in range(len(sizes) - 1):
        n_in, n_out = sizes[i], sizes[i + 1]
        s = (2.0 / n_in) ** 0.5
        w = struct.pack("<%df" % (n_in * n_out), *(rng.gauss(0, s) for _ in range(n_in * n_out)))
        t["layers.%d.weight" % i] = ("F32", [n_out, n_in], w)
        t["layers.%d.bias" % i] = ("F32", [n_out], [0.0] * n_out)
    return t


def request_bytes(path, body):
    data = json.dumps(body).encode()
    head = ("POST %s HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
            "Content-Length: %d\r\n\r\n" % (path, len(data))).encode()
    return head + data


def binary_request_bytes(path, row):
    """The same request with the row in the binary tensor extension (as
    tritonclient and perf_analyzer send numpy inputs)."""
    blob = struct.pack("<%df" % len(row), *row)
    js = json.dumps({"inputs": [{"name": "features", "shape": [1, len(row)], "datatype": "FP32",
                                 "parameters": {"binary_data_size": len(blob)}}]}).encode()
    head = ("POST %s HTTP/1.1\r\nHost: bench\r\nContent-Type: application/octet-stream\r\n"
            "Inference-Header-Content-Length: %d\r\nContent-Length: %d\r\n\r\n"
            % (path, len(js), len(js) + len(blob))).encode()
    return head + js + blob


def mix_file(entries):
    f = tempfile.NamedTemporaryFile("wb", prefix="tallyd-mix-", delete=False)
    for raw in entries:
        f.write(b"2 %d\n" % len(raw) + raw + b"\n")
    f.close()
    return f.name


def loadgen(exe, port, mix, n, conns):
    p = subprocess.run([exe, "--port", str(port), "--mix", mix, "--requests", str(n),
                        "--connections", str(conns)], capture_output=True, text=True)
    m = re.search(r"requests (\d+)\s+2xx (\d+).*?([\d.]+) s\s+(\d+) req/s\s+p50 ([\d.]+) ms\s+"
                  r"p99 ([\d.]+) ms", p.stdout)
    if not m or p.returncode != 0:
        sys.exit("loadgen failed (%d): %s %s" % (p.returncode, p.stdout, p.stderr))
    return {"n": int(m.group(1)), "ok": int(m.group(2)), "s": float(m.group(3)),
            "rps": float(m.group(4)), "p50": float(m.group(5)), "p99": float(m.group(6))}


def wait_ready(port, proc, timeout=120):
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            sys.exit("tallyd exited")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/v2/health/ready")
            if c.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    sys.exit("tallyd not ready")


def fit_body(rows, seconds):
    rng = random.Random(3)
    labels = [rng.randrange(2) for _ in range(rows)]
    Z = []
    for y in labels:  # family a knows the label, family b guesses
        s = 1.5 if y else -1.5
        Z.extend((s + rng.gauss(0, 1), s + rng.gauss(0, 1), rng.gauss(0, 1), rng.gauss(0, 1),
                  rng.gauss(0, 1)))
    blobs = [struct.pack("<%df" % len(Z), *Z), struct.pack("<%di" % rows, *labels)]
    head = {"inputs": [{"name": "member_outputs", "datatype": "FP32", "shape": [rows, 5],
                        "parameters": {"binary_data_size": len(blobs[0])}},
                       {"name": "labels", "datatype": "INT32", "shape": [rows],
                        "parameters": {"binary_data_size": len(blobs[1])}}],
            "parameters": {"epochs": 1000, "patience": 1000, "batch_size": 4096,
                           "timeout_ms": int(seconds * 1000)}}
    js = json.dumps(head).encode()
    return js + b"".join(blobs), {"Inference-Header-Content-Length": str(len(js)),
                                  "Content-Type": "application/octet-stream"}


def batching_round(a, port, mixes, form):
    print("1. dynamic batching, %s bodies: %d clients, 1-row requests, mlp 256-1024-1024-1, "
          "delay %d us, %d threads" % (form, a.clients, a.delay_us, a.threads or os.cpu_count()))
    loadgen(a.loadgen, port, mixes["plain"], 2000, a.clients)  # warm up
    loadgen(a.loadgen, port, mixes["batched"], 2000, a.clients)
    before = batch_counters(port)
    res = {}
    for m in ("plain", "batched", "plain", "batched"):  # interleaved, best of two
        r = loadgen(a.loadgen, port, mixes[m], a.requests, a.clients)
        if m not in res or r["rps"] > res[m]["rps"]:
            res[m] = r
    after = batch_counters(port)
    print("   %-9s %10s %10s %10s" % ("", "rows/s", "p50 ms", "p99 ms"))
    for m in ("plain", "batched"):
        print("   %-9s %10.0f %10.2f %10.2f" % (m, res[m]["rps"], res[m]["p50"], res[m]["p99"]))
    reqs = after["batched_requests"] - before["batched_requests"]
    calls = after["batches"] - before["batches"]
    print("   the batcher ran %d requests in %d calls: %.1f rows per call" % (reqs, calls,
                                                                           reqs / calls))
    ratio = res["batched"]["rps"] / res["plain"]["rps"]
    bound = res["plain"]["p99"] + a.delay_us / 1000.0
    print("   batched/plain rows/s %.2fx (aim >= 2x: %s); p99 %.2f ms vs bound %.2f ms (%s)" %
          (ratio, "met" if ratio >= 2 else "MISSED", res["batched"]["p99"], bound,
           "met" if res["batched"]["p99"] <= bound else "MISSED"))


def batch_counters(port):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request("GET", "/metrics")
    text = c.getresponse().read().decode()
    out = {}
    for k in ("batches", "batched_requests"):
        m = re.search(r'^tallyd_%s_total\{model="batched"\} (\S+)$' % k, text, re.M)
        out[k] = float(m.group(1)) if m else 0.0
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=os.path.join(ROOT, "build", "tallyd"))
    ap.add_argument("--loadgen", default=os.path.join(ROOT, "build", "tests", "tools", "loadgen"))
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--delay-us", type=int, default=2000)
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--fit-rows", type=int, default=1000000)
    ap.add_argument("--fit-seconds", type=float, default=20.0)
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    rng = random.Random(1)
    repo = tempfile.mkdtemp(prefix="tallyd-bench-sched-")
    sizes = [256, 1024, 1024, 1]
    w = mlp_tensors(rng, sizes)
    mlp = {"kind": "mlp", "activations": ["relu", "relu", "none"]}
    write_model(repo, "plain", mlp, w)
    write_model(repo, "batched", dict(mlp, dynamic_batching={
        "max_queue_delay_us": a.delay_us, "max_batch_size": 64}), w)
    write_model(repo, "small", dict(mlp, activations=["relu", "none"]), mlp_tensors(rng, [16, 64, 1]))
    write_model(repo, "ens", {"kind": "ensemble", "member_output": "logit", "families": [
        {"name": "a", "members": [{"external": "a1"}, {"external": "a2"}]},
        {"name": "b", "members": [{"external": "b1"}, {"external": "b2"}, {"external": "b3"}]}]},
        None)
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    args = [a.bin, "--model-repository", repo, "--listen", "127.0.0.1:%d" % port,
            "--log-level", "warn", "--queue-depth", "4096"]
    if a.threads:
        args += ["--threads", str(a.threads)]
    proc = subprocess.Popen(args)
    try:
        wait_ready(port, proc)
        rows = [[rng.uniform(-1, 1) for _ in range(256)] for _ in range(512)]
        for form in ("JSON", "binary"):
            mixes = {}
            for m in ("plain", "batched"):
                path = "/v2/models/%s/infer" % m
                mixes[m] = mix_file(
                    request_bytes(path, {"inputs": [{"name": "features", "shape": [1, 256],
                                                     "datatype": "FP32", "data": r}]})
                    if form == "JSON" else binary_request_bytes(path, r) for r in rows)
            batching_round(a, port, mixes, form)
            for f in mixes.values():
                os.unlink(f)

        small = mix_file(request_bytes(
            "/v2/models/small/infer",
            {"inputs": [{"name": "features", "shape": [1, 16], "datatype": "FP32",
                         "data": [rng.uniform(-1, 1) for _ in range(16)]}]}) for _ in range(64))
        print("2. the fit lane: 1-row infers on one model (4 connections), alone and while a fit"
              " of %d rows runs on an ensemble" % a.fit_rows)
        loadgen(a.loadgen, port, small, 2000, 4)
        alone = loadgen(a.loadgen, port, small, a.requests, 4)
        body, hdr = fit_body(a.fit_rows, a.fit_seconds)
        out = {}

        def fit():
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
            t0 = time.time()
            c.request("POST", "/v2/models/ens/fit", body, hdr)
            r = c.getresponse()
            r.read()
            out["status"], out["s"] = r.status, time.time() - t0

        t = threading.Thread(target=fit)
        t.start()
        time.sleep(1.0)  # the body is read and decoded; the fit runs
        during = loadgen(a.loadgen, port, small, a.requests, 4)
        still = t.is_alive()
        t.join()
        print("   %-14s %10s %10s %10s" % ("", "req/s", "p50 ms", "p99 ms"))
        for name, r in (("no fit", alone), ("during the fit", during)):
            print("   %-14s %10.0f %10.2f %10.2f" % (name, r["rps"], r["p50"], r["p99"]))
        print("   fit: HTTP %s after %.1f s (%s); p99 during/alone %.2fx (aim <= 2x: %s)" %
              (out.get("status"), out.get("s", 0),
               "the infers ended while it ran" if still else "it ENDED BEFORE the infers",
               during["p99"] / alone["p99"], "met" if during["p99"] <= 2 * alone["p99"] else
               "MISSED"))
        os.unlink(small)
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(repo, ignore_errors=True)


if __name__ == "__main__":
    main()
