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
- Every replica serves a version fitted on another within PROPAGATE seconds
  of the fit's answer (inotify, no polling), stops serving a removed one as
  promptly, and loads a model copied into the repository; with
  --repository-watch poll it takes a poll period; with off, a SIGHUP.
"""
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

from harness import ROOT, Daemon, check, check_status, collect, make_repo, run_tests


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
                                  "--replica-id", "r%d" % i, "--fit-lock-lease-seconds", str(LEASE)])

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
        r = Daemon(c.repo, ["--repository-watch", "sometimes"]).start
        try:
            r()
            check(False, "--repository-watch sometimes was accepted")
        except RuntimeError as e:
            check("--repository-watch must be inotify, poll or off" in str(e), str(e))
    finally:
        polled.stop()
        off.stop()


def infer_body():
    with open(os.path.join(EXAMPLES, "aware_infer.json")) as f:
        return json.load(f)


def test_fit_on_another_replica_is_409_naming_holder(c):
    lock = os.path.join(c.repo, "aware_ensemble", LOCK)
    conn = start_long_fit(c.ds[0])
    try:
        wait_for(lambda: lock_holder(lock), 10, "the fit lock")
        held = lock_holder(lock)
        check(held["owner"] == "r0" and held["pid"] == c.ds[0].proc.pid, held)
        check(held["expires_ms"] > time.time() * 1000, held)
        for d in c.ds[1:]:
            r = d.post("/v2/models/aware_ensemble/fit", fit_body(3))
            check_status(r, 409, "replica 'r0'")
            r = d.post("/v2/models/aware_ensemble/calibrate", fit_body(3))
            check_status(r, 409, "replica 'r0'")
        # the holder itself refuses a second one as before
        check_status(c.ds[0].post("/v2/models/aware_ensemble/fit", fit_body(3)), 409)
        # other models are not blocked
        r = c.ds[1].post("/v2/models/quantile_demo/fit",
                         json.load(open(os.path.join(EXAMPLES, "quantile_fit.json"))))
        check(r.status != 409, r)
        # renewed: still held well past the lease
        time.sleep(LEASE * 1.5)
        check_status(c.ds[1].post("/v2/models/aware_ensemble/fit", fit_body(3)), 409, "'r0'")
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
        wait_for(lambda: (lock_holder(lock) or {}).get("owner") == "r2", 10, "r2's fit lock")
        victim.proc.kill()  # SIGKILL: no release, no renewal
        victim.proc.wait()
        t0 = time.time()
        check_status(c.ds[0].post("/v2/models/aware_ensemble/fit", fit_body(3)), 409, "'r2'")
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
