#!/usr/bin/env python3
"""bench/live_scores.py - what live scores and adaptive conformal inference
cost, beside a static CQR version in the same run: a fresh tallyd on a
temporary repository with copies of one quantile_ensemble (3 external
bases, 9 levels, K/2 = 4 central intervals), each calibrated on 2000 rows:

  static      CQR (the baseline: fixed corrections)
  adaptive    CQR + adaptive {"gamma": 0.01, "window": 1000}: every infer
              reads the live corrections under the version's mutex

1. infer latency (median, p90) of N requests of ROWS rows each over one
   keep-alive connection, modes interleaved so drift hits all alike;
2. the same while a second connection feeds outcomes (evaluate with
   observe, batches of 1000 rows) to the adaptive version without pause;
3. outcomes taken per second (evaluate observe, batches of 1000 rows, the
   evaluate alone as the baseline) for the static version, the adaptive one
   with a 1000-row score window, and one with the largest window (100000:
   each observed row moves 4 x 100000 sorted scores).

Usage: bench/live_scores.py [N] [ROWS]   (defaults 400, 16; BUILD=build)"""
import http.client
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
BUILD = os.environ.get("BUILD", "build")
LEVELS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
Z = [-1.2816, -0.8416, -0.5244, -0.2533, 0.0, 0.2533, 0.5244, 0.8416, 1.2816]


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def model(repo, name):
    cfg = {"kind": "quantile_ensemble", "levels": LEVELS,
           "bases": [{"external": "a"}, {"external": "b"}, {"external": "c"}],
           "monotone": "isotonic", "version_policy": {"latest": {"num_versions": 1}}}
    os.makedirs(os.path.join(repo, name, "1"))
    with open(os.path.join(repo, name, "config.json"), "w") as f:
        json.dump(cfg, f)


def rows(rng, k, sd=1.0):
    bq, ys = [], []
    for _ in range(k):
        x = rng.uniform(-3, 3)
        bq.append([[round(x + s * z + e, 5) for z in Z]
                   for s, e in ((1.0, 0.0), (0.8, 0.1), (1.2, -0.1))])
        ys.append(round(x + sd * rng.gauss(0, 1), 5))
    return bq, ys


def tensors(bq, ys=None):
    t = [{"name": "base_quantiles", "shape": [len(bq), 3, 9], "datatype": "FP32", "data": bq}]
    if ys is not None:
        t.append({"name": "targets", "shape": [len(ys)], "datatype": "FP32", "data": ys})
    return t


class Conn:
    def __init__(self, port):
        self.c = http.client.HTTPConnection("127.0.0.1", port, timeout=300)

    def post(self, path, body):
        self.c.request("POST", path, body=body if isinstance(body, bytes) else
                       json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        r = self.c.getresponse()
        data = r.read()
        if r.status != 200:
            sys.exit("%s: %d %s" % (path, r.status, data[:300]))
        return data


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 400
    k = int(sys.argv[2]) if len(sys.argv) > 2 else 16
    repo = tempfile.mkdtemp(prefix="tallyd-bench-live-")
    names = {"static": None, "adaptive": 1000, "adaptive_w100k": 100000}
    for m in names:
        model(repo, m)
    port = free_port()
    proc = subprocess.Popen([os.path.join(ROOT, BUILD, "tallyd"), "--model-repository", repo,
                             "--listen", "127.0.0.1:%d" % port, "--log-level", "warn",
                             "--threads", "2"])
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
        conn = Conn(port)
        rng = random.Random(1)
        cal_bq, cal_y = rows(rng, 2000)
        big_bq, big_y = rows(rng, 100000)
        for m, w in names.items():
            p = {"method": "cqr"}
            if w:
                p["adaptive"] = {"gamma": 0.01, "window": w}
            bq, ys = (big_bq, big_y) if w == 100000 else (cal_bq, cal_y)
            conn.post("/v2/models/%s/calibrate" % m, {"inputs": tensors(bq, ys), "parameters": p})
        del big_bq, big_y

        def q(v, p):
            v = sorted(v)
            return v[min(len(v) - 1, int(p * len(v)))] * 1e6

        def latencies(modes, count):
            lat = {m: [] for m in modes}
            for i in range(count):
                bq, _ = rows(rng, k)
                body = json.dumps({"inputs": tensors(bq)}).encode()
                for m in modes:
                    t = time.perf_counter()
                    conn.post("/v2/models/%s/infer" % m, body)
                    lat[m].append(time.perf_counter() - t)
            return lat

        modes = ["static", "adaptive"]
        latencies(modes, 30)  # warm-up
        quiet = latencies(modes, n)
        stop = threading.Event()
        fed = [0]

        def feeder():
            c2 = Conn(port)
            r2 = random.Random(2)
            bq, ys = rows(r2, 1000, 2.0)
            body = json.dumps({"inputs": tensors(bq, ys), "parameters": {"observe": True}}).encode()
            while not stop.is_set():
                c2.post("/v2/models/adaptive/evaluate", body)
                fed[0] += 1000

        th = threading.Thread(target=feeder)
        th.start()
        t0 = time.perf_counter()
        busy = latencies(modes, n)
        busy_dt = time.perf_counter() - t0
        stop.set()
        th.join()

        print("infer, %d requests of %d rows each, one connection (microseconds)" % (n, k))
        print("%-46s %10s %10s %10s" % ("", "median", "p90", "vs static"))
        for label, lat in (("quiet", quiet), ("while feedback flows", busy)):
            base = q(lat["static"], 0.5)
            for m in modes:
                print("%-46s %10.0f %10.0f %9.2fx" % ("%s, %s" % (label, m), q(lat[m], 0.5),
                                                     q(lat[m], 0.9), q(lat[m], 0.5) / base))
        print("(the feeder observed %d rows meanwhile: %.0f rows/s)" % (fed[0], fed[0] / busy_dt))

        bq, ys = rows(rng, 1000, 2.0)
        plain = json.dumps({"inputs": tensors(bq, ys)}).encode()
        obs = json.dumps({"inputs": tensors(bq, ys), "parameters": {"observe": True}}).encode()
        print("\noutcomes through evaluate, batches of 1000 rows (rows/s; evaluate alone is the "
              "baseline)")
        for m in names:
            res = {}
            for label, body in (("evaluate", plain), ("evaluate + observe", obs)):
                conn.post("/v2/models/%s/evaluate" % m, body)
                reps = 10
                t = time.perf_counter()
                for _ in range(reps):
                    conn.post("/v2/models/%s/evaluate" % m, body)
                res[label] = reps * 1000 / (time.perf_counter() - t)
            cost = (1 / res["evaluate + observe"] - 1 / res["evaluate"]) * 1e6
            print("%-16s evaluate %9.0f   evaluate + observe %9.0f   observe's own cost %6.2f "
                  "us/row" % (m, res["evaluate"], res["evaluate + observe"], cost))
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(repo, ignore_errors=True)


if __name__ == "__main__":
    main()
