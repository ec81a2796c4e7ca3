"""The client tools against a real tallyd: build/tallyctl (the C library
libtally under it), clients/python/tallyclient.py (CLI and library) and the
curl scripts in clients/curl. Checks answers against direct HTTP, the exit
codes scripts depend on (0 ok, 1 usage, 2 no connection, 3 HTTP 4xx, 4 HTTP
5xx), and, through a small fake server, what goes over the wire (API key
header, CSV columns, 5xx answers)."""
import hashlib
import http.server
import json
import string
import os
import shutil
import subprocess
import sys
import tempfile
import threading

from harness import (BIN, ROOT, Daemon, SkipTest, check, close, collect, free_port, run_tests,
                     tensor)

BUILD = os.environ.get("TALLYD_BUILD", os.path.dirname(BIN))
TALLYCTL = os.path.join(BUILD, "tallyctl")
PYCLIENT = os.path.join(ROOT, "clients", "python", "tallyclient.py")
CURL_DIR = os.path.join(ROOT, "clients", "curl")
sys.path.insert(0, os.path.dirname(PYCLIENT))
import tallyclient  # noqa: E402

ROW1 = [0.1 * i for i in range(16)]
ROW2 = [1.0 - 0.05 * i for i in range(16)]


class FakeServer:
    """A fake server that records each request and answers by path: it shows
    what the clients send and lets 5xx and 503 answers be tested."""

    def __init__(self):
        self.requests = []
        fake = self

        class H(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def answer(self, status, body, ctype="application/json"):
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def handle_any(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                fake.requests.append({"method": self.command, "path": self.path,
                                      "headers": dict(self.headers), "body": body})
                p = self.path
                if p == "/v2/health/ready":
                    return self.answer(503, {"ready": False})
                if p == "/v2/health/live":
                    return self.answer(200, {"live": True})
                if p == "/metrics":
                    return self.answer(200, b"# HELP fake_requests_total requests\n"
                                            b"# TYPE fake_requests_total counter\n"
                                            b"fake_requests_total{route=\"infer\"} 7\n", "text/plain")
                if p.startswith("/v2/models/boom"):
                    return self.answer(500, {"error": "boom: an internal failure"})
                if p == "/v2/models/echo":
                    return self.answer(200, {"name": "echo", "inputs": [{"name": "x", "datatype": "FP64",
                                                                          "shape": [-1]}]})
                if p.startswith("/v2/models/echo/"):
                    return self.answer(200, {"model_name": "echo", "model_version": "1", "outputs": []})
                return self.answer(404, {"error": "fake: unknown route '%s'" % p})

            do_GET = do_POST = do_DELETE = handle_any

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = "http://127.0.0.1:%d" % self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def last(self):
        return self.requests[-1]

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


class Ctx:
    def __init__(self):
        if not os.access(TALLYCTL, os.X_OK):
            raise RuntimeError("%s is missing: run `make %s`" % (TALLYCTL, TALLYCTL))
        self.tmp = tempfile.mkdtemp(prefix="tally-clients-")
        self.repo = os.path.join(self.tmp, "models")
        subprocess.run([sys.executable, os.path.join(ROOT, "deploy", "gen_models.py"), self.repo],
                       check=True, stdout=subprocess.DEVNULL)
        self.d = Daemon(self.repo).start()
        self.url = "http://127.0.0.1:%d" % self.d.port
        self.fake = FakeServer()
        # nothing listens here: the port was free a moment ago
        self.dead_url = "http://127.0.0.1:%d" % free_port()

    def file(self, name, content):
        p = os.path.join(self.tmp, name)
        with open(p, "w") as f:
            f.write(content if isinstance(content, str) else json.dumps(content))
        return p

    def daemon_logs(self):
        return self.d.logs()


def setup():
    return Ctx()


def teardown(c):
    c.fake.stop()
    c.d.stop()
    shutil.rmtree(c.tmp, ignore_errors=True)


def run(cmd, env=None, url=None):
    e = dict(os.environ)
    e.pop("TALLY_API_KEY", None)
    if url:
        e["TALLY_URL"] = url
    e.update(env or {})
    p = subprocess.run(cmd, capture_output=True, text=True, env=e, timeout=60)
    return p.returncode, p.stdout, p.stderr


def ctl(c, *args, url=None, env=None):
    return run([TALLYCTL] + list(args), env, url or c.url)


def py(c, *args, url=None, env=None):
    return run([sys.executable, PYCLIENT] + list(args), env, url or c.url)


def expect(res, code, stderr_has=None):
    rc, out, err = res
    check(rc == code, "exit %d, expected %d\nstdout: %s\nstderr: %s" % (rc, code, out[:500], err[:500]))
    if stderr_has:
        check(stderr_has.lower() in err.lower(), "stderr %r lacks %r" % (err[:400], stderr_has))
    return out


def direct_output(c, rows):
    r = c.d.infer("demo_mlp", [tensor("features", rows)])
    check(r.status == 200, repr(r))
    return r.json()["outputs"][0]


def check_same_output(answer, expected):
    out = answer["outputs"][0]
    check(out["name"] == "output" and out["shape"] == expected["shape"], repr(out))
    got = tallyclient._flatten(out["data"], [])
    for a, b in zip(got, expected["data"]):
        check(close(a, b, rel=1e-6), "%r != %r" % (got, expected["data"]))


# ---- both command-line tools: same commands, same exit codes ----

TOOLS = (("tallyctl", ctl), ("tallyclient.py", py))


def test_health(c):
    for name, tool in TOOLS:
        check(json.loads(expect(tool(c, "health"), 0)) == {"ready": True}, name)
        check(json.loads(expect(tool(c, "health", "live"), 0)) == {"live": True}, name)
        # 503 while not ready: a 5xx, exit 4
        expect(tool(c, "health", "ready", url=c.fake.url), 4, "HTTP 503")
        expect(tool(c, "health", "sideways"), 1)


def test_connection_refused_exit_2(c):
    for name, tool in TOOLS:
        expect(tool(c, "health", url=c.dead_url), 2)
        expect(tool(c, "models", url=c.dead_url), 2)


def test_models_and_metadata(c):
    index = c.d.post("/v2/repository/index").json()
    for name, tool in TOOLS:
        check(json.loads(expect(tool(c, "models"), 0)) == index, name)
        table = expect(tool(c, "models", "--format", "table"), 0).splitlines()
        check(table[0].split() == ["NAME", "VERSION", "STATE", "REASON"], repr(table))
        check(any(l.split()[:3] == ["demo_mlp", "1", "READY"] for l in table[1:]), repr(table))
        meta = json.loads(expect(tool(c, "metadata"), 0))
        check(meta["name"] == "tallyd" and "fit" in meta["extensions"], repr(meta))
        m = json.loads(expect(tool(c, "metadata", "demo_mlp"), 0))
        check(m == c.d.get("/v2/models/demo_mlp").json(), repr(m))
        flat = expect(tool(c, "metadata", "demo_mlp", "--format", "table"), 0)
        check("inputs[0].name\tfeatures" in flat and "inputs[0].shape\t-1,16" in flat, flat)
        expect(tool(c, "metadata", "demo_mlp", "--model-version", "99"), 3, "version")


def test_infer_json_files(c):
    expected = direct_output(c, [ROW1, ROW2])
    nested = c.file("nested.json", {"features": [ROW1, ROW2]})
    oip = c.file("oip.json", {"inputs": [{"name": "features", "shape": [2, 16], "datatype": "FP32",
                                          "data": ROW1 + ROW2}],
                              "parameters": {"timeout_ms": 10000}})
    for name, tool in TOOLS:
        for f in (nested, oip):
            ans = json.loads(expect(tool(c, "infer", "demo_mlp", f), 0))
            check(ans["model_name"] == "demo_mlp" and ans["model_version"] == "1", repr(ans))
            check_same_output(ans, expected)
        ans = json.loads(expect(tool(c, "infer", "demo_mlp", nested, "--model-version", "1"), 0))
        check_same_output(ans, expected)


def test_infer_csv_and_table(c):
    expected = direct_output(c, [ROW1, ROW2])
    csv = c.file("rows.csv", "\n".join(",".join("%r" % x for x in r) for r in (ROW1, ROW2)) + "\n")
    for name, tool in TOOLS:
        ans = json.loads(expect(tool(c, "infer", "demo_mlp", "--input", "features", csv), 0))
        check_same_output(ans, expected)
        out = expect(tool(c, "infer", "demo_mlp", "--input", "features", csv, "--format", "table"), 0)
        lines = out.splitlines()
        check(lines[0] == "model_name\tdemo_mlp" and lines[2] == "# output FP32 [2, 4]", repr(lines))
        values = [[float(x) for x in l.split("\t")] for l in lines[3:5]]
        check(len(values) == 2 and all(len(v) == 4 for v in values), repr(lines))
        for a, b in zip(values[0] + values[1], expected["data"]):
            check(close(a, b, rel=1e-6), "%r vs %r" % (values, expected["data"]))


def test_csv_header_columns_and_datatypes(c):
    """A CSV with a header: one tensor per column, [rows]; integer columns go
    as INT64, others FP32 unless the model's metadata says otherwise (the
    fake's "x" is FP64)."""
    f = c.file("cols.csv", "x,labels,weight\n1.5,0,2\n2.5,1,3.25\n")
    for name, tool in TOOLS:
        expect(tool(c, "evaluate", "echo", f, url=c.fake.url), 0)
        body = json.loads(c.fake.last()["body"])
        got = {t["name"]: (t["datatype"], t["shape"], tallyclient._flatten(t["data"], []))
               for t in body["inputs"]}
        check(got == {"x": ("FP64", [2], [1.5, 2.5]), "labels": ("INT64", [2], [0, 1]),
                      "weight": ("FP32", [2], [2, 3.25])}, "%s: %r" % (name, got))
        expect(tool(c, "evaluate", "echo", f, "--datatype", "labels=INT32", url=c.fake.url), 0)
        body = json.loads(c.fake.last()["body"])
        check([t["datatype"] for t in body["inputs"]] == ["FP32", "INT32", "FP32"], repr(body))
        check(c.fake.last()["path"] == "/v2/models/echo/evaluate", c.fake.last()["path"])


def test_params_reach_the_server(c):
    f = c.file("p.json", {"x": [1.0, 2.0]})
    for name, tool in TOOLS:
        expect(tool(c, "fit", "echo", f, "--param", "epochs=3", "--param", "aggregator=medium",
                    "--params", '{"seed": 7, "epochs": 1}', url=c.fake.url), 0)
        body = json.loads(c.fake.last()["body"])
        check(body["parameters"] == {"epochs": 3, "aggregator": "medium", "seed": 7}, repr(body))
        check(c.fake.last()["path"] == "/v2/models/echo/fit", c.fake.last()["path"])


def test_not_found_exit_3(c):
    f = c.file("one.json", {"features": [ROW1]})
    for name, tool in TOOLS:
        expect(tool(c, "infer", "no_such_model", f), 3, "unknown model 'no_such_model'")
        expect(tool(c, "metadata", "no_such_model"), 3, "unknown model")
        expect(tool(c, "load", "no_such_model"), 3)


def test_bad_input_is_400_exit_3(c):
    f = c.file("short.json", {"features": [[1.0, 2.0, 3.0]]})
    for name, tool in TOOLS:
        expect(tool(c, "infer", "demo_mlp", f), 3, "HTTP 400")


def test_server_error_exit_4(c):
    f = c.file("boom.json", {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}]})
    for name, tool in TOOLS:
        expect(tool(c, "infer", "boom", f, url=c.fake.url), 4, "boom: an internal failure")


