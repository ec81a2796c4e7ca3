"""The learning loop over real HTTP (docs/learning.md): the served-row log,
feedback joined by request id, refits into candidate versions that are not
served, shadow answers, promotion and dropping by score, and what survives
kill -9.

The drift test: an ensemble of two families of external members (logits
sent as member_outputs); family A carries the label in the first half of
the stream, family B in the second. Version 1 is the model fitted on the
first half. With the loop on, the served log loss on the second half comes
back to within 10% of a model fitted on the second half alone within
DRIFT_BUDGET labelled rows; with it off it does not."""
import json
import math
import os
import random
import signal
import struct
import time

from harness import (Daemon, check, check_status, collect, make_repo, output, run_tests, tensor,
                     write_model)

FAMILIES = [{"name": "fa", "members": [{"external": "a1"}, {"external": "a2"}]},
            {"name": "fb", "members": [{"external": "b1"}, {"external": "b2"}]}]
DRIFT_BUDGET = 1200  # labelled rows of the second half within which the loop must recover


def ens_config(log=None, refit=None, **extra):
    c = {"kind": "ensemble", "member_output": "logit", "families": FAMILIES}
    if log is not None:
        c["log"] = log
    if refit is not None:
        c["refit"] = refit
    c.update(extra)
    return c


def theta_tensors(theta):
    return {"tier2.logits": ("F32", [len(theta)], theta)}


def rows(rng, n, informative):
    """n rows of member logits [n, 4] and labels: the members of the
    informative family (0: A, 1: B) see the label, the others noise."""
    Z, y = [], []
    for _ in range(n):
        t = rng.randrange(2)
        s = 2 * t - 1
        row = []
        for f in range(2):
            for _m in range(2):
                row.append((2.0 * s + rng.gauss(0, 1.2)) if f == informative else rng.gauss(0, 1.5))
        Z.append(row)
        y.append(t)
    return Z, y


def log_loss(p, y):
    p = min(max(p, 1e-7), 1 - 1e-7)
    return -math.log(p if y == 1 else 1 - p)


def bytes_tensor(name, values):
    return {"name": name, "shape": [len(values)], "datatype": "BYTES", "data": values}


class Ctx:
    pass


def start(models, args=()):
    c = Ctx()
    c.repo = make_repo()
    for name, (config, tensors) in models.items():
        write_model(c.repo, name, config, tensors)
    c.d = Daemon(c.repo, args=list(args) + ["--log-level", "info"]).start()
    c.daemon_logs = c.d.logs
    return c


def infer_rows(d, model, Z, ids):
    """One request per row, with its OIP id; the probabilities answered."""
    out = []
    for z, i in zip(Z, ids):
        r = check_status(d.infer(model, [tensor("member_outputs", [z])], id=i), 200)
        out.append(output(r, "probability")["data"][0])
    return out


def feedback(d, model, ids, labels, status=200):
    body = {"inputs": [bytes_tensor("id", ids), tensor("labels", labels, datatype="INT64")]}
    return check_status(d.post("/v2/models/%s/feedback" % model, body), status)


def version_json(repo, model, v):
    with open(os.path.join(repo, model, str(v), "version.json")) as f:
        return json.load(f)


# ---- feedback and the log ---------------------------------------------------------


