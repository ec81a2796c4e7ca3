#!/usr/bin/env python3
"""bench/learning.py - what the learning loop costs a served request, beside
the same requests without it in the same run: a fresh tallyd on a temporary
repository with three copies of one ensemble (4 external members, logits
sent as member_outputs), N infer requests of ROWS rows each over one
keep-alive connection, modes interleaved so that drift hits all alike:

  plain      no "log" (the baseline)
  logged     "log": every row written to the row log (the writer thread
             fsyncs at most once a second)
  shadowed   "log" and a pending candidate: every request is also answered
             by the candidate as a pool job after the answer

Prints the median and p90 latency of each beside the baseline's, then the
feedback rate (ids joined per second, batches of 1000) and the time of a
refit on a window of 1000 labelled rows.

Usage: bench/learning.py [N] [ROWS]   (defaults 400, 32; BUILD=build)"""
import http.client
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
BUILD = os.environ.get("BUILD", "build")
sys.path.insert(0, os.path.join(ROOT, "tests", "reference"))
import st  # noqa: E402


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def model(repo, name, extra):
    cfg = {"kind": "ensemble", "member_output": "logit",
           "families": [{"name": "fa", "members": [{"external": "a1"}, {"external": "a2"}]},
                        {"name": "fb", "members": [{"external": "b1"}, {"external": "b2"}]}]}
    cfg.update(extra)
    os.makedirs(os.path.join(repo, name, "1"))
    with open(os.path.join(repo, name, "config.json"), "w") as f:
        json.dump(cfg, f)
    st.save_lists(os.path.join(repo, name, "1", "model.safetensors"),
                  {"tier2.logits": ("F32", [2], [0.0, 0.0])})


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 400
    rows = int(sys.argv[2]) if len(sys.argv) > 2 else 32
    repo = tempfile.mkdtemp(prefix="tallyd-bench-learn-")
    log = {"log": {"sample_rate": 1.0, "max_rows": 200000}}
    model(repo, "plain", {})
    model(repo, "logged", log)
    model(repo, "shadowed", dict(log, refit={"window_rows": 1000, "min_rows": 100,
                                             "compare_rows": 1000000, "max_age_seconds": 0}))
    port = free_port()
    proc = subprocess.Popen([os.path.join(ROOT, BUILD, "tallyd"), "--model-repository", repo,
                             "--listen", "127.0.0.1:%d" % port, "--log-level", "warn",
                             "--threads", "2"])
    conn = None
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
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)

        def post(path, body):
            conn.request("POST", path, body=json.dumps(body).encode(),
                         headers={"Content-Type": "application/json"})
            r = conn.getresponse()
            data = r.read()
            if r.status != 200:
                sys.exit("%s: %d %s" % (path, r.status, data[:300]))
            return json.loads(data)

        rng = random.Random(1)

        def batch(k):
            z = [[round(rng.gauss(0, 1.5), 6) for _ in range(4)] for _ in range(k)]
            y = [rng.randrange(2) for _ in range(k)]
            return z, y

        def infer_body(z, rid):
            return {"id": rid, "inputs": [{"name": "member_outputs", "shape": [len(z), 4],
                                           "datatype": "FP32", "data": z}]}

        def feedback_body(ids, y):
            return {"inputs": [{"name": "id", "shape": [len(ids)], "datatype": "BYTES", "data": ids},
                               {"name": "labels", "shape": [len(ids)], "datatype": "INT64",
                                "data": y}]}

        # the shadowed model's candidate: 1000 labelled rows, one refit
        z, y = batch(1000)
        post("/v2/models/shadowed/infer", infer_body(z, "seed"))
        t = time.perf_counter()
        post("/v2/models/shadowed/feedback", feedback_body(["seed:%d" % i for i in range(1000)], y))
        fb_dt = time.perf_counter() - t
        t = time.perf_counter()
        r = post("/v2/models/shadowed/refit", {"parameters": {"epochs": 50}})
        refit_dt = time.perf_counter() - t
        modes = ["plain", "logged", "shadowed"]
        res = {}
        for rnd in range(2):  # round 0 warms up
            lat = {m: [] for m in modes}
            for i in range(n if rnd else 30):
                z, _ = batch(rows)
                for m in modes:
                    body = json.dumps(infer_body(z, "r%d-%d" % (rnd, i))).encode()
                    t = time.perf_counter()
                    conn.request("POST", "/v2/models/%s/infer" % m, body=body,
                                 headers={"Content-Type": "application/json"})
                    resp = conn.getresponse()
                    data = resp.read()
                    lat[m].append(time.perf_counter() - t)
                    if resp.status != 200:
                        sys.exit("%s: %d %s" % (m, resp.status, data[:200]))
            res = {k: sorted(v) for k, v in lat.items()}
        time.sleep(1.5)
        conn.request("GET", "/v2/models/shadowed/candidates")
        cand = json.loads(conn.getresponse().read())
        conn.request("GET", "/metrics")
        metrics = conn.getresponse().read().decode()

        def q(v, p):
            return v[min(len(v) - 1, int(p * len(v)))] * 1e6

        base = q(res["plain"], 0.5)
        print("ensemble infer, %d rows x 4 member logits, %d requests per mode, one connection, "
              "2 workers" % (rows, n))
        print("%-10s %10s %10s %9s" % ("mode", "p50 us", "p90 us", "p50/base"))
        for m in modes:
            print("%-10s %10.0f %10.0f %9.2f" % (m, q(res[m], 0.5), q(res[m], 0.9),
                                                 q(res[m], 0.5) / base))
        shadow = [line for line in metrics.split("\n")
                  if line.startswith("tallyd_learn_shadow_rows_total{model=\"shadowed\"")]
        print("shadow answers (rows): %s" % ", ".join(
            "%s %s" % (s.split('outcome="')[1].split('"')[0], s.rsplit(" ", 1)[1]) for s in shadow))
        print("feedback: 1000 ids joined in %.1f ms (%.0f ids/s, one request)"
              % (fb_dt * 1000, 1000 / fb_dt))
        print("refit on %d labelled rows (50 epochs): %.1f ms, candidate version %s; rows "
              "logged by the shadowed model: %d" % (r["window_rows"], refit_dt * 1000,
                                                    r["candidate_version"],
                                                    cand["log"]["rows_logged"]))
    finally:
        if conn:
            conn.close()
        proc.terminate()
        proc.wait()
        shutil.rmtree(repo, ignore_errors=True)


if __name__ == "__main__":
    main()