def test_usage_errors_exit_1(c):
    ragged = c.file("ragged.json", {"features": [[1.0, 2.0], [3.0]]})
    notjson = c.file("bad.json", "{not json")
    for name, tool in TOOLS:
        expect(tool(c, "no_such_command"), 1)
        expect(tool(c, "infer", "demo_mlp"), 1)           # no files
        expect(tool(c, "models", "--format", "xml"), 1)
        expect(tool(c, "infer", "demo_mlp", ragged), 1)
        expect(tool(c, "infer", "demo_mlp", notjson), 1)
        expect(tool(c, "infer", "demo_mlp", os.path.join(c.tmp, "missing.json")), 1)
        expect(tool(c, "session", "frobnicate"), 1)


def test_learning_verbs_on_an_mlp_are_refused(c):
    """fit, evaluate and calibrate exist as routes; the mlp kind refuses them
    with 400, which the tools turn into exit 3 with the server's message."""
    f = c.file("fit.json", {"inputs": [tensor("features", [ROW1, ROW2]),
                                       tensor("labels", [0, 1], datatype="INT64")]})
    for name, tool in TOOLS:
        for verb in ("fit", "evaluate", "calibrate"):
            expect(tool(c, verb, "demo_mlp", f), 3, "does not support %s" % verb)