def test_feedback_joins_ids():
    c = start({"m": (ens_config(log={"sample_rate": 1.0, "max_rows": 50}), theta_tensors([0, 0]))})
    try:
        rng = random.Random(1)
        Z, y = rows(rng, 6, 0)
        ids = ["req-%d" % i for i in range(6)]
        infer_rows(c.d, "m", Z, ids)
        # a batch of two rows: ids <id>:0 and <id>:1; the X-Request-Id when the body has no id
        r = check_status(c.d.infer("m", [tensor("member_outputs", Z[:2])], id="batch"), 200)
        r2 = check_status(c.d.post("/v2/models/m/infer", {"inputs": [tensor("member_outputs", [Z[0]])]},
                                   headers={"X-Request-Id": "hdr-1"}), 200)
        j = feedback(c.d, "m", ids[:4] + ["batch:1", "hdr-1", "nope", "nope2"],
                     y[:4] + [1, 0, 1, 0]).json()
        check(j["accepted"] == 6, j)
        check(j["unknown"]["count"] == 2 and j["unknown"]["ids"] == ["nope", "nope2"], j)
        check(j["labelled_rows"] == 6, j)
        # the later label for an id wins; the count of labelled rows does not grow
        j = feedback(c.d, "m", ["req-0"], [1 - y[0]]).json()
        check(j["accepted"] == 1 and j["labelled_rows"] == 6, j)
        # a label the kind cannot take is reported per id, not an error for the batch
        j = feedback(c.d, "m", ["req-5", "req-4"], [7, 1]).json()
        check(j["accepted"] == 1 and j["invalid"]["count"] == 1, j)
        st = check_status(c.d.get("/v2/models/m/candidates"), 200).json()
        check(st["log"]["rows_indexed"] == 9 and st["labelled_rows"] == 7, st)
        check(st["candidate"] is None and st["metric"] == "log_loss", st)
        # every bad request is a 400 naming what is wrong
        body = {"inputs": [bytes_tensor("id", ["a"])]}
        check_status(c.d.post("/v2/models/m/feedback", body), 400, "labels")
        body = {"inputs": [bytes_tensor("id", ["a"]), tensor("labels", [1, 0], datatype="INT64")]}
        check_status(c.d.post("/v2/models/m/feedback", body), 400, "expected shape [1]")
        body = {"inputs": [tensor("id", [1.0]), tensor("labels", [1], datatype="INT64")]}
        check_status(c.d.post("/v2/models/m/feedback", body), 400, "BYTES")
        body = {"inputs": [bytes_tensor("id", ["a"]), tensor("labels", [1], datatype="INT64"),
                           tensor("extra", [1.0])]}
        check_status(c.d.post("/v2/models/m/feedback", body), 400, "unexpected input 'extra'")
        body = {"inputs": [bytes_tensor("id", ["a"]), tensor("labels", [1], datatype="INT64")],
                "parameters": {"epochs": 3}}
        check_status(c.d.post("/v2/models/m/feedback", body), 400, "unknown parameter 'epochs'")
        # metrics
        m = c.d.get("/metrics").body.decode()
        check('tallyd_learn_rows_logged_total{model="m"} 9' in m, m[-3000:])
        check('tallyd_learn_feedback_total{model="m",result="unknown"} 2' in m, m[-3000:])
    finally:
        c.d.stop()


def test_id_served_again_in_a_full_log():
    """An id served again when its row is the oldest of a full log (max_rows
    1): the old row leaves the index once, its label is forgotten once (under
    ASan a second touch of the freed row fails the run), and the new row takes
    feedback."""
    c = start({"m": (ens_config(log={"sample_rate": 1.0, "max_rows": 1}), theta_tensors([0, 0]))})
    try:
        Z, y = rows(random.Random(2), 3, 0)
        for k in range(3):
            infer_rows(c.d, "m", [Z[k]], ["same"])
            j = feedback(c.d, "m", ["same"], [y[k]]).json()
            check(j["accepted"] == 1 and j["labelled_rows"] == 1, j)
        st = check_status(c.d.get("/v2/models/m/candidates"), 200).json()
        check(st["log"]["rows_indexed"] == 1 and st["labelled_rows"] == 1, st)
        # a body shaped for more ids than its bytes can hold is refused before allocation
        body = {"inputs": [{"name": "id", "datatype": "BYTES", "shape": [1 << 27],
                            "parameters": {"binary_data_size": 0}},
                           tensor("labels", [1], datatype="INT64")]}
        js = json.dumps(body).encode()
        r = c.d.post("/v2/models/m/feedback", js,
                     headers={"Inference-Header-Content-Length": str(len(js)),
                              "Content-Type": "application/octet-stream"})
        check(r.status in (400, 413), r)
        check(c.d.proc.poll() is None, "the daemon died")
    finally:
        c.d.stop()


def test_feedback_refused_without_log():
    c = start({"plain": (ens_config(), theta_tensors([0, 0]))})
    try:
        body = {"inputs": [bytes_tensor("id", ["a"]), tensor("labels", [1], datatype="INT64")]}
        check_status(c.d.post("/v2/models/plain/feedback", body), 400, "does not log")
        check_status(c.d.post("/v2/models/plain/refit", {}), 400, "no logged rows")
        check_status(c.d.get("/v2/models/plain/candidates"), 400, "no learning loop")
        check_status(c.d.post("/v2/models/nosuch/feedback", body), 404)
    finally:
        c.d.stop()


