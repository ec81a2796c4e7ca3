"""Dynamic batching over real HTTP (docs/scheduling.md): many concurrent
requests with distinct rows, for two versions at once and with different
output requests, each answered with exactly its own rows (checked against the
same model without batching, within 1e-6 relative), for mlp, ensemble and
quantile_ensemble; an overflow in one request fails that request only; the
batcher really joined requests (its counters); bad configs are refused by
name."""
import random
import re
import threading
import time

from harness import (SLOW, Daemon, check, check_status, collect, make_repo, output, run_tests,
                     tensor, write_model)

BATCHING = {"max_queue_delay_us": 8000, "max_batch_size": 64, "preferred_batch_sizes": [32]}
D_IN, HID, D_OUT = 24, 96, 3
L3 = [0.25, 0.5, 0.75]


class Ctx:
    pass


def mlp_weights(seed):
    rng = random.Random(seed)

    def mat(r, c):
        return ("F32", [r, c], [rng.gauss(0, 0.3) for _ in range(r * c)])

    def vec(n):
        return ("F32", [n], [rng.gauss(0, 0.1) for _ in range(n)])

    return {"layers.0.weight": mat(HID, D_IN), "layers.0.bias": vec(HID),
            "layers.1.weight": mat(HID, HID), "layers.1.bias": vec(HID),
            "layers.2.weight": mat(D_OUT, HID), "layers.2.bias": vec(D_OUT)}


def ensemble_config():
    return {"kind": "ensemble", "member_output": "logit",
            "families": [{"name": "a", "members": [{"external": "a1"}, {"external": "a2"}]},
                         {"name": "b", "members": [{"external": "b1"}, {"external": "b2"},
                                                   {"external": "b3"}]}]}


def quantile_config():
    return {"kind": "quantile_ensemble", "levels": L3,
            "bases": [{"external": "e0"}, {"external": "e1"}], "features": 2,
            "aggregator": {"granularity": "coarse", "scope": "local", "simplex": True,
                           "hidden": 4, "depth": 2},
            "monotone": "sort"}


def setup():
    c = Ctx()
    c.repo = make_repo()
    mlp = {"kind": "mlp", "activations": ["relu", "relu", "none"]}
    both = {"latest": {"num_versions": 2}}
    write_model(c.repo, "mlp_b", dict(mlp, dynamic_batching=BATCHING, version_policy=both),
                mlp_weights(1), version=1)
    write_model(c.repo, "mlp_b", dict(mlp, dynamic_batching=BATCHING, version_policy=both),
                mlp_weights(2), version=2)
    write_model(c.repo, "mlp_ref1", mlp, mlp_weights(1))
    write_model(c.repo, "mlp_ref2", mlp, mlp_weights(2))
    theta = {"tier2.logits": ("F32", [2], [0.4, -0.2])}
    write_model(c.repo, "ens_b", dict(ensemble_config(), dynamic_batching=BATCHING), theta)
    write_model(c.repo, "q_b", dict(quantile_config(), dynamic_batching=BATCHING), {})
    write_model(c.repo, "ens_logged", dict(ensemble_config(), dynamic_batching=BATCHING,
                                           log={"sample_rate": 1.0, "max_rows": 10000}), theta)
    write_model(c.repo, "triton_names", dict(mlp, dynamic_batching={
        "max_queue_delay_microseconds": 1000, "preferred_batch_size": [8]}), mlp_weights(1))
    write_model(c.repo, "bad_twice", dict(mlp, dynamic_batching={
        "max_queue_delay_microseconds": 1000, "max_queue_delay_us": 1000}), mlp_weights(1))
    write_model(c.repo, "bad_kind", {"kind": "attention", "dynamic_batching": {}}, None)
    write_model(c.repo, "bad_key", dict(mlp, dynamic_batching={"max_queue_delay": 5}),
                mlp_weights(1))
    write_model(c.repo, "bad_pref", dict(mlp, max_batch=8,
                                         dynamic_batching={"preferred_batch_sizes": [4, 16]}),
                mlp_weights(1))
    c.d = Daemon(c.repo, ["--threads", "2"]).start(wait_ready=False)
    deadline = time.time() + 30 * SLOW
    while time.time() < deadline:
        idx = c.d.post("/v2/repository/index").json()
        if sum(1 for e in idx if e["state"] == "READY" and not e["name"].startswith("bad_")) >= 8:
            break
        time.sleep(0.05)
    c.daemon_logs = c.d.logs
    return c


def teardown(c):
    c.d.stop()


def counter(d, name, model):
    text = check_status(d.get("/metrics"), 200).body.decode()
    m = re.search(r'^%s\{model="%s"\} (\S+)$' % (name, re.escape(model)), text, re.M)
    return float(m.group(1)) if m else 0.0