def test_session_verbs_reach_the_server(c):
    for name, tool in TOOLS:
        # demo_mlp holds no KV cache: a 4xx whatever the build
        expect(tool(c, "session", "create", "demo_mlp"), 3)
        expect(tool(c, "session", "get", "demo_mlp", "nosuchsession"), 3)
        expect(tool(c, "session", "delete", "demo_mlp", "nosuchsession"), 3)
        expect(tool(c, "session", "create", "echo", url=c.fake.url), 0)
        check(c.fake.last()["method"] == "POST" and c.fake.last()["path"] == "/v2/models/echo/sessions", "")
        expect(tool(c, "session", "delete", "echo", "s1", url=c.fake.url), 0)
        check(c.fake.last()["method"] == "DELETE" and
              c.fake.last()["path"] == "/v2/models/echo/sessions/s1", repr(c.fake.last()))
        f = c.file("tok.json", {"input_ids": [[1, 2, 3]]})
        expect(tool(c, "session", "infer", "echo", "s1", f, "--datatype", "INT32", url=c.fake.url), 0)
        body = json.loads(c.fake.last()["body"])
        check(c.fake.last()["path"] == "/v2/models/echo/sessions/s1/infer", c.fake.last()["path"])
        check(body["inputs"][0]["datatype"] == "INT32" and body["inputs"][0]["shape"] == [1, 3], repr(body))


