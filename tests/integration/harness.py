"""Integration-test harness: starts a real tallyd on a free loopback port with
a temporary model repository and talks HTTP to it (standard library only).

Each test file builds its repository, starts a Daemon, and runs its tests with
run_tests(), which prints the closing line "tally: N passed, N failed, N
skipped" that tests/run.sh counts. A test that needs something the machine
lacks raises SkipTest(reason); run_tests prints "skip NAME: REASON" (one
line), and tests/run.sh lists those lines at the end of the run. A file that
cannot run at all prints "skip: REASON" and its tally line."""
import http.client
import json
import os
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import traceback

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "tests", "reference"))
import st  # noqa: E402

BIN = os.environ.get("TALLYD_BIN", os.path.join(ROOT, "build", "tallyd"))
# Under a wrapper (make memcheck runs tallyd under valgrind, ~20-50x slower)
# waits that bound the daemon's own speed are multiplied by SLOW.
SLOW = 25 if os.environ.get("TALLYD_WRAPPER") else 1


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def listening_port(pid):
    """The TCP port process pid listens on, or None (yet): its socket
    descriptors' inodes looked up in /proc/net/tcp and tcp6 (state 0A)."""
    inodes = set()
    try:
        for fd in os.listdir("/proc/%d/fd" % pid):
            try:
                t = os.readlink("/proc/%d/fd/%s" % (pid, fd))
            except OSError:
                continue
            if t.startswith("socket:["):
                inodes.add(t[8:-1])
    except OSError:
        return None
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    cols = line.split()
                    if len(cols) > 9 and cols[3] == "0A" and cols[9] in inodes:
                        return int(cols[1].rsplit(":", 1)[1], 16)
        except OSError:
            continue
    return None


class Response:
    def __init__(self, status, headers, body):
        self.status = status
        self.headers = {k.lower(): v for k, v in headers}
        self.body = body

    def json(self):
        return json.loads(self.body)

    def __repr__(self):
        return "<%d %s>" % (self.status, self.body[:300])


class Daemon:
    def __init__(self, repo, args=(), env=None, port=None):
        self.repo = repo
        # no port given: tallyd binds port 0 and the harness reads the port
        # it got from its startup log line (no bind-close-rebind race)
        self.port = port
        self.fixed_port = port is not None
        self.args = list(args)
        self.env = dict(os.environ, **(env or {}))
        self.proc = None
        self.log_path = tempfile.mktemp(prefix="tallyd-log-")

    def start(self, wait_ready=True, timeout=30):
        timeout *= SLOW
        if not self.fixed_port:
            self.port = None
        listen = "127.0.0.1:%d" % (self.port if self.fixed_port else 0)
        cmd = [BIN, "--model-repository", self.repo, "--listen", listen]
        cmd += self.args
        # TALLYD_WRAPPER (e.g. "valgrind --leak-check=full"): run tallyd under it
        cmd = shlex.split(self.env.get("TALLYD_WRAPPER", "")) + cmd
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("tallyd exited with %s:\n%s" % (self.proc.returncode, self.logs()))
            if self.port is None:
                self.port = listening_port(self.proc.pid)
                if self.port is None:
                    time.sleep(0.02)
                    continue
            try:
                r = self.get("/v2/health/live", timeout=1)
                if r.status == 200:
                    if not wait_ready:
                        return self
                    r = self.get("/v2/health/ready", timeout=1)
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError("tallyd did not become ready:\n" + self.logs())

    def port_from_log(self, timeout=30):
        """The port a tallyd started with --listen 127.0.0.1:0 bound (from the
        kernel's socket table, whatever the log level)."""
        deadline = time.time() + timeout * SLOW
        while time.time() < deadline:
            port = listening_port(self.proc.pid) if self.proc else None
            if port:
                self.port = port
                return self.port
            if self.proc and self.proc.poll() is not None:
                break
            time.sleep(0.02)
        raise RuntimeError("tallyd logged no port:\n" + self.logs())

    def logs(self):
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode("utf-8", "replace")[-6000:]
        except OSError:
            return ""

    def stop(self, sig=signal.SIGTERM, timeout=30):
        timeout *= SLOW
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        rc = self.proc.returncode if self.proc else None
        if getattr(self, "log", None):
            self.log.close()
        return rc

    def request(self, method, path, body=None, headers=None, timeout=60):
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout * SLOW)
        h = dict(headers or {})
        if body is not None and not isinstance(body, (bytes, bytearray)):
            body = json.dumps(body).encode()
            h.setdefault("Content-Type", "application/json")
        try:
            c.request(method, path, body=body, headers=h)
            r = c.getresponse()
            return Response(r.status, r.getheaders(), r.read())
        finally:
            c.close()

    def get(self, path, **kw):
        return self.request("GET", path, **kw)

    def post(self, path, body=None, **kw):
        return self.request("POST", path, body if body is not None else {}, **kw)

    def infer(self, model, inputs, version=None, **extra):
        path = "/v2/models/%s%s/infer" % (model, "/versions/%s" % version if version else "")
        body = {"inputs": inputs}
        body.update(extra)
        return self.post(path, body)