def test_config_refused_by_name():
    repo = make_repo()
    write_model(repo, "ok", ens_config(log={"sample_rate": 0.5}), theta_tensors([0, 0]))
    bad = {
        "b1": ens_config(log={"sample_rate": 1.0, "max_row": 5}),
        "b2": ens_config(log={"sample_rate": 0}),
        "b3": ens_config(refit={"every_rows": 10}),
        "b4": ens_config(log={}, refit={"every_rows": 10, "windows": 3}),
        "b5": ens_config(log={}, refit={"params": {"epoch": 3}}),
        "b6": ens_config(log={}, refit={"metric": "wis"}),
    }
    for n, cfg in bad.items():
        write_model(repo, n, cfg, theta_tensors([0, 0]))
    d = Daemon(repo).start(wait_ready=False)
    try:
        time.sleep(0.5)
        idx = {m["name"]: m for m in check_status(d.post("/v2/repository/index", {}), 200).json()}
        check(idx["ok"]["state"] == "READY", idx["ok"])
        want = {"b1": "max_row", "b2": "sample_rate", "b3": "needs 'log'", "b4": "windows",
                "b5": "epoch", "b6": "\"log_loss\" or \"brier\""}
        for n, word in want.items():
            check(idx[n]["state"] == "UNAVAILABLE" and word in idx[n].get("reason", ""), idx[n])
    finally:
        d.stop()


def test_log_survives_kill9():
    """kill -9 while rows and labels stream in: the store reopens, the rows
    it holds are readable, labels stay joined, and feedback goes on."""
    c = start({"k": (ens_config(log={"max_rows": 100000}), theta_tensors([0, 0]))})
    rng = random.Random(5)
    Z, y = rows(rng, 400, 0)
    ids = ["k-%d" % i for i in range(400)]
    infer_rows(c.d, "k", Z[:200], ids[:200])
    feedback(c.d, "k", ids[:200], y[:200])
    time.sleep(1.3)  # the writer fsyncs at most once a second: these are on disk
    # more while the daemon is killed
    import threading
    stop = threading.Event()

    def stream():
        i = 200
        while not stop.is_set() and i < 400:
            try:
                c.d.infer("k", [tensor("member_outputs", [Z[i]])], id=ids[i])
                feedback(c.d, "k", [ids[i]], [y[i]])
            except Exception:
                return
            i += 1

    t = threading.Thread(target=stream)
    t.start()
    time.sleep(0.3)
    c.d.proc.send_signal(signal.SIGKILL)
    c.d.proc.wait()
    stop.set()
    t.join()
    d2 = Daemon(c.repo).start()
    try:
        st = check_status(d2.get("/v2/models/k/candidates"), 200).json()
        check(st["log"]["rows_indexed"] >= 200, st)
        check(st["labelled_rows"] >= 200, st)
        j = feedback(d2, "k", ids[:3], y[:3]).json()
        check(j["accepted"] == 3, j)
    finally:
        d2.stop()


# ---- candidates -------------------------------------------------------------------


