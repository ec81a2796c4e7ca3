#!/usr/bin/env python3
"""bench/tracing.py - what tracing costs: requests/s and latency of the same
load against five tallyd processes started side by side on the example
repository (deploy/models), in one run:

  off        no --otlp-endpoint (the baseline)
  off again  a second such process: its "cost" is the run's noise floor
  on, r=0    --otlp-endpoint set, --otlp-sample-ratio 0: headers parsed and
             answered, nothing recorded
  on, r=0.1  a tenth of the requests recorded and exported
  on, r=1    --otlp-endpoint set, every request recorded and exported to an
             OTLP/HTTP receiver in this script (it reads each POST and
             answers 200 without parsing, as a collector's receiver would
             before queueing)

Load: wrk, C keep-alive connections for S seconds per measurement, on two
requests: a one-row demo_mlp infer (6 spans a request) and a one-row
aware_ensemble infer (15 spans: 9 hosted members). The processes are
measured in turn, ROUNDS times over (load drifts on a shared machine hit all
five alike); each figure is the median of its rounds, and the cost is
against "off" of the same request. The exporter's counters of the r=1 daemon
are printed at the end (spans exported, failed, dropped). Beside requests/s,
the daemon's CPU time per request (every thread's, from schedstat, the
exporter's included) and its cost against "off": on a machine shared with
other work, CPU per request moves far less with the neighbours' load than
requests/s does.

Usage: bench/tracing.py [SECONDS] [CONNECTIONS] [ROUNDS]   (defaults 4, 32, 3;
BUILD=build; needs wrk: deploy/deps.sh bench)"""
import http.server
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
BUILD = os.environ.get("BUILD", "build")
SECS = int(sys.argv[1]) if len(sys.argv) > 1 else 4
CONNS = int(sys.argv[2]) if len(sys.argv) > 2 else 32
ROUNDS = int(sys.argv[3]) if len(sys.argv) > 3 else 3

MLP = ('{"inputs":[{"name":"features","shape":[1,16],"datatype":"FP32","data":'
       '[0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0,1.1,1.2,1.3,1.4,1.5,1.6]}]}')
ENS = ('{"inputs":[{"name":"features","shape":[1,8],"datatype":"FP32","data":'
       '[0.5,-1.0,0.25,2.0,1.5,-0.5,0.0,1.0]}]}')
LOADS = [("demo_mlp infer", "/v2/models/demo_mlp/infer", MLP),
         ("aware_ensemble infer", "/v2/models/aware_ensemble/infer", ENS)]


