"""Fits that diverge, over real HTTP: fits that
diverge (a learning rate far too large) must be refused with a 400 before any
version is written, and the served version must keep answering with finite
numbers. Standard library only."""
import math
import os
import random
import threading
import time

from harness import (Daemon, check, check_status, collect, make_repo, output, run_tests, tensor,
                     write_model)

L3 = [0.25, 0.5, 0.75]


class Ctx:
    pass


def setup():
    c = Ctx()
    c.repo = make_repo()
    # two external quantile bases, a local aggregator over 2 features
    write_model(c.repo, "q_local", {
        "kind": "quantile_ensemble", "levels": L3,
        "bases": [{"external": "e0"}, {"external": "e1"}], "features": 2,
        "aggregator": {"granularity": "coarse", "scope": "local", "simplex": True,
                       "hidden": 4, "depth": 2},
        "monotone": "sort"}, {})
    write_model(c.repo, "q_global", {
        "kind": "quantile_ensemble", "levels": L3,
        "bases": [{"external": "e0"}, {"external": "e1"}],
        "aggregator": {"granularity": "medium", "scope": "global", "simplex": False},
        "monotone": "none"}, {})
    write_model(c.repo, "ens_unload", {
        "kind": "ensemble", "member_output": "logit",
        "families": [{"name": "a", "members": [{"external": "a1"}]},
                     {"name": "b", "members": [{"external": "b1"}]}]}, None)
    write_model(c.repo, "ens", {
        "kind": "ensemble", "member_output": "logit",
        "families": [{"name": "a", "members": [{"external": "a1"}]},
                     {"name": "b", "members": [{"external": "b1"}]}]}, None)
    c.d = Daemon(c.repo).start()
    c.daemon_logs = c.d.logs
    return c


def teardown(c):
    c.d.stop()


def qdata(rng, B=40):
    z, x, y = [], [], []
    for _ in range(B):
        f = [rng.uniform(-1, 1), rng.uniform(-1, 1)]
        mu = f[0] + 0.5 * f[1]
        z.append([sorted(mu + rng.gauss(0, 0.3) for _ in L3) for _ in range(2)])
        x.append(f)
        y.append(mu + rng.gauss(0, 0.3))
    return [tensor("base_quantiles", [v for r in z for b in r for v in b], [B, 2, 3]),
            tensor("features", [v for r in x for v in r], [B, 2]),
            tensor("targets", y, [B])]


def versions(c, model):
    return sorted(int(n) for n in os.listdir(os.path.join(c.repo, model)) if n.isdigit())


def assert_serves_finite(c, model, inputs):
    r = check_status(c.d.post("/v2/models/%s/infer" % model, {"inputs": inputs}), 200)
    q = output(r, "quantiles")["data"]
    check(all(isinstance(v, float) and math.isfinite(v) for v in q), "non-finite output %r" % q)


def test_quantile_diverged_fit_is_refused(c):
    rng = random.Random(1)
    data = qdata(rng)
    for model in ("q_local", "q_global"):
        refused = 0
        for lr in (1e30, 1e300):
            before = versions(c, model)
            r = c.d.post("/v2/models/%s/fit" % model,
                         {"parameters": {"epochs": 3, "learning_rate": lr}, "inputs": data})
            # early stopping may keep the initial weights (200); otherwise the
            # fit diverged and must be refused before a version is written
            if r.status == 200:
                check(math.isfinite(r.json()["metrics"]["after"]["pinball"]), r.json()["metrics"])
            else:
                check_status(r, 400, "diverged")
                refused += 1
                check(versions(c, model) == before,
                      "%s lr=%g: a version was written: %r" % (model, lr, versions(c, model)))
            assert_serves_finite(c, model, data[:2] if model == "q_local" else data[:1])
        check(refused >= 1, "%s: no fit was refused as diverged" % model)
        # a sane fit still works and is served
        r = check_status(c.d.post("/v2/models/%s/fit" % model,
                                  {"parameters": {"epochs": 3}, "inputs": data}), 200)
        check(math.isfinite(r.json()["metrics"]["after"]["pinball"]), r.json()["metrics"])
        assert_serves_finite(c, model, data[:2] if model == "q_local" else data[:1])