def test_refit_candidate_not_served_then_promoted():
    """A refit on request writes a candidate that is not served; shadow answers
    and labels that favour it promote it; version.json records the decision."""
    cfg = ens_config(log={"max_rows": 5000},
                     refit={"window_rows": 300, "min_rows": 100, "compare_rows": 60, "margin": 0.05})
    c = start({"p": (cfg, theta_tensors([4.0, -4.0]))})  # version 1 trusts family A
    try:
        rng = random.Random(7)
        Z, y = rows(rng, 300, 1)  # the world: family B knows
        ids = ["p-%d" % i for i in range(300)]
        infer_rows(c.d, "p", Z, ids)
        feedback(c.d, "p", ids, y)
        check_status(c.d.post("/v2/models/p/refit", {"parameters": {"epochz": 1}}), 400, "epochz")
        check_status(c.d.post("/v2/models/p/refit", {"inputs": []}), 400, "unknown field 'inputs'")
        r = check_status(c.d.post("/v2/models/p/refit", {"parameters": {"epochs": 100,
                                                                       "learning_rate": 0.1}}),
                         200).json()
        check(r["candidate_version"] == "2" and r["window_rows"] == 300, r)
        # not served: metadata lists version 1 only; version 2 cannot be asked for
        meta = check_status(c.d.get("/v2/models/p"), 200).json()
        check(meta["versions"] == ["1"], meta)
        info = version_json(c.repo, "p", 2)
        check(info["candidate"]["state"] == "pending", info)
        st = check_status(c.d.get("/v2/models/p/candidates"), 200).json()
        check(st["candidate"]["version"] == "2" and st["candidate"]["compared_rows"] == 0, st)
        # fresh rows: the candidate answers them in the background
        Z2, y2 = rows(rng, 80, 1)
        ids2 = ["p2-%d" % i for i in range(80)]
        infer_rows(c.d, "p", Z2, ids2)
        time.sleep(0.5)
        j = feedback(c.d, "p", ids2, y2).json()
        check(j["decision"] is not None and j["decision"]["decision"] == "promoted", j)
        check(j["decision"]["candidate_score"] < j["decision"]["served_score"], j)
        meta = check_status(c.d.get("/v2/models/p"), 200).json()
        check(meta["versions"] == ["2"], meta)
        info = version_json(c.repo, "p", 2)
        cj = info["candidate"]
        check(cj["state"] == "promoted" and cj["compared_rows"] >= 60, info)
        check(cj["scores"]["candidate"] < cj["scores"]["served"], cj)
        check(cj["window"]["rows"] == 300 and "why" in cj, cj)
        m = c.d.get("/metrics").body.decode()
        check('tallyd_learn_decisions_total{model="p",decision="promoted"} 1' in m, m[-2500:])
    finally:
        c.d.stop()


def test_worse_candidate_never_promoted():
    """Labels that favour the served version: the candidate (fitted on rows
    whose labels said the opposite) is dropped, never served."""
    cfg = ens_config(log={"max_rows": 5000},
                     refit={"window_rows": 200, "min_rows": 100, "compare_rows": 60, "margin": 0.0})
    c = start({"w": (cfg, theta_tensors([4.0, -4.0]))})
    try:
        rng = random.Random(11)
        Z, y = rows(rng, 200, 1)  # a window where B looks informative
        ids = ["w-%d" % i for i in range(200)]
        infer_rows(c.d, "w", Z, ids)
        feedback(c.d, "w", ids, y)
        r = check_status(c.d.post("/v2/models/w/refit", {"parameters": {"epochs": 100,
                                                                       "learning_rate": 0.1}}),
                         200).json()
        check(r["candidate_version"] == "2", r)
        Z2, y2 = rows(rng, 100, 0)  # but the labels now favour A: the served version
        ids2 = ["w2-%d" % i for i in range(100)]
        infer_rows(c.d, "w", Z2, ids2)
        time.sleep(0.5)
        j = feedback(c.d, "w", ids2, y2).json()
        check(j["decision"] is not None and j["decision"]["decision"] == "dropped", j)
        check("worse" in j["decision"]["why"], j)
        meta = check_status(c.d.get("/v2/models/w"), 200).json()
        check(meta["versions"] == ["1"], meta)
        check(version_json(c.repo, "w", 2)["candidate"]["state"] == "dropped", "state")
        # a restart serves version 1 still: the dropped candidate stays unserved
        c.d.stop()
        c.d = Daemon(c.repo).start()
        meta = check_status(c.d.get("/v2/models/w"), 200).json()
        check(meta["versions"] == ["1"], meta)
    finally:
        c.d.stop()


