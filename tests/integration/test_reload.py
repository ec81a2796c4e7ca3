"""Hot reload under load: while threads hammer infer over keep-alive
connections, the repository changes on disk (version 2 added, version 2's
weights replaced, version 1 removed, a broken version 3 added) and the daemon
rescans, once at SIGHUP and once by --repository-poll-secs. Not one request
may fail, every answer must match the weights of the version it names, and
the served version and answers must follow the disk."""
import http.client
import json
import os
import shutil
import signal
import threading
import time

from harness import Daemon, check, check_status, collect, make_repo, run_tests, st, tensor

CFG = {"kind": "mlp", "activations": ["relu", "none"]}
X = [[1, 2, 3]]


def weights(bias):
    """The hand-checked mlp with output bias `bias`: answer -4 + bias at X."""
    return {
        "layers.0.weight": ("F32", [2, 3], [1, 0, -1, 0.5, 0.5, 0.5]),
        "layers.0.bias": ("F32", [2], [0, 1]),
        "layers.1.weight": ("F32", [1, 2], [1, -1]),
        "layers.1.bias": ("F32", [1], [bias]),
    }


def put_version(repo, version, bias):
    """Writes a version the way a deployment should: into a temporary
    directory, renamed into place (a version never appears half-written)."""
    mdir = os.path.join(repo, "m")
    # staged outside the model directory: the daemon's rescan removes
    # leftover temporary directories inside it
    tmp = os.path.join(repo, ".staging-%d" % version)
    os.makedirs(tmp, exist_ok=True)
    st.save_lists(os.path.join(tmp, "model.safetensors"), weights(bias))
    os.rename(tmp, os.path.join(mdir, str(version)))


def replace_weights(repo, version, bias):
    vdir = os.path.join(repo, "m", str(version))
    tmp = os.path.join(repo, ".staging-weights")
    st.save_lists(tmp, weights(bias))
    os.rename(tmp, os.path.join(vdir, "model.safetensors"))


class Load:
    """Threads sending infer on keep-alive connections; every answer is
    checked against the biases known for its version at any time."""

    def __init__(self, port, threads=3):
        self.port = port
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.ok = 0
        self.failures = []
        self.allowed = {}   # version -> set of answers seen on disk so far
        self.last = None    # (version, answer) of the latest answer
        self.threads = [threading.Thread(target=self.run) for _ in range(threads)]

    def allow(self, version, bias):
        with self.lock:
            self.allowed.setdefault(version, set()).add(-4 + bias)

    def run(self):
        body = json.dumps({"inputs": [tensor("features", X)]})
        conn = None
        while not self.stop.is_set():
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
                conn.request("POST", "/v2/models/m/infer", body=body,
                             headers={"Content-Type": "application/json"})
                r = conn.getresponse()
                data = r.read()
                if r.status != 200:
                    raise RuntimeError("status %d: %s" % (r.status, data[:200]))
                j = json.loads(data)
                v, y = int(j["model_version"]), j["outputs"][0]["data"][0]
                with self.lock:
                    if y not in self.allowed.get(v, ()):
                        self.failures.append("version %d answered %r (allowed %r)" %
                                             (v, y, self.allowed.get(v)))
                    self.ok += 1
                    self.last = (v, y)
                if r.getheader("Connection", "").lower() == "close":
                    conn.close()
                    conn = None
            except Exception as e:  # every failure counts, none is retried
                with self.lock:
                    self.failures.append(repr(e))
                if conn:
                    conn.close()
                conn = None
        if conn:
            conn.close()

    def start(self):
        for t in self.threads:
            t.start()
        return self

    def join(self):
        self.stop.set()
        for t in self.threads:
            t.join(60)

    def wait_answer(self, version, answer, timeout=15):
        end = time.time() + timeout
        n0 = self.ok
        while time.time() < end:
            with self.lock:
                if self.last == (version, answer) and self.ok > n0:
                    return
            time.sleep(0.02)
        raise AssertionError("the daemon did not come to serve version %d answering %r (last %r; "
                             "failures %r)" % (version, answer, self.last, self.failures[:3]))


