"""Replicas on one shared repository (the start of scale-out): several tallyd
processes serve the same repository, and fits sent to different replicas at
the same moment each publish a distinct, complete version: the version
number is claimed on disk by a rename that cannot replace (no two replicas
take the same number, none is lost, none half-written). A replica that
rescans (--repository-poll-secs) then serves the newest version."""
import json
import os
import shutil
import subprocess
import sys
import threading
import time

from harness import ROOT, Daemon, check, check_status, collect, make_repo, run_tests


EXAMPLES = os.path.join(ROOT, "deploy", "examples")


class Ctx:
    def __init__(self):
        self.repo = make_repo()
        subprocess.run([sys.executable, os.path.join(ROOT, "deploy", "gen_models.py"), self.repo],
                       check=True, stdout=subprocess.DEVNULL)
        self.ds = [Daemon(self.repo, ["--threads", "1", "--repository-poll-secs", "1"]).start()
                   for _ in range(3)]

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
    with open(os.path.join(EXAMPLES, "aware_labelled.json")) as f:
        body = json.load(f)
    body.setdefault("parameters", {})["epochs"] = 3
    results = [None] * len(c.ds)

    def fit(i):
        results[i] = c.ds[i].post("/v2/models/aware_ensemble/fit", body, timeout=120)

    ts = [threading.Thread(target=fit, args=(i,)) for i in range(len(c.ds))]
    for t in ts:
        t.start()
    for t in ts:
        t.join(180)
    versions = []
    for r in results:
        check_status(r, 200)
        versions.append(int(r.json()["model_version"]))
    check(sorted(versions) == [2, 3, 4], "versions %r: each fit must get its own" % versions)
    mdir = os.path.join(c.repo, "aware_ensemble")
    for v in versions:
        with open(os.path.join(mdir, str(v), "version.json")) as f:
            info = json.load(f)
        check(info["version"] == v and info["parent_version"] == 1, info)
        check(os.path.getsize(os.path.join(mdir, str(v), "model.safetensors")) > 0, v)
    check(not [n for n in os.listdir(mdir) if n.startswith(".tmp-")], os.listdir(mdir))
    # every replica serves the newest within a few poll periods
    deadline = time.time() + 15
    pending = set(range(len(c.ds)))
    while pending and time.time() < deadline:
        for i in list(pending):
            m = c.ds[i].get("/v2/models/aware_ensemble").json()
            if "4" in m.get("versions", []):
                pending.discard(i)
        time.sleep(0.2)
    check(not pending, "replicas %s do not serve version 4" % sorted(pending))


if __name__ == "__main__":
    run_tests(collect(globals()), setup, teardown)