def test_candidate_replaced_and_too_old():
    """A second refit replaces a pending candidate (recorded); a candidate
    undecided after max_age_seconds is dropped as too old."""
    cfg = ens_config(log={"max_rows": 5000},
                     refit={"window_rows": 100, "min_rows": 50, "compare_rows": 500,
                            "max_age_seconds": 1, "params": {"epochs": 20}})
    c = start({"o": (cfg, theta_tensors([0.0, 0.0]))})
    try:
        rng = random.Random(4)
        Z, y = rows(rng, 100, 1)
        check_status(c.d.infer("o", [tensor("member_outputs", Z)], id="a"), 200)
        j = feedback(c.d, "o", ["a:%d" % i for i in range(100)], y).json()
        check(j["accepted"] == 100, j)
        check_status(c.d.post("/v2/models/o/refit", {}), 200)  # refit.params: epochs 20
        info = version_json(c.repo, "o", 2)
        check(info["fit"]["epochs"] == 20, info["fit"])
        r = check_status(c.d.post("/v2/models/o/refit"), 200).json()
        check(r["candidate_version"] == "3", r)
        check(version_json(c.repo, "o", 2)["candidate"]["decision"] == "replaced", "replaced")
        time.sleep(1.2)
        st = check_status(c.d.get("/v2/models/o/candidates"), 200).json()
        check(st["candidate"] is None, st)
        check(st["decisions"][-1]["decision"] == "dropped" and "too old" in st["decisions"][-1]["why"],
              st)
        check(version_json(c.repo, "o", 3)["candidate"]["state"] == "dropped", "dropped")
        check(check_status(c.d.get("/v2/models/o"), 200).json()["versions"] == ["1"], "served")
    finally:
        c.d.stop()


def test_candidate_superseded_by_fit():
    """A /fit while a candidate is pending serves a newer version: the
    candidate, however good, is dropped as superseded, never served. (Scored
    by the Brier score here: refit.metric.)"""
    cfg = ens_config(log={"max_rows": 5000},
                     refit={"window_rows": 200, "min_rows": 100, "compare_rows": 50, "margin": 0.0,
                            "metric": "brier"})
    c = start({"s": (cfg, theta_tensors([4.0, -4.0]))})
    try:
        rng = random.Random(21)
        Z, y = rows(rng, 200, 1)
        check_status(c.d.infer("s", [tensor("member_outputs", Z)], id="a"), 200)
        feedback(c.d, "s", ["a:%d" % i for i in range(200)], y)
        r = check_status(c.d.post("/v2/models/s/refit", {"parameters": {"epochs": 100,
                                                                       "learning_rate": 0.1}}),
                         200).json()
        check(r["candidate_version"] == "2", r)
        Zf, yf = rows(rng, 100, 0)
        fit(c.d, "s", Zf, yf)  # version 3, served at once
        check(check_status(c.d.get("/v2/models/s"), 200).json()["versions"] == ["3"], "fit")
        Z2, y2 = rows(rng, 60, 1)
        check_status(c.d.infer("s", [tensor("member_outputs", Z2)], id="b"), 200)
        time.sleep(0.5)
        j = feedback(c.d, "s", ["b:%d" % i for i in range(60)], y2).json()
        d = j["decision"] or check_status(c.d.get("/v2/models/s/candidates"), 200).json()["decisions"][-1]
        check(d["decision"] == "dropped" and "superseded" in d["why"], j)
        check(check_status(c.d.get("/v2/models/s"), 200).json()["versions"] == ["3"], "served")
        cj = version_json(c.repo, "s", 2)["candidate"]
        check(cj["state"] == "dropped" and cj["scores"]["metric"] == "brier", cj)
        check(0 <= cj["scores"]["candidate"] < cj["scores"]["served"] <= 1, cj)
    finally:
        c.d.stop()


def test_python_client():
    """tallyclient's infer(id=...), feedback, refit and candidates."""
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                                    "clients", "python"))
    from tallyclient import TallyClient, TallyError
    c = start({"py": (ens_config(log={"max_rows": 1000}, refit={"window_rows": 100,
                                                                 "min_rows": 50}),
                      theta_tensors([0, 0]))})
    try:
        cl = TallyClient("http://127.0.0.1:%d" % c.d.port)
        rng = random.Random(8)
        Z, y = rows(rng, 60, 1)
        cl.infer("py", {"member_outputs": Z}, id="pyb")
        j = cl.feedback("py", ["pyb:%d" % i for i in range(60)] + ["zz"], labels=y + [0])
        check(j["accepted"] == 60 and j["unknown"]["ids"] == ["zz"], j)
        r = cl.refit("py", {"epochs": 10})
        check(r["candidate_version"] == "2", r)
        check(cl.candidates("py")["candidate"]["version"] == "2", "candidate")
        try:
            cl.feedback("py", ["a"], targets=[1.0])
            check(False, "targets on an ensemble should be a 400")
        except TallyError as e:
            check("labels" in str(e), str(e))
    finally:
        c.d.stop()


