"""Tracing over real HTTP: a small OTLP/HTTP receiver (http.server in a
thread) collects what tallyd exports. Checked: the answer's traceparent
(same trace, the server span's id, the sampled flag), span names, parent
links (client's span -> server span -> phases -> one compute span per hosted
member of the example AWARE ensemble), children within their parents' time,
attributes (model, version, route, status, request id), tracestate, invalid
headers starting new traces, parent-based sampling, the shutdown flush, and
a dead or slow receiver: spans failed or dropped and counted while requests
keep being answered at full speed. Tracing off: no header, no counters move."""
import http.server
import json
import os
import re
import shutil
import socket
import threading
import time

from harness import ROOT, Daemon, check, check_status, make_repo, run_tests, tensor

TID = "0af7651916cd43dd8448eb211c80319c"
PID = "b7ad6b7169203331"
MEMBERS = ["aware_%s_%d" % (f, i) for f in ("xception", "res2net", "efficientnet")
           for i in (1, 2, 3)]
ROW = [0.5, -1.0, 0.25, 2.0, 1.5, -0.5, 0.0, 1.0]
PHASES = ["receive", "queue", "decode", "compute", "encode", "send"]


class Receiver:
    """An OTLP/HTTP JSON collector: keeps every span POSTed to /v1/traces.
    delay: seconds to sleep before answering; status: what it answers."""

    def __init__(self, delay=0.0, status=200):
        self.spans, self.posts = [], 0
        self.delay, self.status = delay, status
        self.lock = threading.Lock()
        self.bad = []
        outer = self

        class H(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                n = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(n)
                try:
                    outer.take(self.path, self.headers.get("Content-Type"), body)
                except Exception as e:  # noqa: BLE001 - reported by the tests
                    outer.bad.append(repr(e))
                if outer.delay:
                    time.sleep(outer.delay)
                try:
                    self.send_response(outer.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"{}")
                except OSError:
                    pass  # tallyd gave up waiting

            def log_message(self, *a):
                pass

        self.srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.srv.daemon_threads = True
        self.port = self.srv.server_address[1]
        self.url = "http://127.0.0.1:%d/v1/traces" % self.port
        self.th = threading.Thread(target=self.srv.serve_forever, daemon=True)
        self.th.start()

    def take(self, path, ctype, body):
        if path != "/v1/traces" or ctype != "application/json":
            raise ValueError("POST %s with %s" % (path, ctype))
        doc = json.loads(body)
        with self.lock:
            self.posts += 1
            for rs in doc["resourceSpans"]:
                res = {a["key"]: a["value"] for a in rs["resource"]["attributes"]}
                for ss in rs["scopeSpans"]:
                    for sp in ss["spans"]:
                        sp["_resource"] = res
                        sp["_scope"] = ss["scope"]
                        self.spans.append(sp)

    def trace(self, tid, want=1, timeout=10):
        """The spans of trace tid once at least `want` arrived (a server span
        and its children come in one batch)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            with self.lock:
                got = [s for s in self.spans if s["traceId"] == tid]
            if len(got) >= want:
                return got
            time.sleep(0.05)
        raise AssertionError("trace %s: %d spans after %ss (receiver has %d in all; %r)"
                             % (tid, len(got), timeout, len(self.spans), self.bad))

    def close(self):
        self.srv.shutdown()
        self.srv.server_close()


def attrs(span):
    out = {}
    for a in span.get("attributes", []):
        v = a["value"]
        out[a["key"]] = int(v["intValue"]) if "intValue" in v else v.get("stringValue")
    return out


def metric(d, name):
    body = d.get("/metrics").body.decode()
    m = re.search(r"^%s (\d+)" % name, body, re.M)
    check(m, "no %s in /metrics" % name)
    return int(m.group(1))


def infer_body():
    return {"inputs": [tensor("features", [ROW], [1, 8])]}


def ens_repo():
    repo = make_repo()
    for m in MEMBERS + ["aware_ensemble", "demo_mlp"]:
        src = os.path.join(ROOT, "deploy", "models", m)
        check(os.path.isdir(src), "no example model %s (make models)" % src)
        shutil.copytree(src, os.path.join(repo, m))
    return repo


class Ctx:
    pass


def setup():
    c = Ctx()
    c.repo = ens_repo()
    c.rx = Receiver()
    c.d = Daemon(c.repo, ["--otlp-endpoint", c.rx.url]).start()
    c.daemon_logs = c.d.logs
    return c


def teardown(c):
    c.d.stop()
    c.rx.close()
    shutil.rmtree(c.repo, ignore_errors=True)


def span_tree(spans):
    roots = [s for s in spans if s["kind"] == 2]
    check(len(roots) == 1, "one server span, got %d: %r" % (len(roots), [s["name"] for s in spans]))
    return roots[0], {s["spanId"]: s for s in spans}


def within(child, parent, slack_ns=0):
    return (int(child["startTimeUnixNano"]) >= int(parent["startTimeUnixNano"]) - slack_ns and
            int(child["endTimeUnixNano"]) <= int(parent["endTimeUnixNano"]) + slack_ns)


def test_ensemble_trace(c):
    """Client span -> server span -> six phases -> nine hosted members."""
    r = c.d.post("/v2/models/aware_ensemble/infer", infer_body(),
                 headers={"traceparent": "00-%s-%s-01" % (TID, PID),
                          "tracestate": "congo=t61rcWkgMzE, rojo=00f067aa0ba902b7"})
    check_status(r, 200)
    tp = r.headers.get("traceparent", "")
    m = re.fullmatch(r"00-([0-9a-f]{32})-([0-9a-f]{16})-01", tp)
    check(m, "answer traceparent %r" % tp)
    check(m.group(1) == TID, "the answer names another trace: %r" % tp)
    server_id = m.group(2)
    check(server_id != PID, "the answer repeats the caller's span id")
    spans = c.rx.trace(TID, want=1 + len(PHASES) + len(MEMBERS))
    root, by_id = span_tree(spans)
    check(root["spanId"] == server_id, "server span %s, answer says %s" % (root["spanId"], server_id))
    check(root.get("parentSpanId") == PID, "server span's parent %r" % root.get("parentSpanId"))
    check(root.get("traceState") == "congo=t61rcWkgMzE, rojo=00f067aa0ba902b7", root.get("traceState"))
    a = attrs(root)
    check(a.get("tallyd.model") == "aware_ensemble", a)
    check(a.get("tallyd.model.version") == 1, a)
    check(a.get("http.response.status_code") == 200, a)
    check(a.get("http.request.method") == "POST", a)
    check(a.get("http.route") == "/v2/models/{model}[/versions/{version}]/infer", a)
    check(a.get("tallyd.request_id") == r.headers["x-request-id"], (a, r.headers))
    check(root["name"] == "POST /v2/models/{model}[/versions/{version}]/infer", root["name"])
    check(root["_resource"].get("service.name", {}).get("stringValue") == "tallyd", root["_resource"])
    check(root["_resource"].get("service.instance.id", {}).get("stringValue"), root["_resource"])
    check(root["_scope"]["name"] == "tallyd", root["_scope"])
    check(int(root["endTimeUnixNano"]) > int(root["startTimeUnixNano"]), "server span has no length")
    # its start is this request's wall-clock time
    check(abs(int(root["startTimeUnixNano"]) / 1e9 - time.time()) < 60, root["startTimeUnixNano"])
    children = [s for s in spans if s.get("parentSpanId") == root["spanId"]]
    check(sorted(s["name"] for s in children) == sorted(PHASES),
          "phases %r" % sorted(s["name"] for s in children))
    for s in children:
        check(s["kind"] == 1, "%s kind %r" % (s["name"], s["kind"]))
        check(s["traceId"] == TID)
        check(within(s, root), "%s outside the server span" % s["name"])
        check(int(s["endTimeUnixNano"]) >= int(s["startTimeUnixNano"]), s["name"])
    # the phases follow each other
    order = sorted(children, key=lambda s: int(s["startTimeUnixNano"]))
    check([s["name"] for s in order] == PHASES, [s["name"] for s in order])
    compute = [s for s in children if s["name"] == "compute"][0]
    members = [s for s in spans if s["name"] == "compute member"]
    check(len(members) == len(MEMBERS), "%d member spans" % len(members))
    check(sorted(attrs(s).get("tallyd.hosted.model") for s in members) == sorted(MEMBERS),
          [attrs(s) for s in members])
    for s in members:
        check(s["parentSpanId"] == compute["spanId"], "member's parent %s" % s["parentSpanId"])
        check(within(s, compute), "member span outside compute")
        check(s["kind"] == 1)
    check(len({s["spanId"] for s in spans}) == len(spans), "span ids repeat")
    check(not c.rx.bad, c.rx.bad)


def test_new_trace_when_absent_or_invalid(c):
    """No header or an invalid one (version ff, uppercase hex, all-zero ids,
    a bad length): a new trace, with no parent."""
    bad = [None, "ff-%s-%s-01" % (TID, PID), "00-%s-%s-01" % (TID.upper(), PID),
           "00-%s-%s-01" % ("0" * 32, PID), "00-%s-%s-01" % (TID, "0" * 16),
           "00-%s-%s-1" % (TID, PID), "00-%s-%s-01-00" % (TID, PID)]
    for h in bad:
        r = c.d.get("/v2/models/demo_mlp", headers={"traceparent": h} if h else {})
        check_status(r, 200)
        m = re.fullmatch(r"00-([0-9a-f]{32})-([0-9a-f]{16})-01", r.headers.get("traceparent", ""))
        check(m, "header %r: answer %r" % (h, r.headers.get("traceparent")))
        check(m.group(1) not in (TID, TID.lower(), "0" * 32), "kept the trace of %r" % h)
        spans = c.rx.trace(m.group(1), want=3)
        root, _ = span_tree(spans)
        check("parentSpanId" not in root or not root["parentSpanId"], root)
        check(root["spanId"] == m.group(2))
        check(attrs(root).get("http.route") == "/v2/models/{model}[/versions/{version}]")


def raw_get(d, path, headers):
    """GET with headers given as (name, value) pairs: a name may repeat."""
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=30)
    try:
        conn.putrequest("GET", path)
        for k, v in headers:
            conn.putheader(k, v)
        conn.endheaders()
        r = conn.getresponse()
        r.read()
        return r.status, r.getheader("traceparent") or ""
    finally:
        conn.close()


def test_repeated_headers(c):
    """Two traceparent lines: both ignored, a new trace. Several tracestate
    lines: one list, in order; a key twice: the tracestate is dropped."""
    status, tp = raw_get(c.d, "/v2/health/ready",
                         [("traceparent", "00-%s-%s-01" % ("6" * 32, PID)),
                          ("traceparent", "00-%s-%s-01" % ("7" * 32, PID))])
    check(status == 200)
    tid = tp.split("-")[1] if tp.count("-") == 3 else ""
    check(len(tid) == 32 and tid not in ("6" * 32, "7" * 32), "kept a duplicated parent: %r" % tp)
    root, _ = span_tree(c.rx.trace(tid, want=2))
    check(not root.get("parentSpanId"), root)
    status, tp = raw_get(c.d, "/v2/health/ready",
                         [("traceparent", "00-%s-%s-01" % ("8" * 32, PID)),
                          ("tracestate", "congo=t61rcWkgMzE"), ("tracestate", "rojo=00f067aa0ba902b7")])
    root, _ = span_tree(c.rx.trace("8" * 32, want=2))
    check(root.get("traceState") == "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7", root.get("traceState"))
    status, tp = raw_get(c.d, "/v2/health/ready",
                         [("traceparent", "00-%s-%s-01" % ("9" * 32, PID)),
                          ("tracestate", "congo=a"), ("tracestate", "congo=b")])
    root, _ = span_tree(c.rx.trace("9" * 32, want=2))
    check(root.get("parentSpanId") == PID, "the traceparent must still count")
    check(not root.get("traceState"), "a tracestate with a key twice was kept: %r" % root)


def test_deadline_passed_while_computing(c):
    """A request answered 504 while its job may still run: the job holds the
    record, the request's spans are exported with status 504, nothing leaks
    (test_clean_exit under ASan)."""
    rows = [[0.5] * 8] * 20000
    body = {"inputs": [tensor("features", rows, [len(rows), 8])], "parameters": {"timeout_ms": 1}}
    seen = []
    for i in range(5):
        tid = "%032x" % (0xabc000 + i)
        r = c.d.post("/v2/models/aware_ensemble/infer", body,
                     headers={"traceparent": "00-%s-%s-01" % (tid, PID)})
        check(r.status in (200, 504), r)
        seen.append((tid, r.status))
    print("  statuses: %s" % [s for _, s in seen])
    for tid, status in seen:
        root, _ = span_tree(c.rx.trace(tid, want=2))
        check(attrs(root).get("http.response.status_code") == status, (status, attrs(root)))
        if status >= 500:
            check(root.get("status", {}).get("code") == 2, root.get("status"))
    check_status(c.d.get("/v2/health/ready"), 200)


def test_future_version_and_errors(c):
    """A later version's fields are read (extra fields ignored); a 404 is
    traced with its status, a 5xx-free error has no error status."""
    fut = "cc-%s-%s-01-what-the-future-will-be-like" % ("1" * 32, PID)
    r = c.d.post("/v2/models/nope/infer", infer_body(), headers={"traceparent": fut})
    check_status(r, 404)
    check(r.headers.get("traceparent", "").startswith("00-%s-" % ("1" * 32)), r.headers)
    root, _ = span_tree(c.rx.trace("1" * 32, want=2))
    check(root.get("parentSpanId") == PID)
    check(attrs(root).get("http.response.status_code") == 404, attrs(root))
    check("tallyd.model" not in attrs(root), "an unknown model's name was recorded")
    check(not root.get("status", {}).get("code"), root.get("status"))


def test_unsampled_parent_not_exported(c):
    """A parent that says 'not sampled' is followed: the answer says 00 and
    nothing of that trace is exported (parent-based sampling)."""
    tid = "2" * 32
    before = metric(c.d, "tallyd_trace_spans_exported_total")
    r = c.d.post("/v2/models/aware_ensemble/infer", infer_body(),
                 headers={"traceparent": "00-%s-%s-00" % (tid, PID)})
    check_status(r, 200)
    check(re.fullmatch(r"00-%s-[0-9a-f]{16}-00" % tid, r.headers.get("traceparent", "")),
          r.headers.get("traceparent"))
    # a sampled request after it: once its spans arrive, the first would have
    r2 = c.d.get("/v2/health/ready", headers={"traceparent": "00-%s-%s-01" % ("3" * 32, PID)})
    check_status(r2, 200)
    c.rx.trace("3" * 32, want=2)
    time.sleep(0.3)
    check(not [s for s in c.rx.spans if s["traceId"] == tid], "an unsampled trace was exported")
    check(metric(c.d, "tallyd_trace_spans_exported_total") > before)


def test_sample_ratio_zero():
    """--otlp-sample-ratio 0: new traces are not sampled, a sampled parent
    still is."""
    rx = Receiver()
    repo = ens_repo()
    d = Daemon(repo, ["--otlp-endpoint", rx.url, "--otlp-sample-ratio", "0"]).start()
    try:
        for _ in range(20):
            r = d.get("/v2/health/live")
            check(re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-00", r.headers.get("traceparent", "")),
                  r.headers.get("traceparent"))
        r = d.get("/v2/health/live", headers={"traceparent": "00-%s-%s-01" % ("4" * 32, PID)})
        check(r.headers.get("traceparent", "").endswith("-01"))
        rx.trace("4" * 32, want=2)
        time.sleep(0.3)
        check({s["traceId"] for s in rx.spans} == {"4" * 32}, "unsampled roots were exported")
    finally:
        d.stop()
        rx.close()
        shutil.rmtree(repo, ignore_errors=True)


def test_bad_flags():
    """Bad values are refused at start, by name."""
    repo = make_repo()
    try:
        for args, what in ((["--otlp-endpoint", "http://127.0.0.1:9/v1/traces",
                             "--otlp-sample-ratio", "1.5"], "--otlp-sample-ratio"),
                           (["--otlp-sample-ratio", "x"], "--otlp-sample-ratio"),
                           (["--otlp-endpoint", "ftp://example/v1/traces"], "--otlp-endpoint"),
                           (["--otlp-queue-size", "0"], "--otlp-queue-size"),
                           (["--otlp-timeout-ms", "0"], "--otlp-timeout-ms")):
            d = Daemon(repo, args)
            try:
                d.start(timeout=5)
                raise AssertionError("started with %r" % args)
            except RuntimeError as e:
                check(what in str(e), "%r: %s" % (args, str(e)[-400:]))
            finally:
                d.stop()
    finally:
        shutil.rmtree(repo, ignore_errors=True)


def test_tracing_off():
    """No --otlp-endpoint: no traceparent answered, the counters stay 0."""
    repo = make_repo()
    d = Daemon(repo).start()
    try:
        r = d.get("/v2/health/ready", headers={"traceparent": "00-%s-%s-01" % (TID, PID)})
        check_status(r, 200)
        check("traceparent" not in r.headers, r.headers)
        for n in ("exported", "failed", "dropped"):
            check(metric(d, "tallyd_trace_spans_%s_total" % n) == 0)
    finally:
        d.stop()
        shutil.rmtree(repo, ignore_errors=True)


def timed_requests(d, n):
    lat = []
    for _ in range(n):
        t = time.time()
        r = d.post("/v2/models/demo_mlp/infer",
                   {"inputs": [tensor("features", [[0.1 * i for i in range(16)]], [1, 16])]})
        lat.append(time.time() - t)
        check_status(r, 200)
    lat.sort()
    return lat


def test_dead_receiver():
    """Nothing listens at the endpoint: every export fails fast, counted;
    every request is answered."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    repo = ens_repo()
    d = Daemon(repo, ["--otlp-endpoint", "http://127.0.0.1:%d/v1/traces" % port,
                      "--otlp-queue-size", "8"]).start()
    try:
        lat = timed_requests(d, 300)
        deadline = time.time() + 5
        while time.time() < deadline and metric(d, "tallyd_trace_spans_failed_total") == 0:
            time.sleep(0.1)
        failed = metric(d, "tallyd_trace_spans_failed_total")
        dropped = metric(d, "tallyd_trace_spans_dropped_total")
        check(failed > 0, "no failed exports counted")
        check(metric(d, "tallyd_trace_spans_exported_total") == 0)
        check(lat[len(lat) * 99 // 100] < 0.5, "p99 %.3fs with a dead collector" % lat[-3])
        print("  dead receiver: %d spans failed, %d dropped, p99 %.1f ms"
              % (failed, dropped, 1000 * lat[len(lat) * 99 // 100]))
    finally:
        rc = d.stop()
        check(rc == 0, "exit %r" % rc)
        shutil.rmtree(repo, ignore_errors=True)


def test_slow_receiver_drops_and_shutdown_is_bounded():
    """A collector that takes 3 s to answer, a 300 ms export timeout and a
    queue of 2: spans are dropped and counted, requests keep their speed,
    and shutdown's flush waits a bounded time."""
    rx = Receiver(delay=3.0)
    repo = ens_repo()
    d = Daemon(repo, ["--otlp-endpoint", rx.url, "--otlp-queue-size", "2",
                      "--otlp-timeout-ms", "300"]).start()
    try:
        t0 = time.time()
        lat = timed_requests(d, 400)
        took = time.time() - t0
        dropped = metric(d, "tallyd_trace_spans_dropped_total")
        check(dropped > 0, "no spans dropped with a 2-deep queue and a 3 s collector")
        check(lat[len(lat) * 99 // 100] < 0.5, "p99 %.3fs with a slow collector" % lat[-3])
        deadline = time.time() + 5
        while time.time() < deadline and metric(d, "tallyd_trace_spans_failed_total") == 0:
            time.sleep(0.1)
        check(metric(d, "tallyd_trace_spans_failed_total") > 0, "timeouts not counted as failed")
        print("  slow receiver: 400 requests in %.2fs, %d spans dropped, p99 %.1f ms"
              % (took, dropped, 1000 * lat[len(lat) * 99 // 100]))
        for _ in range(2):
            d.get("/v2/health/live")
        t = time.time()
        rc = d.stop()
        stop_s = time.time() - t
        check(rc == 0, "exit %r" % rc)
        # the flush is bounded by about twice --otlp-timeout-ms (plus the drain)
        check(stop_s < 2.5, "shutdown took %.2fs with a slow collector" % stop_s)
    finally:
        d.stop()
        rx.close()
        shutil.rmtree(repo, ignore_errors=True)


def test_shutdown_flushes():
    """Spans of the last requests reach the collector before tallyd exits."""
    rx = Receiver()
    repo = ens_repo()
    d = Daemon(repo, ["--otlp-endpoint", rx.url]).start()
    try:
        r = d.get("/v2/health/live", headers={"traceparent": "00-%s-%s-01" % ("5" * 32, PID)})
        check_status(r, 200)
        check(d.stop() == 0)
        check(len([s for s in rx.spans if s["traceId"] == "5" * 32]) >= 2,
              "the last request's spans were not flushed at exit")
    finally:
        d.stop()
        rx.close()
        shutil.rmtree(repo, ignore_errors=True)


def test_clean_exit(c):
    """Last: the daemon drains and exits 0 (ASan: no leaked trace records)."""
    rc = c.d.stop()
    check(rc == 0, "tallyd exited with %r:\n%s" % (rc, c.d.logs()[-3000:]))
    check("ERROR: " not in c.d.logs(), c.d.logs()[-3000:])


def _wrap(fn):
    """Tests that start their own daemon take no context."""
    return lambda c: fn()


if __name__ == "__main__":
    tests = []
    for name, fn in list(globals().items()):
        if name.startswith("test_") and callable(fn):
            tests.append((fn.__code__.co_firstlineno, name,
                          fn if fn.__code__.co_argcount else _wrap(fn)))
    tests.sort()
    run_tests([(n, f) for _, n, f in tests], setup, teardown)
