"""Replicas on one shared repository (scale-out, docs/deployment.md): several
tallyd processes serve the same repository.

- Fits sent to different replicas at the same moment end as distinct,
  complete versions or as 409s naming the replica that holds the model's fit
  lock (<model>/.fit-lock), never a lost or half-written version.
- A fit running on one replica makes a fit or calibration of the same model
  on another one a 409 naming the holder; the lock goes when the fit ends
  (here: its client hangs up and the fit is cancelled).
- A replica killed with SIGKILL while it holds the lock blocks the model only
  until its lease runs out (--fit-lock-lease-seconds 2 here): then a fit
  through another replica succeeds.
- Sessions: ids name their replica ("r1.<32 hex>"); another replica answers
  404 naming the holder. Behind nginx running deploy/nginx/tallyd.conf (as
  the current user, in a temporary prefix; skipped with the reason where
  nginx is absent or cannot run), a session fed 50 chunks equals one request
  over the same tokens, and concurrent fits through it end as distinct
  versions or 409s.
- Every replica serves a version fitted on another within PROPAGATE seconds
  of the fit's answer (inotify, no polling), stops serving a removed one as
  promptly, loads a model copied into the repository, and serves a learning
  candidate once its version.json says promoted (never before); with
  --repository-watch poll it takes a poll period; with off, a SIGHUP.
"""
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

from harness import (BIN, ROOT, Daemon, Response, SkipTest, check, check_status, collect, free_port,
                     make_repo, output, run_tests)


EXAMPLES = os.path.join(ROOT, "deploy", "examples")
LEASE = 2  # seconds: --fit-lock-lease-seconds of every replica here
LOCK = ".fit-lock"
PROPAGATE = 1.0 * (3 if os.environ.get("TALLYD_SANITIZED") else 1)  # seconds, stated in the docs


def fit_body(epochs, patience=None):
    with open(os.path.join(EXAMPLES, "aware_labelled.json")) as f:
        body = json.load(f)
    body["parameters"]["epochs"] = epochs
    if patience is not None:
        body["parameters"].update(patience=patience, batch_size=8)
    return body


def start_long_fit(d, model="aware_ensemble"):
    """Sends a fit of a million epochs (many seconds) to d and returns its
    connection once the fit holds the model's lock; closing it cancels the fit."""
    c = http.client.HTTPConnection("127.0.0.1", d.port, timeout=120)
    c.request("POST", "/v2/models/%s/fit" % model, body=json.dumps(fit_body(1000000, 1000000)),
              headers={"Content-Type": "application/json"})
    return c