def test_batch_larger_than_the_log():
    """A batch of more rows than log.max_rows while a candidate is pending:
    the index keeps the newest max_rows, the shadow answer covers the batch
    (its ids are copies: the batch evicted its own first rows), nothing breaks."""
    cfg = ens_config(log={"max_rows": 20}, refit={"window_rows": 20, "min_rows": 10})
    c = start({"tiny": (cfg, theta_tensors([0, 0]))})
    try:
        rng = random.Random(12)
        Z, y = rows(rng, 20, 1)
        check_status(c.d.infer("tiny", [tensor("member_outputs", Z)], id="a"), 200)
        feedback(c.d, "tiny", ["a:%d" % i for i in range(20)], y)
        check_status(c.d.post("/v2/models/tiny/refit", {"parameters": {"epochs": 5}}), 200)
        Z2, y2 = rows(rng, 50, 1)
        check_status(c.d.infer("tiny", [tensor("member_outputs", Z2)], id="big"), 200)
        time.sleep(0.3)
        j = feedback(c.d, "tiny", ["big:%d" % i for i in range(50)], y2).json()
        check(j["accepted"] == 20 and j["unknown"]["count"] == 30, j)
        check(j["unknown"]["ids"][0] == "big:0", j)
        st = check_status(c.d.get("/v2/models/tiny/candidates"), 200).json()
        check(st["log"]["rows_indexed"] == 20 and st["candidate"]["compared_rows"] == 20, st)
    finally:
        c.d.stop()


def test_second_daemon_does_not_log():
    """Two daemons on one repository: the first to serve the model holds its
    row log; the other serves but does not log, and its feedback is a 503
    naming why."""
    c = start({"two": (ens_config(log={"max_rows": 100}), theta_tensors([0, 0]))})
    d2 = Daemon(c.repo, args=["--replica-id", "other"]).start()
    try:
        rng = random.Random(13)
        Z, y = rows(rng, 2, 1)
        check_status(c.d.infer("two", [tensor("member_outputs", Z)], id="one"), 200)
        check_status(d2.infer("two", [tensor("member_outputs", Z)], id="two"), 200)
        check_status(d2.post("/v2/models/two/feedback",
                             {"inputs": [bytes_tensor("id", ["two:0"]),
                                         tensor("labels", [1], datatype="INT64")]}),
                     503, "in use by another process")
        j = feedback(c.d, "two", ["one:0", "one:1", "two:0"], y + [1]).json()
        check(j["accepted"] == 2 and j["unknown"]["ids"] == ["two:0"], j)
    finally:
        d2.stop()
        c.d.stop()


# ---- drift ---------------------------------------------------------------------------


def evaluate(d, model, Z, y):
    body = {"inputs": [tensor("member_outputs", Z), tensor("labels", y, datatype="INT64")]}
    return check_status(d.post("/v2/models/%s/evaluate" % model, body), 200).json()["metrics"]["log_loss"]


def fit(d, model, Z, y):
    body = {"inputs": [tensor("member_outputs", Z), tensor("labels", y, datatype="INT64")],
            "parameters": {"epochs": 150, "learning_rate": 0.1, "seed": 1}}
    return check_status(d.post("/v2/models/%s/fit" % model, body), 200).json()