def same(got, want, what):
    check(len(got) == len(want), "%s: %d values, want %d" % (what, len(got), len(want)))
    for i, (g, w) in enumerate(zip(got, want)):
        check(abs(g - w) <= 1e-6 * abs(w) + 1e-30,
              "%s[%d]: %r batched, %r alone" % (what, i, g, w))


def hammer(c, jobs, clients=64):
    """jobs: list of (path, body, check_fn); run from `clients` threads at
    once; returns failures as strings."""
    errors, lock = [], threading.Lock()
    start = threading.Barrier(clients)

    def client(mine):
        start.wait()
        for path, body, fn in mine:
            try:
                fn(c.d.post(path, body))
            except Exception as e:  # collected, reported together
                with lock:
                    errors.append("%s: %s" % (path, e))

    threads = [threading.Thread(target=client, args=(jobs[i::clients],)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def test_bad_configs_refused_by_name(c):
    by = {m["name"]: m for m in c.d.post("/v2/repository/index").json()}
    check("mlp, ensemble and quantile_ensemble" in by["bad_kind"].get("reason", ""), by["bad_kind"])
    check("dynamic_batching.max_queue_delay" in by["bad_key"].get("reason", ""), by["bad_key"])
    check("preferred_batch_sizes" in by["bad_pref"].get("reason", ""), by["bad_pref"])
    check("twice" in by["bad_twice"].get("reason", ""), by["bad_twice"])
    # Triton's spellings (a tritonclient config override) load
    check(by["triton_names"]["state"] == "READY", by["triton_names"])
    r = check_status(c.d.infer("triton_names", [tensor("features", [[0.5] * D_IN])]), 200)
    check(counter(c.d, "tallyd_batches_total", "triton_names") == 1, "not through the batcher")
    check(len(output(r, "output")["data"]) == D_OUT)


def test_mlp_split_back_exact(c):
    rng = random.Random(5)
    jobs = []
    for k in range(256):
        rows = rng.randint(1, 3)
        X = [[rng.uniform(-2, 2) for _ in range(D_IN)] for _ in range(rows)]
        version = rng.choice([1, 2])
        # running alone: the same request to the same model with nothing
        # beside it (a group of one), and to the same weights without
        # batching: the same answer
        alone = check_status(c.d.post("/v2/models/mlp_b/versions/%d/infer" % version,
                                      {"inputs": [tensor("features", X)]}), 200)
        want = output(alone, "output")["data"]
        ref = output(check_status(c.d.infer("mlp_ref%d" % version, [tensor("features", X)]),
                                  200), "output")["data"]
        same(want, ref, "request %d alone, batching model against plain model" % k)
        body = {"inputs": [tensor("features", X)]}
        if k % 3 == 1:  # another output request: the same answer
            body["outputs"] = [{"name": "output"}]
        if k % 5 == 2:
            body["parameters"] = {"priority": 1, "timeout_ms": 60000}
        path = "/v2/models/mlp_b/versions/%d/infer" % version

        def fn(r, want=want, version=version, rows=rows, k=k):
            check_status(r, 200)
            j = r.json()
            check(j["model_version"] == str(version), j)
            o = output(r, "output")
            check(o["shape"] == [rows, D_OUT], o["shape"])
            same(o["data"], want, "request %d" % k)

        jobs.append((path, body, fn))
    b0, r0 = counter(c.d, "tallyd_batches_total", "mlp_b"), counter(c.d, "tallyd_batched_requests_total", "mlp_b")
    errors = hammer(c, jobs)
    check(not errors, "%d wrong answers, first: %s" % (len(errors), errors[:3]))
    batches = counter(c.d, "tallyd_batches_total", "mlp_b") - b0
    reqs = counter(c.d, "tallyd_batched_requests_total", "mlp_b") - r0
    print("    %d requests in %d joint calls (%.1f per call)" % (reqs, batches, reqs / batches))
    check(reqs == 256, reqs)
    check(reqs / batches >= 1.5, "the batcher joined too little: %d requests, %d calls" %
          (reqs, batches))


def test_overflow_fails_only_its_request(c):
    rng = random.Random(6)
    jobs = []
    for k in range(96):
        if k % 16 == 7:
            X = [[3e38] * D_IN]  # overflows to inf in the first layer

            def fn(r):
                check_status(r, 400, "output")
        else:
            X = [[rng.uniform(-2, 2) for _ in range(D_IN)]]
            want = output(check_status(c.d.infer("mlp_b", [tensor("features", X)]), 200),
                          "output")["data"]

            def fn(r, want=want, k=k):
                check_status(r, 200)
                same(output(r, "output")["data"], want, "request %d" % k)
        jobs.append(("/v2/models/mlp_b/infer", {"inputs": [tensor("features", X)]}, fn))
    errors = hammer(c, jobs, clients=32)
    check(not errors, "%d wrong answers, first: %s" % (len(errors), errors[:3]))


def test_ensemble_split_back_exact(c):
    rng = random.Random(7)
    jobs = []
    for k in range(128):
        rows = rng.randint(1, 4)
        Z = [[rng.gauss(0, 2) for _ in range(5)] for _ in range(rows)]
        ref = check_status(c.d.infer("ens_b", [tensor("member_outputs", Z)]), 200).json()

        def fn(r, ref=ref, k=k):
            check_status(r, 200)
            got = {o["name"]: o for o in r.json()["outputs"]}
            for o in ref["outputs"]:
                check(got[o["name"]]["shape"] == o["shape"], (got[o["name"]], o))
                same(got[o["name"]]["data"], o["data"], "request %d %s" % (k, o["name"]))

        jobs.append(("/v2/models/ens_b/infer", {"inputs": [tensor("member_outputs", Z)]}, fn))
    errors = hammer(c, jobs)
    check(not errors, "%d wrong answers, first: %s" % (len(errors), errors[:3]))
    check(counter(c.d, "tallyd_batched_requests_total", "ens_b") >
          counter(c.d, "tallyd_batches_total", "ens_b"), "no two requests were joined")


def test_quantile_split_back_exact(c):
    """Two inputs per request (base_quantiles and features), both joined."""
    rng = random.Random(8)
    jobs = []
    for k in range(128):
        rows = rng.randint(1, 3)
        Zq = [[sorted(rng.gauss(0, 1) for _ in L3) for _ in range(2)] for _ in range(rows)]
        F = [[rng.uniform(-1, 1), rng.uniform(-1, 1)] for _ in range(rows)]
        inputs = [tensor("base_quantiles", Zq), tensor("features", F)]
        if k % 2:
            inputs.reverse()  # another input order: another group, same answer
        ref = check_status(c.d.infer("q_b", inputs), 200).json()
        body = {"inputs": inputs}
        if k % 4 == 3:
            body["parameters"] = {"levels": L3}

        def fn(r, ref=ref, k=k):
            check_status(r, 200)
            got = {o["name"]: o for o in r.json()["outputs"]}
            for o in ref["outputs"]:
                check(got[o["name"]]["shape"] == o["shape"], (got[o["name"]], o))
                same(got[o["name"]]["data"], o["data"], "request %d %s" % (k, o["name"]))

        jobs.append(("/v2/models/q_b/infer", body, fn))
    errors = hammer(c, jobs)
    check(not errors, "%d wrong answers, first: %s" % (len(errors), errors[:3]))
    check(counter(c.d, "tallyd_batched_requests_total", "q_b") >
          counter(c.d, "tallyd_batches_total", "q_b"), "no two requests were joined")


def test_batched_requests_are_logged(c):
    """The served-row log (docs/learning.md) sees batched requests as it sees
    lone ones: every id answered in a batch takes its feedback."""
    rng = random.Random(9)
    jobs, ids = [], []
    for k in range(96):
        Z = [[rng.gauss(0, 2) for _ in range(5)]]
        ids.append("batched-%d" % k)
        jobs.append(("/v2/models/ens_logged/infer",
                     {"id": ids[-1], "inputs": [tensor("member_outputs", Z)]},
                     lambda r: check_status(r, 200)))
    errors = hammer(c, jobs, clients=32)
    check(not errors, errors[:3])
    check(counter(c.d, "tallyd_batched_requests_total", "ens_logged") >
          counter(c.d, "tallyd_batches_total", "ens_logged"), "no two requests were joined")
    body = {"inputs": [{"name": "id", "datatype": "BYTES", "shape": [len(ids)], "data": ids},
                       tensor("labels", [k % 2 for k in range(len(ids))], datatype="INT32")]}
    r = check_status(c.d.post("/v2/models/ens_logged/feedback", body), 200).json()
    check(r["accepted"] == len(ids) and r["unknown"]["count"] == 0, r)


def test_errors_stay_per_request(c):
    # a request the batcher cannot take (wrong width) is refused alone, by
    # the decoder or the kind, exactly as without batching
    r = check_status(c.d.infer("mlp_b", [tensor("features", [[1.0] * (D_IN + 1)])]), 400)
    r2 = check_status(c.d.infer("mlp_ref1", [tensor("features", [[1.0] * (D_IN + 1)])]), 400)
    check(r.json()["error"].replace("mlp_b", "M") == r2.json()["error"].replace("mlp_ref1", "M"),
          (r.json(), r2.json()))
    check_status(c.d.infer("mlp_b", [tensor("features", [[1.0] * D_IN] * 65)]), 200)


def test_clean_exit(c):
    rc = c.d.stop()
    check(rc == 0, "tallyd exited with %r:\n%s" % (rc, c.d.logs()[-3000:]))
    check("ERROR: " not in c.d.logs(), c.d.logs()[-3000:])


if __name__ == "__main__":
    run_tests(collect(globals()), setup, teardown)