def tensor(name, data, shape=None, datatype="FP32"):
    if shape is None:
        shape, d = [], data
        while isinstance(d, list):
            shape.append(len(d))
            d = d[0] if d else None
    return {"name": name, "shape": shape, "datatype": datatype, "data": data}


def output(resp, name):
    for o in resp.json()["outputs"]:
        if o["name"] == name:
            return o
    raise KeyError(name)


def make_repo():
    return tempfile.mkdtemp(prefix="tallyd-repo-")


def write_model(repo, name, config, tensors, version=1, version_info=None):
    mdir = os.path.join(repo, name)
    vdir = os.path.join(mdir, str(version))
    os.makedirs(vdir, exist_ok=True)
    with open(os.path.join(mdir, "config.json"), "w") as f:
        json.dump(config, f)
    if tensors is not None:
        st.save_lists(os.path.join(vdir, "model.safetensors"), tensors)
    if version_info is not None:
        with open(os.path.join(vdir, "version.json"), "w") as f:
            json.dump(version_info, f)
    return vdir


class Failure(AssertionError):
    pass


def check(cond, msg="check failed"):
    if not cond:
        raise Failure(msg)


def check_status(r, status, contains=None):
    if r.status != status:
        raise Failure("expected %d, got %d: %s" % (status, r.status, r.body[:400]))
    if status >= 400:
        try:
            j = r.json()
        except ValueError:
            raise Failure("error body is not JSON: %r" % r.body[:200])
        check(isinstance(j, dict) and isinstance(j.get("error"), str), "no 'error' string: %r" % j)
        if contains:
            check(contains.lower() in j["error"].lower(),
                  "error %r does not mention %r" % (j["error"], contains))
    return r


def close(a, b, rel=1e-5, abs_=1e-6):
    return abs(a - b) <= abs_ + rel * abs(b)


def run_tests(tests, setup=None, teardown=None):
    """tests: list of (name, fn). Prints per-test lines and the tally line.
    Names given on the command line run only those tests."""
    only = [a for a in sys.argv[1:] if not a.startswith("-")]
    if only:
        unknown = sorted(set(only) - {n for n, _ in tests})
        if unknown:
            sys.exit("no such test: %s" % ", ".join(unknown))
        tests = [(n, f) for n, f in tests if n in only]
    passed = failed = skipped = 0
    ctx = setup() if setup else None
    try:
        for name, fn in tests:
            t0 = time.time()
            try:
                fn(ctx) if setup else fn()
                passed += 1
                print("ok   %s (%.2fs)" % (name, time.time() - t0))
            except SkipTest as e:
                skipped += 1
                print("skip %s: %s" % (name, " ".join(str(e).split()) or "(no reason given)"))
            except Exception:
                failed += 1
                print("FAIL %s" % name)
                traceback.print_exc()
                if ctx is not None and hasattr(ctx, "daemon_logs"):
                    print(ctx.daemon_logs())
    finally:
        if teardown:
            teardown(ctx)
    print("tally: %d passed, %d failed, %d skipped" % (passed, failed, skipped))
    sys.exit(1 if failed else 0)


class SkipTest(Exception):
    pass


def collect(module_globals):
    return [(n, f) for n, f in sorted(module_globals.items(), key=lambda kv: kv[1].__code__.co_firstlineno
                                      if callable(kv[1]) and hasattr(kv[1], "__code__") else 0)
            if n.startswith("test_") and callable(f)]