def test_drift_ensemble_loop_recovers():
    """Family A knows the label in the first half, family B in the second.
    Both models start from the fit on the first half. With the loop on
    (refit every 200 labelled rows on the newest 200, compare on 100 fresh
    rows), the served log loss on held-out second-half rows comes within 10%
    of a model fitted on the second half alone within DRIFT_BUDGET labelled
    rows; with the loop off (the same log, no refit) it stays far above."""
    log = {"max_rows": 20000}
    refit = {"every_rows": 200, "window_rows": 200, "min_rows": 200, "compare_rows": 100,
             "margin": 0.02, "params": {"epochs": 150, "learning_rate": 0.1, "seed": 1}}
    c = start({"on": (ens_config(log=log, refit=refit), theta_tensors([0, 0])),
               "off": (ens_config(log=log), theta_tensors([0, 0])),
               "oracle": (ens_config(), theta_tensors([0, 0]))})
    try:
        rng = random.Random(2024)
        Z1, y1 = rows(rng, 600, 0)
        for m in ("on", "off"):
            fit(c.d, m, Z1, y1)  # version 2: the first half's model
        Zo, yo = rows(rng, 600, 1)
        fit(c.d, "oracle", Zo, yo)  # fitted on the second half alone
        Zt, yt = rows(rng, 1000, 1)  # held-out second-half rows
        best = evaluate(c.d, "oracle", Zt, yt)
        start_loss = evaluate(c.d, "on", Zt, yt)
        check(start_loss > 1.5 * best, (start_loss, best))
        labelled, recovered_at, batch = 0, None, 50
        while labelled < DRIFT_BUDGET:
            Z, y = rows(rng, batch, 1)
            for m in ("on", "off"):
                rid = "%s-%d" % (m, labelled)
                check_status(c.d.infer(m, [tensor("member_outputs", Z)], id=rid), 200)
                feedback(c.d, m, ["%s:%d" % (rid, i) for i in range(batch)], y)
            labelled += batch
            time.sleep(0.05)  # the policy refit and the shadow answers run on the pool
            if recovered_at is None and evaluate(c.d, "on", Zt, yt) <= 1.10 * best:
                recovered_at = labelled
                break
        on_loss = evaluate(c.d, "on", Zt, yt)
        off_loss = evaluate(c.d, "off", Zt, yt)
        st = check_status(c.d.get("/v2/models/on/candidates"), 200).json()
        print("drift: oracle %.4f, start %.4f, loop on %.4f after %s labelled rows, loop off %.4f"
              % (best, start_loss, on_loss, recovered_at, off_loss))
        check(recovered_at is not None,
              "the loop did not recover within %d labelled rows: %.4f against %.4f; %r"
              % (DRIFT_BUDGET, on_loss, best, st))
        check(st["promoted"] >= 1, st)
        check(off_loss > 1.10 * best, (off_loss, best))
        served = check_status(c.d.get("/v2/models/on"), 200).json()["versions"]
        info = version_json(c.repo, "on", int(served[-1]))
        check(info["candidate"]["state"] == "promoted", info)
        check(info["candidate"]["trigger"].startswith("policy"), info)
    finally:
        c.d.stop()


def test_kill9_during_promotion():
    """kill -9 while the feedback that promotes a candidate is answered: after
    a restart, version.json parses, the served version agrees with it
    (promoted: served; pending: not served and compared again), and the row
    log reads back."""
    cfg = ens_config(log={"max_rows": 5000},
                     refit={"window_rows": 200, "min_rows": 100, "compare_rows": 50, "margin": 0.0})
    for delay in (0.0, 0.003, 0.01, 0.03):
        c = start({"k": (cfg, theta_tensors([4.0, -4.0]))})
        rng = random.Random(3)
        Z, y = rows(rng, 200, 1)
        ids = ["k-%d" % i for i in range(200)]
        check_status(c.d.infer("k", [tensor("member_outputs", Z)], id="w"), 200)
        feedback(c.d, "k", ["w:%d" % i for i in range(200)], y)
        check_status(c.d.post("/v2/models/k/refit", {"parameters": {"epochs": 80,
                                                                   "learning_rate": 0.1}}), 200)
        Z2, y2 = rows(rng, 60, 1)
        check_status(c.d.infer("k", [tensor("member_outputs", Z2)], id="f"), 200)
        time.sleep(0.3)
        import threading
        def send():
            try:
                c.d.post("/v2/models/k/feedback",
                         {"inputs": [bytes_tensor("id", ["f:%d" % i for i in range(60)]),
                                     tensor("labels", y2, datatype="INT64")]}, timeout=5)
            except OSError:
                pass  # killed before it answered

        t = threading.Thread(target=send)
        t.start()
        time.sleep(delay)
        c.d.proc.send_signal(signal.SIGKILL)
        c.d.proc.wait()
        t.join()
        info = version_json(c.repo, "k", 2)  # parses: written by rename, never torn
        state = info["candidate"]["state"]
        print("kill -9 %.3f s into the deciding feedback: candidate %s" % (delay, state))
        check(state in ("pending", "promoted"), info)
        d2 = Daemon(c.repo).start()
        try:
            served = check_status(d2.get("/v2/models/k"), 200).json()["versions"]
            st = check_status(d2.get("/v2/models/k/candidates"), 200).json()
            if state == "promoted":
                check(served == ["2"] and st["candidate"] is None, (served, st))
            else:
                check(served == ["1"] and st["candidate"]["version"] == "2", (served, st))
            check(st["log"]["rows_indexed"] >= 200, st)
            check(d2.infer("k", [tensor("member_outputs", Z2[:1])]).status == 200, "infer")
        finally:
            d2.stop()


