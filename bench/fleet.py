#!/usr/bin/env python3
"""bench/fleet.py - tallyd as a fleet on one machine (docs/deployment.md,
Scaling), each figure beside its baseline in the same run.

1. Requests/s of a 1-row infer (demo_mlp, 16 features) sent by wrk through
   nginx (Debian's, the routing of deploy/nginx/tallyd.conf) to 1, 2 and 3
   replicas of tallyd on one repository; each measurement right after its
   baseline, nginx to one replica, alternating REPEATS times (medians), so
   that drift on a shared machine hits both alike. Also wrk straight to one replica (what nginx costs).
2. Time from a fit's answer (on replica 1) until every replica serves the new
   version, probed every 2 ms on each replica's model metadata: with
   --repository-watch inotify (the default) and with polling every second
   (--repository-watch poll --repository-poll-secs 1), ROUNDS fits each.

    python3 bench/fleet.py [--bin build/tallyd] [--secs 5] [--conns 32] [--threads 0]
                           [--rounds 5] [--repeats 3]

Needs nginx and wrk (deploy/deps.sh test bench). Prints a table; nothing is
asserted.
"""
import argparse
import http.client
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))

INFER = {"inputs": [{"name": "features", "shape": [1, 16], "datatype": "FP32",
                     "data": [0.1 * i for i in range(1, 17)]}]}


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def request(port, method, path, body=None, timeout=120):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        h = {"Content-Type": "application/json"} if body is not None else {}
        c.request(method, path, body=json.dumps(body) if body is not None else None, headers=h)
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