def test_load_unload(c):
    for name, tool in TOOLS:
        expect(tool(c, "unload", "demo_mlp"), 0)
        check(c.d.get("/v2/models/demo_mlp/ready").status in (404, 503), name)
        f = c.file("one.json", {"features": [ROW1]})
        expect(tool(c, "infer", "demo_mlp", f), 4 if c.d.get("/v2/models/demo_mlp/ready").status == 503 else 3)
        expect(tool(c, "load", "demo_mlp"), 0)
        check(c.d.get("/v2/models/demo_mlp/ready").status == 200, name)


def test_keygen(c):
    for name, tool in TOOLS:
        lines = expect(tool(c, "keygen", "--scope", "admin"), 0).splitlines()
        check(len(lines) == 2, repr(lines))
        key, (digest, scope) = lines[0], lines[1].split()
        # one key format with tallyd --keygen: 43 base64url characters
        check(len(key) == 43 and all(ch.isalnum() or ch in "-_" for ch in key), key)
        check(digest == hashlib.sha256(key.encode()).hexdigest() and scope == "admin", repr(lines))
        j = json.loads(expect(tool(c, "keygen", "--format", "json"), 0))
        check(j["scope"] == "infer" and j["key_file_line"] == "%s infer" % j["sha256"], repr(j))
        check(hashlib.sha256(j["key"].encode()).hexdigest() == j["sha256"], repr(j))
        check(j["key"] != key, "two keys alike")
        expect(tool(c, "keygen", "--scope", "root"), 1)
    # one key format for all three: tallyd --keygen's
    p = subprocess.run([BIN, "--keygen",
                        "--scope", "admin"], capture_output=True, text=True, timeout=10)
    dkey, dline = p.stdout.splitlines()
    shape = lambda k: (len(k), set(k) <= set(string.ascii_letters + string.digits + "-_"))  # noqa: E731
    for name, tool in TOOLS:
        key, line = expect(tool(c, "keygen", "--scope", "admin"), 0).splitlines()
        check(shape(key) == shape(dkey) == (43, True), (name, key, dkey))
        check(len(line) == len(dline) and line.endswith(" admin") and dline.endswith(" admin"), (line, dline))


def test_api_key_header(c):
    for name, tool in TOOLS:
        expect(tool(c, "health", "live", url=c.fake.url, env={"TALLY_API_KEY": "k-env"}), 0)
        check(c.fake.last()["headers"].get("Authorization") == "Bearer k-env", repr(c.fake.last()))
        expect(tool(c, "health", "live", "--api-key", "k-flag", url=c.fake.url,
                    env={"TALLY_API_KEY": "k-env"}), 0)
        check(c.fake.last()["headers"].get("Authorization") == "Bearer k-flag", repr(c.fake.last()))
        expect(tool(c, "health", "live", url=c.fake.url), 0)
        check("Authorization" not in c.fake.last()["headers"], repr(c.fake.last()))


def test_url_flag_beats_env(c):
    for name, tool in TOOLS:
        expect(tool(c, "health", "--url", c.url, url=c.dead_url), 0)


# ---- the Python library ----

def test_python_library(c):
    cl = tallyclient.TallyClient(c.url)
    check(cl.live() and cl.ready(), "not live/ready")
    ans = cl.infer("demo_mlp", {"features": [ROW1, ROW2]})
    expected = direct_output(c, [ROW1, ROW2])
    check_same_output(ans, expected)
    out = cl.output(ans, "output")
    check(len(out) == 2 and len(out[0]) == 4 and close(out[1][3], expected["data"][7]), repr(out))
    check(cl.model_ready("demo_mlp"), "demo_mlp not ready")
    check(any(r["name"] == "demo_mlp" for r in cl.repository_index()), "index")
    try:
        cl.infer("no_such_model", {"features": [ROW1]})
        check(False, "no error")
    except tallyclient.TallyError as e:
        check(e.status == 404 and "unknown model" in e.message and e.exit_code == 3, repr(e))
    try:
        cl.fit("demo_mlp", {"features": [ROW1], "labels": [1]})
        check(False, "no error")
    except tallyclient.TallyError as e:
        check(e.status == 400 and "does not support fit" in e.message, repr(e))
    cl.close()
    dead = tallyclient.TallyClient(c.dead_url, timeout=5)
    try:
        dead.live()
        check(False, "no error")
    except tallyclient.TallyError as e:
        check(e.status == 0 and e.exit_code == 2, repr(e))
    check(not tallyclient.TallyClient(c.fake.url).ready(), "fake answers 503")