# ---- quantile models ------------------------------------------------------------------

LEVELS = [0.1, 0.5, 0.9]
ZS = [-1.2816, 0.0, 1.2816]


def q_rows(rng, n, good):
    """3 external bases of 3 quantiles each; base `good` is the true quantile
    function of y = x + N(0, 1), the others are off by +-2."""
    z, y = [], []
    for _ in range(n):
        x = rng.uniform(-1, 1)
        yy = x + rng.gauss(0, 1)
        bases = []
        for j in range(3):
            off = 0.0 if j == good else (2.0 if j < good else -2.0) if j != good else 0.0
            bases.append([x + off + t for t in ZS])
        z.append(bases)
        y.append(yy)
    return z, y


def test_quantile_feedback_refit_wis():
    """targets join like labels; a refit's candidate is scored by WIS and
    promoted when the bases' truth changed."""
    cfg = {"kind": "quantile_ensemble", "levels": LEVELS,
           "bases": [{"external": "e%d" % j} for j in range(3)],
           "aggregator": {"granularity": "coarse", "scope": "global", "simplex": True},
           "log": {"max_rows": 5000},
           "refit": {"window_rows": 300, "min_rows": 100, "compare_rows": 60, "margin": 0.05}}
    c = start({"q": (cfg, {"aggregator.logits": ("F32", [3], [6.0, 0.0, 0.0])})})  # trusts e0
    try:
        rng = random.Random(9)
        z, y = q_rows(rng, 300, 1)  # e1 is right
        r = check_status(c.d.infer("q", [tensor("base_quantiles", z)], id="q"), 200)
        body = {"inputs": [bytes_tensor("id", ["q:%d" % i for i in range(300)]),
                           tensor("targets", y, datatype="FP64")]}
        j = check_status(c.d.post("/v2/models/q/feedback", body), 200).json()
        check(j["accepted"] == 300, j)
        # the kind's live scores took the rows, on the version that answered them
        obs = j["observed"]
        check(len(obs) == 1 and obs[0]["version"] == "1" and obs[0]["rows"] == 300, obs)
        check("error" not in obs[0] and obs[0]["result"] is not None, obs)
        print("observed:", json.dumps(obs[0])[:400])
        body["inputs"][1] = tensor("labels", y)
        check_status(c.d.post("/v2/models/q/feedback", body), 400, "targets")
        r = check_status(c.d.post("/v2/models/q/refit", {"parameters": {"epochs": 60,
                                                                       "learning_rate": 0.1}}),
                         200).json()
        check(r["candidate_version"] == "2", r)
        z2, y2 = q_rows(rng, 80, 1)
        check_status(c.d.infer("q", [tensor("base_quantiles", z2)], id="q2"), 200)
        time.sleep(0.5)
        body = {"inputs": [bytes_tensor("id", ["q2:%d" % i for i in range(80)] + ["other"]),
                           tensor("targets", y2 + [0.0], datatype="FP64")]}
        j = check_status(c.d.post("/v2/models/q/feedback", body), 200).json()
        check(j["unknown"]["ids"] == ["other"], j)
        check(j["decision"]["decision"] == "promoted" and j["decision"]["metric"] == "wis", j)
        check(j["decision"]["candidate_score"] < 0.95 * j["decision"]["served_score"], j)
        check(check_status(c.d.get("/v2/models/q"), 200).json()["versions"] == ["2"], "served")
    finally:
        c.d.stop()


if __name__ == "__main__":
    run_tests(collect(globals()))