def scenario(d, repo, rescan):
    """The four changes, each followed by a rescan; returns the load."""
    load = Load(d.port)
    load.allow(1, 0.5)
    load.start()
    try:
        time.sleep(0.3)
        load.wait_answer(1, -3.5)
        # 1. a new version: served once loaded, version 1 retired
        load.allow(2, 1.5)
        put_version(repo, 2, 1.5)
        rescan()
        load.wait_answer(2, -2.5)
        # 2. version 2's weights replaced in place
        load.allow(2, 2.5)
        replace_weights(repo, 2, 2.5)
        rescan()
        load.wait_answer(2, -1.5)
        # 3. version 1 removed from disk (already retired: nothing changes)
        shutil.rmtree(os.path.join(repo, "m", "1"))
        rescan()
        # 4. a broken version 3: version 2 keeps serving; the index says why
        os.makedirs(os.path.join(repo, ".staging-3"))
        with open(os.path.join(repo, ".staging-3", "model.safetensors"), "wb") as f:
            f.write(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
        os.rename(os.path.join(repo, ".staging-3"), os.path.join(repo, "m", "3"))
        rescan()
        deadline = time.time() + 15
        while time.time() < deadline:
            idx = check_status(d.post("/v2/repository/index", {}), 200).json()
            v3 = [e for e in idx if e["name"] == "m" and str(e.get("version")) == "3"]
            if v3 and v3[0]["state"] == "UNAVAILABLE":
                break
            time.sleep(0.05)
        check(v3 and v3[0]["reason"], "version 3's failure is not in the index: %r" % idx)
        time.sleep(0.3)
        load.wait_answer(2, -1.5)
    finally:
        load.join()
    check(not load.failures, "%d of %d requests failed: %s" % (len(load.failures),
          load.ok + len(load.failures), load.failures[:5]))
    check(load.ok > 50, "only %d requests were made" % load.ok)
    check_status(d.get("/v2/models/m/versions/1"), 404)
    r = check_status(d.get("/v2/models/m/ready"), 200)
    check(r.json()["ready"] is True)
    return load


def fresh_repo():
    repo = make_repo()
    os.makedirs(os.path.join(repo, "m"))
    with open(os.path.join(repo, "m", "config.json"), "w") as f:
        json.dump(CFG, f)
    put_version(repo, 1, 0.5)
    return repo


class Ctx:
    def __init__(self):
        self.daemons = []
        self.repos = []

    def daemon_logs(self):
        return "".join(d.logs() for d in self.daemons)


def test_reload_on_sighup(c):
    repo = fresh_repo()
    c.repos.append(repo)
    d = Daemon(repo, ["--threads", "2"]).start()
    c.daemons.append(d)
    try:
        scenario(d, repo, lambda: d.proc.send_signal(signal.SIGHUP))
        with open(d.log_path, "rb") as f:
            # two signals sent back to back may arrive as one (POSIX)
            check(3 <= f.read().count(b"SIGHUP: rescanning") <= 4)
        # a clean exit: under the sanitizers, a leaked version would fail it
        check(d.stop() == 0, "exit status")
    finally:
        d.stop()


def test_reload_by_polling(c):
    repo = fresh_repo()
    c.repos.append(repo)
    d = Daemon(repo, ["--threads", "2", "--repository-poll-secs", "1"]).start()
    c.daemons.append(d)
    try:
        scenario(d, repo, lambda: None)  # no signal: the poll timer finds each change
        with open(d.log_path, "rb") as f:
            check(b"SIGHUP" not in f.read())
        check(d.stop() == 0, "exit status")
    finally:
        d.stop()


def test_sighup_storm(c):
    # many SIGHUPs at once: rescans never run two at a time and never pile up
    repo = fresh_repo()
    c.repos.append(repo)
    d = Daemon(repo, ["--threads", "2", "--queue-depth", "4"]).start()
    c.daemons.append(d)
    try:
        for _ in range(50):
            d.proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        check("queue is full" not in d.logs(), d.logs()[-1000:])
        put_version(repo, 2, 1.5)
        d.proc.send_signal(signal.SIGHUP)
        end = time.time() + 10
        while time.time() < end:
            r = d.infer("m", [tensor("features", X)])
            if r.status == 200 and r.json()["model_version"] == "2":
                break
            time.sleep(0.05)
        check(r.json()["outputs"][0]["data"] == [-2.5], r)
        check(d.proc.poll() is None)
        check(d.stop() == 0, "exit status")
    finally:
        d.stop()


def setup():
    return Ctx()


def teardown(c):
    for d in c.daemons:
        d.stop()
    for r in c.repos:
        shutil.rmtree(r, ignore_errors=True)


if __name__ == "__main__":
    run_tests(collect(globals()), setup, teardown)