def test_quantile_oversized_local_network_is_400(c):
    """hidden and depth within their own bounds can still ask for billions of
    parameters: refused by name, never attempted (a fit touches them all)."""
    data = qdata(random.Random(4), B=4)
    before = versions(c, "q_local")
    # (only a size no machine can allocate: a regression must not eat the CI's memory)
    for agg in ({"granularity": "coarse", "scope": "local", "hidden": 65536, "depth": 8},):
        r = c.d.post("/v2/models/q_local/fit",
                     {"parameters": {"epochs": 1, "aggregator": agg}, "inputs": data})
        check_status(r, 400, "parameters")
    check(versions(c, "q_local") == before, versions(c, "q_local"))


def test_quantile_fit_stops_at_its_deadline(c):
    """A fit past its deadline is answered 504 by the server; the worker must
    stop too (between epochs), releasing the model's fit claim, instead of
    running all its epochs while every later fit gets 409."""
    data = qdata(random.Random(5), B=400)
    r = c.d.post("/v2/models/q_global/fit",
                 {"parameters": {"epochs": 1000000, "batch_size": 1, "patience": 0,
                                 "timeout_ms": 300},
                  "inputs": data})
    check_status(r, 504)
    t0 = time.time()
    while True:
        r = c.d.post("/v2/models/q_global/fit", {"parameters": {"epochs": 1}, "inputs": data})
        if r.status != 409:
            break
        check(time.time() - t0 < 10, "the abandoned fit still holds the model after 10 s")
        time.sleep(0.05)
    check_status(r, 200)


def test_ensemble_diverged_fit_is_refused(c):
    rng = random.Random(2)
    B = 100
    lab = [rng.randint(0, 1) for _ in range(B)]
    mo = [[(2 * l - 1) * 2 + rng.gauss(0, 1), rng.gauss(0, 1)] for l in lab]
    body = {"parameters": {"epochs": 5, "learning_rate": 1e300, "validation_fraction": 0},
            "inputs": [tensor("member_outputs", mo, [B, 2]), tensor("labels", lab, [B], "INT32")]}
    check_status(c.d.post("/v2/models/ens/fit", body), 400, "diverged")
    check(versions(c, "ens") == [1], versions(c, "ens"))


def test_unload_during_fit_stays_unloaded(c):
    """A model unloaded while its fit runs must not come back when the fit
    commits its version: the version is saved and serves at the next load."""
    rng = random.Random(3)
    B = 20000
    lab = [rng.randint(0, 1) for _ in range(B)]
    mo = [[(2 * l - 1) + rng.gauss(0, 1), rng.gauss(0, 1)] for l in lab]
    body = {"parameters": {"epochs": 3000, "patience": 0, "batch_size": 16},
            "inputs": [tensor("member_outputs", mo, [B, 2]), tensor("labels", lab, [B], "INT32")]}
    res = {}

    def long_fit():
        for _ in range(100):  # the probe below may hold the fit claim for a moment
            r = c.d.post("/v2/models/ens_unload/fit", body, timeout=120)
            if r.status != 409:
                break
            time.sleep(0.01)
        res["fit"] = r

    t = threading.Thread(target=long_fit)
    t.start()
    running = False
    for _ in range(2000):  # 409 to an empty fit: the long fit holds the claim
        r = c.d.post("/v2/models/ens_unload/fit", {})
        if r.status == 409:
            running = True
            break
        time.sleep(0.002)
    check(running, "never saw the long fit running")
    check_status(c.d.post("/v2/repository/models/ens_unload/unload", {}), 200)
    t.join()
    check_status(res["fit"], 200)
    check(versions(c, "ens_unload") == [1, 2], versions(c, "ens_unload"))
    r = c.d.get("/v2/models/ens_unload/ready")
    check(r.status == 503, "unloaded model answers ready %d: %s" % (r.status, r.body))
    check_status(c.d.post("/v2/models/ens_unload/infer",
                          {"inputs": [tensor("member_outputs", [[0.1, 0.2]], [1, 2])]}), 503)
    check_status(c.d.post("/v2/repository/models/ens_unload/load", {}), 200)
    r = check_status(c.d.post("/v2/models/ens_unload/infer",
                              {"inputs": [tensor("member_outputs", [[0.1, 0.2]], [1, 2])]}), 200)
    check(r.json()["model_version"] == "2", r.json())


if __name__ == "__main__":
    run_tests(collect(globals()), setup, teardown)