# With 2 or more cores the daemons (their exporter threads included) run on
# the first half and wrk on the rest, so that the client's own work does not
# move with the daemon's; the receiver runs in this process, with wrk.
CPUS = sorted(os.sched_getaffinity(0))
DAEMON_CPUS = set(CPUS[:max(1, len(CPUS) // 2)])
CLIENT_CPUS = set(CPUS[len(CPUS) // 2:]) or set(CPUS)


def pin(cpus):
    return lambda: os.sched_setaffinity(0, cpus)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


class Sink(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    posts = 0
    bytes = 0

    def do_POST(self):
        n = int(self.headers.get("Content-Length", "0"))
        self.rfile.read(n)
        Sink.posts += 1
        Sink.bytes += n
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *a):
        pass


def start(args):
    port = free_port()
    log = tempfile.TemporaryFile()
    p = subprocess.Popen([os.path.join(ROOT, BUILD, "tallyd"), "--model-repository",
                          os.path.join(ROOT, "deploy", "models"), "--listen",
                          "127.0.0.1:%d" % port, "--log-level", "warn"] + args,
                         stdout=log, stderr=subprocess.STDOUT, preexec_fn=pin(DAEMON_CPUS))
    for _ in range(300):
        try:
            with urllib.request.urlopen("http://127.0.0.1:%d/v2/health/ready" % port, timeout=1) as r:
                if r.status == 200:
                    return p, port
        except OSError:
            time.sleep(0.05)
    p.kill()
    log.seek(0)
    sys.exit("tallyd did not start:\n" + log.read().decode(errors="replace")[-2000:])


def cpu_ns(pid):
    """CPU time of every thread of pid so far (schedstat: ns on a cpu)."""
    total = 0
    for t in os.listdir("/proc/%d/task" % pid):
        try:
            with open("/proc/%d/task/%s/schedstat" % (pid, t)) as f:
                total += int(f.read().split()[0])
        except OSError:
            pass  # a thread that just ended
    return total


def wrk(port, path, body, pid):
    lua = tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False)
    lua.write('wrk.method = "POST"\nwrk.body = \'%s\'\n'
              'wrk.headers["Content-Type"] = "application/json"\n' % body)
    lua.close()
    c0 = cpu_ns(pid)
    try:
        out = subprocess.run(["wrk", "-t1", "-c%d" % CONNS, "-d%ds" % SECS, "--latency", "-s",
                              lua.name, "http://127.0.0.1:%d%s" % (port, path)],
                             capture_output=True, text=True, check=True,
                             preexec_fn=pin(CLIENT_CPUS)).stdout
    finally:
        os.unlink(lua.name)
    cpu = cpu_ns(pid) - c0
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    n = int(re.search(r"(\d+) requests in", out).group(1))

    def ms(p):
        m = re.search(r"^\s+%s\s+([\d.]+)(us|ms|s)\b" % re.escape(p), out, re.M)
        v = float(m.group(1))
        return v / 1000 if m.group(2) == "us" else v * 1000 if m.group(2) == "s" else v

    if re.search(r"Non-2xx|Socket errors", out):
        sys.exit("wrk saw errors:\n" + out)
    return rps, ms("50%"), ms("99%"), cpu / 1000.0 / max(n, 1)


def metrics(port):
    with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port, timeout=5) as r:
        body = r.read().decode()
    return {k: int(re.search(r"^tallyd_trace_spans_%s_total (\d+)" % k, body, re.M).group(1))
            for k in ("exported", "failed", "dropped")}


def main():
    if not shutil.which("wrk"):
        sys.exit("wrk is not installed (deploy/deps.sh bench)")
    os.sched_setaffinity(0, CLIENT_CPUS)
    sink = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Sink)
    sink.daemon_threads = True
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    url = "http://127.0.0.1:%d/v1/traces" % sink.server_address[1]
    configs = [("off", []),
               ("off again", []),
               ("on, r=0", ["--otlp-endpoint", url, "--otlp-sample-ratio", "0"]),
               ("on, r=0.1", ["--otlp-endpoint", url, "--otlp-sample-ratio", "0.1"]),
               ("on, r=1", ["--otlp-endpoint", url])]
    procs = [start(a) for _, a in configs]
    try:
        res = {}
        for rnd in range(ROUNDS):
            for li, (_, path, body) in enumerate(LOADS):
                # every other round in reverse, so that no configuration is
                # always measured right after the same one
                order = list(enumerate(procs))
                for ci, (p, port) in order if rnd % 2 == 0 else order[::-1]:
                    res.setdefault((li, ci), []).append(wrk(port, path, body, p.pid))
        time.sleep(0.5)  # the last batch leaves the exporter
        counters = metrics(procs[-1][1])
    finally:
        for p, _ in procs:
            p.terminate()
        for p, _ in procs:
            p.wait(30)
        sink.shutdown()
    print("tracing cost: wrk -t1 -c%d, %ds a measurement, median of %d rounds; tallyd on "
          "cpus %s, wrk and the receiver on %s"
          % (CONNS, SECS, ROUNDS, sorted(DAEMON_CPUS), sorted(CLIENT_CPUS)))
    print("%-22s %-9s %11s %7s %15s %7s %7s %10s %7s"
          % ("request", "tracing", "requests/s", "cost", "rounds min-max", "p50 ms", "p99 ms",
             "cpu us/req", "cost"))
    for li, (name, _, _) in enumerate(LOADS):
        base = statistics.median(r[0] for r in res[(li, 0)])
        base_cpu = statistics.median(r[3] for r in res[(li, 0)])
        for ci, (cname, _) in enumerate(configs):
            rs = res[(li, ci)]
            rps = statistics.median(r[0] for r in rs)
            cpu = statistics.median(r[3] for r in rs)
            cost = "" if ci == 0 else "%+.1f%%" % (100.0 * (base - rps) / base)
            cpu_cost = "" if ci == 0 else "%+.1f%%" % (100.0 * (cpu - base_cpu) / base_cpu)
            print("%-22s %-9s %11.0f %7s %15s %7.2f %7.2f %10.1f %7s"
                  % (name, cname, rps, cost, "%.0f-%.0f" % (min(r[0] for r in rs),
                                                           max(r[0] for r in rs)),
                     statistics.median(r[1] for r in rs), statistics.median(r[2] for r in rs),
                     cpu, cpu_cost))
    print("r=1 exporter: %d spans exported, %d failed, %d dropped; the receiver took %d POSTs, "
          "%.1f MB" % (counters["exported"], counters["failed"], counters["dropped"], Sink.posts,
                       Sink.bytes / 1e6))


if __name__ == "__main__":
    main()
