#!/usr/bin/env python3
"""bench/sessions.py - the session store under many sessions (issue 10, defect 7).

Starts one tallyd serving tiny_gpt2 from deploy/models and prints:
  - GET of a session id and /v2/health/live, median ms, with one session open;
  - the time and resident-memory growth of N session creates (tests/tools/loadgen
    over 4 connections when built, else 4 Python client processes);
  - the same GET median with N sessions open;
  - /v2/health/live median alone, then while two other processes ask
    without pause: first for /v2/health/ready (the baseline: the same load
    touching no session), then for unknown session ids.
Clients are separate processes, so that Python's interpreter lock does not
add its switching interval to the latencies measured.

    python3 bench/sessions.py [--bin build/tallyd] [--n 100000]

A binary without --max-sessions (before issue 10) is run without it; one with
it gets --max-sessions N + 16 so that no session is evicted."""
import argparse
import http.client
import multiprocessing as mp
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
MODEL = "tiny_gpt2"


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def rss_kb(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def conn(port):
    return http.client.HTTPConnection("127.0.0.1", port, timeout=60)


def get_ms(c, path, n):
    t = []
    for _ in range(n):
        t0 = time.perf_counter()
        c.request("GET", path)
        r = c.getresponse()
        r.read()
        t.append((time.perf_counter() - t0) * 1000)
    return statistics.median(t), r.status


def creator(port, n, q):
    c = conn(port)
    first, bad = None, 0
    for _ in range(n):
        c.request("POST", "/v2/models/%s/sessions" % MODEL, body=b"{}",
                  headers={"Content-Type": "application/json"})
        r = c.getresponse()
        body = r.read()
        if r.status != 201:
            bad += 1
        elif first is None:
            first = body.split(b'"session_id":"')[1][:32].decode()
    q.put((first, bad))


def hammer(port, stop, unknown_ids):
    c = conn(port)
    while not stop.is_set():
        if unknown_ids:
            c.request("GET", "/v2/models/%s/sessions/%s" % (MODEL, secrets.token_hex(16)))
        else:
            c.request("GET", "/v2/health/ready")
        c.getresponse().read()


def live_under(port, c, unknown_ids):
    """/v2/health/live's median while two other processes ask without pause."""
    stop = mp.Event()
    hs = [mp.Process(target=hammer, args=(port, stop, unknown_ids)) for _ in range(2)]
    for h in hs:
        h.start()
    time.sleep(0.5)
    ms, _ = get_ms(c, "/v2/health/live", 500)
    stop.set()
    for h in hs:
        h.join()
    return ms


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=os.path.join(ROOT, "build", "tallyd"))
    ap.add_argument("--n", type=int, default=100000)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--loadgen", default=os.path.join(ROOT, "build", "tests", "tools", "loadgen"),
                    help="C load generator for the creates (the Python clients are used "
                         "when it is missing); it keeps the client out of the figure")
    a = ap.parse_args()
    helptext = subprocess.run([a.bin, "--help"], capture_output=True, text=True).stdout
    port = free_port()
    cmd = [a.bin, "--model-repository", os.path.join(ROOT, "deploy", "models"), "--model", MODEL,
           "--listen", "127.0.0.1:%d" % port, "--log-level", "warn", "--threads", "2",
           "--session-ttl-secs", "3600", "--queue-depth", "1024"]
    if "--max-sessions" in helptext:
        cmd += ["--max-sessions", str(a.n + 16)]
    log = tempfile.TemporaryFile()
    p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(300):
            try:
                c = conn(port)
                c.request("GET", "/v2/health/ready")
                if c.getresponse().status == 200:
                    break
            except OSError:
                pass
            time.sleep(0.05)
        c = conn(port)
        c.request("POST", "/v2/models/%s/sessions" % MODEL, body=b"{}")
        r = c.getresponse()
        one = r.read().split(b'"session_id":"')[1][:32].decode()
        spath = "/v2/models/%s/sessions/%s" % (MODEL, one)
        get1, st = get_ms(c, spath, 500)
        live1, _ = get_ms(c, "/v2/health/live", 500)
        rss0 = rss_kb(p.pid)
        t0 = time.perf_counter()
        if os.access(a.loadgen, os.X_OK):
            how = "loadgen, %d connections" % a.clients
            req = (b"POST /v2/models/%s/sessions HTTP/1.1\r\nHost: x\r\n"
                   b"Content-Length: 2\r\n\r\n{}" % MODEL.encode())
            with tempfile.NamedTemporaryFile(delete=False) as mix:
                mix.write(b"2 %d\n%s\n" % (len(req), req))
            out = subprocess.run([a.loadgen, "--port", str(port), "--mix", mix.name, "--requests",
                                  str(a.n), "--connections", str(a.clients)],
                                 capture_output=True, text=True)
            os.unlink(mix.name)
            # loadgen exits 1 on any 5xx or transport error; its counts line says which
            bad = 0 if out.returncode == 0 else a.n
            how += "; " + (out.stdout.strip().splitlines() or ["no output"])[-1]
        else:
            how = "%d Python client processes" % a.clients
            q = mp.Queue()
            per = [a.n // a.clients + (i < a.n % a.clients) for i in range(a.clients)]
            procs = [mp.Process(target=creator, args=(port, k, q)) for k in per]
            for pr in procs:
                pr.start()
            res = [q.get() for _ in procs]
            for pr in procs:
                pr.join()
            bad = sum(b for _, b in res)
        secs = time.perf_counter() - t0
        rss1 = rss_kb(p.pid)
        getn, stn = get_ms(c, spath, 500)
        liveq, _ = get_ms(c, "/v2/health/live", 500)
        # the same load of cheap requests that touch no session, as the
        # baseline of this run (the machine's own noise)
        livec = live_under(port, c, False)
        liveh = live_under(port, c, True)
        print("binary: %s" % a.bin)
        print("%-58s %10s" % ("measure", "value"))
        print("%-58s %10.3f" % ("GET session, 1 session open: median ms (status %d)" % st, get1))
        print("%-58s %10.3f" % ("/v2/health/live, 1 session open: median ms", live1))
        print("%-58s %10.2f" % ("%d creates (%s): seconds" % (a.n, how), secs))
        print("%-58s %10d" % ("creates refused (not 201)", bad))
        print("%-58s %10.1f" % ("resident memory growth: MB", (rss1 - rss0) / 1024.0))
        print("%-58s %10.0f" % ("resident memory growth per session: bytes",
                                (rss1 - rss0) * 1024.0 / max(1, a.n - bad)))
        print("%-58s %10.3f" % ("GET session, %d open: median ms (status %d)" % (a.n + 1, stn), getn))
        print("%-58s %10.3f" % ("/v2/health/live, %d open, quiet: median ms" % (a.n + 1), liveq))
        print("%-58s %10.3f" % ("/v2/health/live, 2 clients asking /v2/health/ready: median ms",
                                livec))
        print("%-58s %10.3f" % ("/v2/health/live, 2 clients asking unknown ids: median ms", liveh))
        c.request("GET", "/metrics")
        m = c.getresponse().read().decode()
        for line in m.splitlines():
            if line.startswith("tallyd_sessions_open ") or line.startswith("tallyd_kv_cache_bytes "):
                print("%-58s %10s" % (line.split()[0], line.split()[1]))
    finally:
        p.terminate()
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