# ---- the curl scripts ----

def sh(c, script, *args, url=None, env=None):
    return run(["bash", os.path.join(CURL_DIR, script)] + list(args), env, url or c.url)


def test_wait_ready(c):
    expect(sh(c, "wait-ready.sh", "--timeout", "5"), 0)
    expect(sh(c, "wait-ready.sh", "--model", "demo_mlp"), 0)
    expect(sh(c, "wait-ready.sh", "--model", "no_such_model"), 3)
    expect(sh(c, "wait-ready.sh", "--timeout", "1", url=c.dead_url), 2, "not reachable")
    expect(sh(c, "wait-ready.sh", "--timeout", "1", url=c.fake.url), 4, "503")
    expect(sh(c, "wait-ready.sh", "--bogus"), 1)
    sh(c, "wait-ready.sh", "--timeout", "0", url=c.fake.url, env={"TALLY_API_KEY": "k-sh"})
    check(c.fake.last()["headers"].get("Authorization") == "Bearer k-sh", repr(c.fake.last()))


def test_reload_picks_up_a_new_model(c):
    src = os.path.join(c.repo, "demo_mlp")
    shutil.copytree(src, os.path.join(c.repo, "demo_copy"))
    check(c.d.get("/v2/models/demo_copy/ready").status == 404, "present before the reload")
    expect(sh(c, "reload.sh", "--pid", str(c.d.proc.pid), "--model", "demo_copy", "--timeout", "20"), 0)
    check(c.d.get("/v2/models/demo_copy/ready").status == 200, "not ready after reload.sh")
    check(c.d.proc.poll() is None, "the daemon died of SIGHUP")
    expect(sh(c, "reload.sh", "--pid", "999999999"), 1, "cannot signal")


def test_fit_from_file(c):
    f = c.file("fitbody.json", {"inputs": [tensor("features", [ROW1]), tensor("labels", [1], datatype="INT64")],
                                "parameters": {"epochs": 2}})
    expect(sh(c, "fit-from-file.sh", "demo_mlp", f), 3, "does not support fit")
    expect(sh(c, "fit-from-file.sh", "--evaluate", "demo_mlp", f), 3, "does not support evaluate")
    expect(sh(c, "fit-from-file.sh", "--calibrate", "demo_mlp", f), 3, "does not support calibrate")
    out = expect(sh(c, "fit-from-file.sh", "echo", f, url=c.fake.url, env={"TALLY_API_KEY": "adm"}), 0)
    check(json.loads(out)["model_name"] == "echo", out)
    last = c.fake.last()
    with open(f, "rb") as fh:
        check(last["body"] == fh.read(), "the file was not sent verbatim")
    check(last["path"] == "/v2/models/echo/fit" and last["headers"].get("Authorization") == "Bearer adm",
          repr(last))
    expect(sh(c, "fit-from-file.sh", "boom", f, url=c.fake.url), 4)
    expect(sh(c, "fit-from-file.sh", "demo_mlp", f, url=c.dead_url), 2)
    expect(sh(c, "fit-from-file.sh", "demo_mlp"), 1)


def test_metrics_grep(c):
    out = expect(sh(c, "metrics-grep.sh", 'fake_requests_total\\{route="infer"\\}', url=c.fake.url), 0)
    check(out.strip() == 'fake_requests_total{route="infer"} 7', out)
    expect(sh(c, "metrics-grep.sh", "no_such_metric", url=c.fake.url), 5)
    check("# HELP" in expect(sh(c, "metrics-grep.sh", "--all", "HELP", url=c.fake.url), 0), "")
    expect(sh(c, "metrics-grep.sh", "x", url=c.dead_url), 2)
    # against the daemon the exit code follows its /metrics answer
    status = c.d.get("/metrics").status
    rc, out, err = sh(c, "metrics-grep.sh", ".")
    want = 0 if status == 200 else 3 if 400 <= status < 500 else 4
    check(rc == want, "metrics %d, exit %d: %s" % (status, rc, err))


if __name__ == "__main__":
    run_tests(collect(globals()), setup, teardown)