def lock_holder(path):
    """The fit lock's contents, or None while there is none or it is being
    written (it is created empty with O_EXCL, then filled)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def wait_for(cond, secs, what):
    deadline = time.time() + secs
    while time.time() < deadline:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError("timed out after %.1f s waiting for %s" % (secs, what))


class Ctx:
    def __init__(self):
        self.repo = make_repo()
        subprocess.run([sys.executable, os.path.join(ROOT, "deploy", "gen_models.py"), self.repo],
                       check=True, stdout=subprocess.DEVNULL)
        self.ds = [self.replica(i).start() for i in range(3)]

    def replica(self, i):
        # no polling: the replicas learn of changes from inotify alone
        return Daemon(self.repo, ["--threads", "1", "--repository-poll-secs", "0",
                                  "--replica-id", "r%d" % (i + 1), "--fit-lock-lease-seconds", str(LEASE)])

    def daemon_logs(self):
        return "\n".join(d.logs() for d in self.ds)


def setup():
    return Ctx()


def teardown(c):
    if c is not None:
        for d in c.ds:
            d.stop()
        shutil.rmtree(c.repo, ignore_errors=True)


def test_concurrent_fits_on_replicas_make_distinct_versions(c):
    mdir = os.path.join(c.repo, "aware_ensemble")
    before = set(os.listdir(mdir))
    body = fit_body(20000, 1000000)  # a few tenths of a second: the fits overlap
    results = [None] * len(c.ds)

    def fit(i):
        results[i] = c.ds[i].post("/v2/models/aware_ensemble/fit", body, timeout=120)

    ts = [threading.Thread(target=fit, args=(i,)) for i in range(len(c.ds))]
    for t in ts:
        t.start()
    for t in ts:
        t.join(180)
    versions = []
    for i, r in enumerate(results):
        check(r is not None and r.status in (200, 409), "replica %d: %r" % (i, r))
        if r.status == 409:
            msg = r.json()["error"]
            check("another replica" in msg or "already running" in msg, msg)
        else:
            versions.append(int(r.json()["model_version"]))
    check(versions, "no fit succeeded: %r" % results)
    check(len(set(versions)) == len(versions), "versions %r: each fit must get its own" % versions)
    for v in versions:
        with open(os.path.join(mdir, str(v), "version.json")) as f:
            info = json.load(f)
        check(info["version"] == v and info["parent_version"] == 1, info)
        check(os.path.getsize(os.path.join(mdir, str(v), "model.safetensors")) > 0, v)
    new = set(os.listdir(mdir)) - before
    check(new == {str(v) for v in versions}, "left in the model directory: %r" % sorted(new))
    # every replica serves the newest within a few poll periods
    newest = str(max(versions))
    pending = set(range(len(c.ds)))

    def all_serve():
        for i in list(pending):
            if newest in c.ds[i].get("/v2/models/aware_ensemble").json().get("versions", []):
                pending.discard(i)
        return not pending
    wait_for(all_serve, PROPAGATE + 1, "every replica to serve version %s (left: %s)" % (newest, pending))


def serves(d, model, version):
    r = d.get("/v2/models/%s" % model)
    return r.status == 200 and str(version) in r.json().get("versions", [])


def test_new_version_reaches_every_replica_within_a_second(c):
    r = check_status(c.ds[1].post("/v2/models/aware_ensemble/fit", fit_body(3)), 200)
    t0 = time.time()
    v = r.json()["model_version"]
    wait_for(lambda: all(serves(d, "aware_ensemble", v) for d in c.ds), PROPAGATE,
             "every replica to serve version %s" % v)
    took = time.time() - t0
    # infer through each one answers from the new version
    for d in c.ds:
        r = check_status(d.post("/v2/models/aware_ensemble/infer", infer_body()), 200)
        check(r.json()["model_version"] == v, r.json())
    print("  version %s on all 3 replicas %.3f s after the fit's answer" % (v, took))
    # a removed version leaves every replica as promptly (policy: the newest)
    shutil.rmtree(os.path.join(c.repo, "aware_ensemble", v))
    wait_for(lambda: not any(serves(d, "aware_ensemble", v) for d in c.ds), PROPAGATE,
             "every replica to drop version %s" % v)
    # a model copied into the repository is loaded everywhere
    src = os.path.join(c.repo, "demo_mlp")
    tmp = os.path.join(c.repo, ".copying")
    shutil.copytree(src, tmp)
    os.rename(tmp, os.path.join(c.repo, "demo_mlp_copy"))
    wait_for(lambda: all(serves(d, "demo_mlp_copy", 1) for d in c.ds), PROPAGATE,
             "every replica to load demo_mlp_copy")
    shutil.rmtree(os.path.join(c.repo, "demo_mlp_copy"))
    wait_for(lambda: all(d.get("/v2/models/demo_mlp_copy/ready").status != 200 for d in c.ds),
             PROPAGATE, "every replica to drop demo_mlp_copy")


def test_candidate_promotion_reaches_every_replica(c):
    """A candidate (a version whose version.json says "candidate": pending,
    as the learning loop saves a refit) is served by no replica; once its
    version.json is rewritten as promoted (by rename, as repo.c does), every
    replica serves it within PROPAGATE seconds."""
    mdir = os.path.join(c.repo, "aware_ensemble")
    nums = sorted(int(n) for n in os.listdir(mdir) if n.isdigit())
    src, n = os.path.join(mdir, str(nums[-1])), nums[-1] + 1
    tmp = os.path.join(mdir, ".tmp-candidate")
    shutil.copytree(src, tmp)

    def write_info(d, state):
        with open(os.path.join(d, "version.json")) as f:
            info = json.load(f)
        info.update(version=n, candidate={"state": state})
        with open(os.path.join(d, ".version.json.new"), "w") as f:
            json.dump(info, f)
        os.replace(os.path.join(d, ".version.json.new"), os.path.join(d, "version.json"))
    write_info(tmp, "pending")
    os.rename(tmp, os.path.join(mdir, str(n)))
    time.sleep(PROPAGATE)
    check(not any(serves(d, "aware_ensemble", n) for d in c.ds), "a pending candidate is served")
    t0 = time.time()
    write_info(os.path.join(mdir, str(n)), "promoted")
    wait_for(lambda: all(serves(d, "aware_ensemble", n) for d in c.ds), PROPAGATE,
             "every replica to serve the promoted candidate %d" % n)
    print("  promoted candidate %d on all 3 replicas after %.3f s" % (n, time.time() - t0))


def test_poll_and_off_modes(c):
    polled = Daemon(c.repo, ["--threads", "1", "--repository-watch", "poll",
                             "--repository-poll-secs", "1", "--replica-id", "polled"]).start()
    off = Daemon(c.repo, ["--threads", "1", "--repository-watch", "off",
                          "--replica-id", "off"]).start()
    try:
        r = check_status(c.ds[0].post("/v2/models/aware_ensemble/fit", fit_body(3)), 200)
        v = r.json()["model_version"]
        wait_for(lambda: serves(polled, "aware_ensemble", v), 2.5, "the polling replica")
        time.sleep(1.0)
        check(not serves(off, "aware_ensemble", v), "--repository-watch off noticed a change")
        off.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: serves(off, "aware_ensemble", v), 5, "the SIGHUP rescan")
    finally:
        polled.stop()
        off.stop()


def test_flag_refusals(c):
    for args, msg in ((["--replica-id", "a.b"], "--replica-id 'a.b'"),
                      (["--replica-id", "x" * 49], "1-48 letters"),
                      (["--replica-id", ""], "--replica-id"),
                      (["--fit-lock-lease-seconds", "-1"], "--fit-lock-lease-seconds"),
                      (["--repository-watch", "sometimes"], "must be inotify, poll or off")):
        p = subprocess.run([BIN, "--model-repository", c.repo, "--listen", "127.0.0.1:0"] + args,
                           capture_output=True, text=True, timeout=30)
        check(p.returncode == 2 and msg in p.stderr, (args, p.returncode, p.stderr[-300:]))
    # lease 0: no lock file, one fit per model per process only
    d = Daemon(c.repo, ["--threads", "1", "--fit-lock-lease-seconds", "0",
                        "--repository-watch", "off", "--replica-id", "nolock"]).start()
    try:
        conn = start_long_fit(d)
        try:
            time.sleep(0.5)
            check(not os.path.exists(os.path.join(c.repo, "aware_ensemble", LOCK)), "a lock file")
            check_status(d.post("/v2/models/aware_ensemble/fit", fit_body(3)), 409, "already running")
        finally:
            conn.close()
    finally:
        d.stop()


def feed(d, sid, ids, model="tiny_gpt2"):
    return d.post("/v2/models/%s/sessions/%s/infer" % (model, sid),
                  {"inputs": [{"name": "input_ids", "shape": [1, len(ids)], "datatype": "INT64",
                               "data": ids}]})


def test_session_on_another_replica_is_404_naming_holder(c):
    r = check_status(c.ds[0].post("/v2/models/tiny_gpt2/sessions", {}), 201)
    sid = r.json()["session_id"]
    check(re.fullmatch(r"r1\.[0-9a-f]{32}", sid), sid)
    check_status(feed(c.ds[0], sid, [1, 2, 3]), 200)
    for d in c.ds[1:]:
        check_status(d.get("/v2/models/tiny_gpt2/sessions/" + sid), 404, "held by replica 'r1'")
        check_status(feed(d, sid, [4]), 404, "held by replica 'r1'")
        check_status(d.request("DELETE", "/v2/models/tiny_gpt2/sessions/" + sid), 404, "'r1'")
    # not a silent new session: the holder still has it where it was
    check(check_status(c.ds[0].get("/v2/models/tiny_gpt2/sessions/" + sid), 200)
          .json()["position"] == 3)
    # an id of this replica that is gone says so, without blaming another
    check_status(c.ds[1].get("/v2/models/tiny_gpt2/sessions/r2." + "0" * 32), 404, "unknown session")
    check_status(c.ds[0].request("DELETE", "/v2/models/tiny_gpt2/sessions/" + sid), 200)
    # session ids from different replicas (processes) never collide
    ids = {check_status(d.post("/v2/models/tiny_gpt2/sessions", {}), 201).json()["session_id"]
           for d in c.ds for _ in range(3)}
    check(len(ids) == 9, ids)


class Balancer:
    """nginx running deploy/nginx/tallyd.conf in front of c.ds, as the
    current user: a temporary prefix, its own error log and pid file,
    `daemon off`. SkipTest (with the reason) where nginx is absent or cannot
    run here."""

    def __init__(self, ds):
        exe = shutil.which("nginx") or next(
            (p for p in ("/usr/sbin/nginx", "/sbin/nginx") if os.path.exists(p)), None)
        if exe is None:
            raise SkipTest("nginx is not installed (deploy/deps.sh test installs Debian's nginx)")
        self.tmp = tempfile.mkdtemp(prefix="tallyd-nginx-")
        with open(os.path.join(ROOT, "deploy", "nginx", "tallyd.conf")) as f:
            conf = f.read()
        for i, d in enumerate(ds):
            want = "127.0.0.1:800%d" % (i + 1)
            check(want in conf, "deploy/nginx/tallyd.conf lost %s" % want)
            conf = conf.replace(want, "127.0.0.1:%d" % d.port)
        self.port = free_port()
        check("listen 127.0.0.1:8000;" in conf, "deploy/nginx/tallyd.conf: listen changed")
        conf = conf.replace("listen 127.0.0.1:8000;", "listen 127.0.0.1:%d;" % self.port)
        with open(os.path.join(self.tmp, "tallyd.conf"), "w") as f:
            f.write(conf)
        t = self.tmp
        temps = "".join("    %s_temp_path %s/%s;\n" % (k, t, k)
                        for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        with open(os.path.join(t, "nginx.conf"), "w") as f:
            f.write("%sworker_processes 1;\npid %s/nginx.pid;\nerror_log %s/error.log warn;\n"
                    "events { worker_connections 1024; }\nhttp {\n    access_log off;\n%s"
                    "    include %s/tallyd.conf;\n}\n"
                    % ("user root;\n" if os.geteuid() == 0 else "", t, t, temps, t))
        self.stderr = open(os.path.join(t, "stderr"), "wb")
        self.proc = subprocess.Popen([exe, "-p", t, "-e", t + "/error.log", "-c", t + "/nginx.conf",
                                      "-g", "daemon off;"], stdout=subprocess.DEVNULL,
                                     stderr=self.stderr)
        deadline = time.time() + 10
        while time.time() < deadline:
            if self.proc.poll() is not None:
                why = self.errors()
                self.stop()
                raise SkipTest("nginx cannot run here: %s" % why)
            try:
                if self.get("/v2/health/ready").status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        why = self.errors()
        self.stop()
        raise AssertionError("nginx did not answer: %s" % why)

    def errors(self):
        out = []
        for n in ("stderr", "error.log"):
            try:
                with open(os.path.join(self.tmp, n), errors="replace") as f:
                    out.append(f.read()[-1500:])
            except OSError:
                pass
        return " ".join(" ".join(out).split())

    def request(self, method, path, body=None, timeout=120):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        h = {}
        if body is not None and not isinstance(body, bytes):
            body = json.dumps(body).encode()
            h["Content-Type"] = "application/json"
        try:
            conn.request(method, path, body=body, headers=h)
            r = conn.getresponse()
            return Response(r.status, r.getheaders(), r.read())
        finally:
            conn.close()

    def get(self, path):
        return self.request("GET", path)

    def post(self, path, body=None, timeout=120):
        return self.request("POST", path, body, timeout)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.stderr.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def test_session_through_the_balancer_equals_one_request(c):
    lb = Balancer(c.ds)
    try:
        seq = [(i * 37 + 11) % 256 for i in range(100)]
        r = check_status(lb.post("/v2/models/tiny_gpt2/sessions", {}), 201)
        sid = r.json()["session_id"]
        holder = sid.partition(".")[0]
        check(holder in ("r1", "r2", "r3"), sid)
        lps = []
        for k in range(50):  # 50 chunks of 2 tokens, each on a new connection
            r = check_status(lb.post("/v2/models/tiny_gpt2/sessions/%s/infer" % sid, {
                "inputs": [{"name": "input_ids", "shape": [1, 2], "datatype": "INT64",
                            "data": seq[2 * k:2 * k + 2]}]}), 200)
            lps += output(r, "token_logprobs")["data"]
            check(r.json()["parameters"]["position"] == 2 * k + 2, r.json().get("parameters"))
        whole = check_status(lb.post("/v2/models/tiny_gpt2/infer", {
            "inputs": [{"name": "input_ids", "shape": [1, 100], "datatype": "INT64",
                        "data": seq}]}), 200)
        want = output(whole, "token_logprobs")["data"]
        check(len(lps) == len(want) == 99, (len(lps), len(want)))
        worst = max(abs(a - b) / max(1.0, abs(b)) for a, b in zip(lps, want))
        check(worst <= 1e-5, "chunked through the balancer differs from one request by %g" % worst)
        check(check_status(lb.get("/v2/models/tiny_gpt2/sessions/" + sid), 200)
              .json()["position"] == 100)
        # the other replicas were never asked: they do not have it
        for i, d in enumerate(c.ds):
            if "r%d" % (i + 1) != holder:
                check_status(d.get("/v2/models/tiny_gpt2/sessions/" + sid), 404, holder)
        # an id naming a replica the balancer does not know reaches some
        # replica, which says who holds it
        check_status(lb.get("/v2/models/tiny_gpt2/sessions/r9." + "0" * 32), 404,
                     "held by replica 'r9'")
        check_status(lb.request("DELETE", "/v2/models/tiny_gpt2/sessions/" + sid), 200)
    finally:
        lb.stop()


def test_concurrent_fits_through_the_balancer(c):
    lb = Balancer(c.ds)
    try:
        mdir = os.path.join(c.repo, "aware_ensemble")
        before = set(os.listdir(mdir))
        results = [None] * 6
        body = fit_body(20000, 1000000)

        def fit(i):
            results[i] = lb.post("/v2/models/aware_ensemble/fit", body)
        ts = [threading.Thread(target=fit, args=(i,)) for i in range(len(results))]
        for t in ts:
            t.start()
        for t in ts:
            t.join(180)
        versions = []
        for r in results:
            check(r is not None and r.status in (200, 409), r)
            if r.status == 200:
                versions.append(int(r.json()["model_version"]))
            else:
                check("already running" in r.json()["error"], r.json())
        check(versions and len(set(versions)) == len(versions), versions)
        new = set(os.listdir(mdir)) - before
        check(new == {str(v) for v in versions}, (sorted(new), versions))
        newest = str(max(versions))
        wait_for(lambda: all(serves(d, "aware_ensemble", newest) for d in c.ds), PROPAGATE,
                 "every replica to serve %s" % newest)
        # and an infer through the balancer, whichever replica answers
        r = check_status(lb.post("/v2/models/aware_ensemble/infer", infer_body()), 200)
        check(r.json()["model_version"] == newest, r.json())
    finally:
        lb.stop()


def infer_body():
    with open(os.path.join(EXAMPLES, "aware_infer.json")) as f:
        return json.load(f)


def test_fit_on_another_replica_is_409_naming_holder(c):
    lock = os.path.join(c.repo, "aware_ensemble", LOCK)
    conn = start_long_fit(c.ds[0])
    try:
        wait_for(lambda: lock_holder(lock), 10, "the fit lock")
        held = lock_holder(lock)
        check(held["owner"] == "r1" and held["pid"] == c.ds[0].proc.pid, held)
        check(held["expires_ms"] > time.time() * 1000, held)
        for d in c.ds[1:]:
            r = d.post("/v2/models/aware_ensemble/fit", fit_body(3))
            check_status(r, 409, "replica 'r1'")
            r = d.post("/v2/models/aware_ensemble/calibrate", fit_body(3))
            check_status(r, 409, "replica 'r1'")
        # the holder itself refuses a second one as before
        check_status(c.ds[0].post("/v2/models/aware_ensemble/fit", fit_body(3)), 409)
        # other models are not blocked
        r = c.ds[1].post("/v2/models/quantile_demo/fit",
                         json.load(open(os.path.join(EXAMPLES, "quantile_fit.json"))))
        check(r.status != 409, r)
        # renewed: still held well past the lease
        time.sleep(LEASE * 1.5)
        check_status(c.ds[1].post("/v2/models/aware_ensemble/fit", fit_body(3)), 409, "'r1'")
    finally:
        conn.close()  # the fit is cancelled between epochs and its lock released
    wait_for(lambda: not os.path.exists(lock), 10, "the lock to go with the cancelled fit")
    check_status(c.ds[1].post("/v2/models/aware_ensemble/fit", fit_body(3)), 200)
    check(not os.path.exists(lock), "the lock outlived a finished fit")


def test_killed_holder_blocks_only_for_the_lease(c):
    lock = os.path.join(c.repo, "aware_ensemble", LOCK)
    victim = c.ds[2]
    conn = start_long_fit(victim)
    try:
        wait_for(lambda: (lock_holder(lock) or {}).get("owner") == "r3", 10, "r3's fit lock")
        victim.proc.kill()  # SIGKILL: no release, no renewal
        victim.proc.wait()
        t0 = time.time()
        check_status(c.ds[0].post("/v2/models/aware_ensemble/fit", fit_body(3)), 409, "'r3'")
        r = None
        while time.time() - t0 < LEASE + 5:
            r = c.ds[0].post("/v2/models/aware_ensemble/fit", fit_body(3))
            if r.status != 409:
                break
            time.sleep(0.1)
        check_status(r, 200)
        waited = time.time() - t0
        check(waited <= LEASE + 1.5, "blocked %.1f s with a lease of %d s" % (waited, LEASE))
        v = r.json()["model_version"]
        with open(os.path.join(c.repo, "aware_ensemble", v, "version.json")) as f:
            check(json.load(f)["version"] == int(v))
        check(not os.path.exists(lock), "the lock outlived the fit that took it over")
    finally:
        conn.close()
        victim.stop()
        c.ds[2] = c.replica(2).start()


if __name__ == "__main__":
    run_tests(collect(globals()), setup, teardown)