class Replica:
    def __init__(self, binary, repo, name, args):
        self.port = free_port()
        self.log = open(os.path.join(os.path.dirname(repo), "log-%s" % name), "wb")
        self.proc = subprocess.Popen(
            [binary, "--model-repository", repo, "--listen", "127.0.0.1:%d" % self.port,
             "--replica-id", name, "--log-level", "warn"] + args,
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                if request(self.port, "GET", "/v2/health/ready", timeout=1)[0] == 200:
                    return
            except OSError:
                pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        sys.exit("tallyd %s did not start" % name)

    def versions(self, model):
        st, body = request(self.port, "GET", "/v2/models/" + model, timeout=5)
        return json.loads(body).get("versions", []) if st == 200 else []

    def stop(self):
        self.proc.terminate()
        self.proc.wait(30)
        self.log.close()


class Nginx:
    """nginx with one upstream over the given replicas (round robin,
    keep-alive), as in deploy/nginx/tallyd.conf."""

    def __init__(self, exe, replicas):
        self.tmp = tempfile.mkdtemp(prefix="tallyd-bench-nginx-")
        self.port = free_port()
        t = self.tmp
        servers = "".join("        server 127.0.0.1:%d;\n" % r.port for r in replicas)
        temps = "".join("    %s_temp_path %s/%s;\n" % (k, t, k)
                        for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        conf = ("%sworker_processes 1;\npid %s/nginx.pid;\nerror_log %s/error.log warn;\n"
                "events { worker_connections 4096; }\nhttp {\n    access_log off;\n%s"
                "    upstream tallyd_any {\n%s        keepalive 64;\n    }\n"
                "    server {\n        listen 127.0.0.1:%d;\n        location / {\n"
                "            proxy_pass http://tallyd_any;\n            proxy_http_version 1.1;\n"
                "            proxy_set_header Connection \"\";\n        }\n    }\n}\n"
                % ("user root;\n" if os.geteuid() == 0 else "", t, t, temps, servers, self.port))
        with open(os.path.join(t, "nginx.conf"), "w") as f:
            f.write(conf)
        self.proc = subprocess.Popen([exe, "-p", t, "-e", t + "/error.log", "-c",
                                      t + "/nginx.conf", "-g", "daemon off;"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                if request(self.port, "GET", "/v2/health/ready", timeout=1)[0] == 200:
                    return
            except OSError:
                time.sleep(0.05)
        sys.exit("nginx did not start: see %s/error.log" % t)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)
        shutil.rmtree(self.tmp, ignore_errors=True)


def wrk(port, secs, conns, lua):
    out = subprocess.run(["wrk", "-t1", "-c%d" % conns, "-d%ds" % secs, "--latency", "-s", lua,
                          "http://127.0.0.1:%d/v2/models/demo_mlp/infer" % port],
                         capture_output=True, text=True).stdout
    rps = float(next(l.split()[1] for l in out.splitlines() if l.startswith("Requests/sec")))
    p99 = next((l.split()[1] for l in out.splitlines() if l.strip().startswith("99%")), "?")
    bad = [l.strip() for l in out.splitlines() if "Non-2xx" in l or "Socket errors" in l]
    return rps, p99, bad


def propagation(rs, rounds, body):
    """Seconds from each fit's answer until every replica lists the version."""
    out = []
    for _ in range(rounds):
        st, b = request(rs[0].port, "POST", "/v2/models/aware_ensemble/fit", body)
        t0 = time.time()
        if st != 200:
            sys.exit("fit: %d %s" % (st, b[:200]))
        v = json.loads(b)["model_version"]
        pending = list(rs)
        while pending and time.time() - t0 < 30:
            pending = [r for r in pending if v not in r.versions("aware_ensemble")]
            if pending:
                time.sleep(0.002)
        out.append(time.time() - t0 if not pending else float("inf"))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=os.path.join(ROOT, "build", "tallyd"))
    ap.add_argument("--secs", type=int, default=5)
    ap.add_argument("--conns", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0, help="--threads of each replica (0: cores)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3, help="alternations of each pair (medians)")
    a = ap.parse_args()
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if not nginx or not shutil.which("wrk"):
        sys.exit("needs nginx and wrk: deploy/deps.sh test bench")
    work = tempfile.mkdtemp(prefix="tallyd-bench-fleet-")
    repo = os.path.join(work, "models")
    subprocess.run([sys.executable, os.path.join(ROOT, "deploy", "gen_models.py"), repo],
                   check=True, stdout=subprocess.DEVNULL)
    lua = os.path.join(work, "infer.lua")
    with open(lua, "w") as f:
        f.write('wrk.method = "POST"\nwrk.body = \'%s\'\n'
                'wrk.headers["Content-Type"] = "application/json"\n' % json.dumps(INFER))
    targs = ["--threads", str(a.threads)] if a.threads else []
    cores = os.cpu_count()
    rs = []
    try:
        rs = [Replica(a.bin, repo, "r%d" % (i + 1), targs) for i in range(3)]
        print("1-row demo_mlp infers, wrk -t1 -c%d -d%ds, medians of %d alternations, %d cores, "
              "replicas %s" % (a.conns, a.secs, a.repeats, cores,
                               "--threads %d" % a.threads if a.threads else "on all cores"))
        print("%-36s %12s %9s   %s" % ("path", "requests/s", "p99", "vs nginx -> 1 (same run)"))
        direct = wrk(rs[0].port, a.secs, a.conns, lua)
        print("%-36s %12.0f %9s" % ("wrk -> 1 replica (no nginx)", direct[0], direct[1]))
        for n in (1, 2, 3):
            # baseline and measurement alternate, a.repeats times: medians
            bs, ms = [], []
            for _ in range(a.repeats):
                for reps, out in ((rs[:1], bs), (rs[:n], ms)):
                    lb = Nginx(nginx, reps)
                    out.append(wrk(lb.port, a.secs, a.conns, lua))
                    lb.stop()
            b = sorted(bs, key=lambda x: x[0])[len(bs) // 2]
            m = sorted(ms, key=lambda x: x[0])[len(ms) // 2]
            print("%-36s %12.0f %9s" % ("  baseline: nginx -> 1 replica", b[0], b[1]))
            print("%-36s %12.0f %9s   %.2fx" % ("nginx -> %d replica%s" % (n, "s" if n > 1 else ""),
                                               m[0], m[1], m[0] / b[0]))
            for e in sorted({e for x in bs + ms for e in x[2]}):
                print("    errors: %s" % e)
        body = json.load(open(os.path.join(ROOT, "deploy", "examples", "aware_labelled.json")))
        body["parameters"]["epochs"] = 3
        for r in rs:
            r.stop()
        rs = []
        print("\ntime from a fit's answer (on r1) until all 3 replicas serve the version, %d fits"
              % a.rounds)
        print("%-44s %9s %9s %9s" % ("repository watch", "median", "min", "max"))
        for label, args in (("inotify (--repository-watch inotify)", ["--repository-poll-secs", "0"]),
                            ("polling (--repository-watch poll, 1 s)",
                             ["--repository-watch", "poll", "--repository-poll-secs", "1"])):
            rs = [Replica(a.bin, repo, "p%d" % (i + 1), targs + args) for i in range(3)]
            t = propagation(rs, a.rounds, body)
            for r in rs:
                r.stop()
            rs = []
            print("%-44s %8.3fs %8.3fs %8.3fs" % (label, statistics.median(t), min(t), max(t)))
    finally:
        for r in rs:
            r.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
