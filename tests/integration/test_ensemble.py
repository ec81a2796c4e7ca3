"""The `ensemble` kind (AWARE-NET two-tier weights) over real HTTP: infer from
hosted members and from member_outputs, checked against a Python computation
of the two-tier formula; binary and 3-class configs with unequal families;
fit to a new version that is served at once; evaluate of old and new
versions; 409 on a concurrent fit; every 400; 503 for an unavailable member."""
import json
import math
import os
import random
import shutil
import struct
import threading
import time

from harness import (Daemon, check, check_status, close, collect, make_repo, output,
                     run_tests, tensor, write_model)

D = 4


def sigmoid(z):
    return 1 / (1 + math.exp(-z)) if z >= 0 else math.exp(z) / (1 + math.exp(z))


def softmax(v):
    m = max(v)
    e = [math.exp(x - m) for x in v]
    s = sum(e)
    return [x / s for x in e]


def two_tier(member_rows, sizes, theta, logits, C):
    """member_rows[b][m] = a logit/probability (C = 1) or a vector of C.
    Returns (y [B] or [B][C], P [B][F] or [B][F][C])."""
    alpha = softmax(theta)
    ys, Ps = [], []
    for row in member_rows:
        P, m = [], 0
        for n_f in sizes:
            acc = [0.0] * max(C, 1) if C > 1 else [0.0]
            for _ in range(n_f):
                z = row[m]
                m += 1
                p = ([sigmoid(z)] if logits else [z]) if C == 1 else (softmax(z) if logits else z)
                for c in range(len(acc)):
                    acc[c] += p[c] / n_f
            P.append(acc)
        y = [sum(alpha[f] * P[f][c] for f in range(len(sizes))) for c in range(len(P[0]))]
        ys.append(y[0] if C == 1 else y)
        Ps.append([p[0] for p in P] if C == 1 else P)
    return ys, Ps


def linear(w, b):
    """A one-layer mlp: out = W x + b, W [O, D]."""
    return {"layers.0.weight": ("F32", [len(w), D], [v for r in w for v in r]),
            "layers.0.bias": ("F32", [len(b)], b)}


def lin_apply(w, b, x):
    return [sum(wi * xi for wi, xi in zip(r, x)) + bb for r, bb in zip(w, b)]


def f32(v):
    return struct.unpack("<f", struct.pack("<f", v))[0]


# hosted binary members: A (2, informative: their logit follows the label rule
# 2 x0 - x1), B (3, noise); one 3-class family pair for the softmax path
U = [2.0, -1.0, 0.0, 0.0]
BIN_MEMBERS = {
    "a1": ([[1.8, -0.9, 0.1, 0.0]], [0.1]),
    "a2": ([[2.2, -1.2, 0.0, -0.1]], [-0.1]),
    "b1": ([[0.1, 0.3, -0.5, 0.2]], [0.0]),
    "b2": ([[-0.3, 0.1, 0.4, 0.6]], [0.2]),
    "b3": ([[0.2, -0.2, 0.3, -0.4]], [-0.3]),
}
TRI_MEMBERS = {
    "t1": ([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]], [0.0, 0.1, -0.1]),
    "t2": ([[0.5, 0.5, 0, 0], [0, 0.3, 0.2, 0], [0.1, 0, 0, 1]], [0.2, 0.0, 0.0]),
    "t3": ([[-1, 0, 0.5, 0], [0, 0, 0, 0.7], [0.3, 0.3, 0.3, 0]], [0.0, 0.0, 0.5]),
}
BIN_SIZES = [2, 3]
BROKEN = ("badcfg", "badkey", "selfish")


def bin_config(policy=None):
    c = {"kind": "ensemble", "member_output": "logit", "classes": 1,
         "families": [{"name": "fa", "members": [{"model": "a1"}, {"model": "a2"}]},
                      {"name": "fb", "members": [{"model": "b1"}, {"model": "b2"},
                                                 {"model": "b3"}]}]}
    if policy:
        c["version_policy"] = policy
    return c


def hosted_logits(names, members, X):
    return [[lin_apply(*members[n], x)[0] if len(members[n][1]) == 1 else lin_apply(*members[n], x)
             for n in names] for x in X]


def labelled_rows(n, seed):
    rng = random.Random(seed)
    X = [[round(rng.gauss(0, 1), 3) for _ in range(D)] for _ in range(n)]
    y = [1 if sum(u * v for u, v in zip(U, x)) + rng.gauss(0, 0.5) > 0 else 0 for x in X]
    return X, y


def binary_body(inputs, params=None):
    """An OIP request whose tensors all travel in the binary extension.
    inputs: [(name, datatype, shape, struct-format, values)]."""
    head, blobs = [], []
    for name, dt, shape, fmt, vals in inputs:
        blob = struct.pack("<%d%s" % (len(vals), fmt), *vals)
        head.append({"name": name, "datatype": dt, "shape": shape,
                     "parameters": {"binary_data_size": len(blob)}})
        blobs.append(blob)
    j = {"inputs": head}
    if params:
        j["parameters"] = params
    js = json.dumps(j).encode()
    return js + b"".join(blobs), {"Inference-Header-Content-Length": str(len(js)),
                                  "Content-Type": "application/octet-stream"}


class Ctx:
    def __init__(self):
        self.repo = make_repo()
        for n, (w, b) in list(BIN_MEMBERS.items()) + list(TRI_MEMBERS.items()):
            write_model(self.repo, n, {"kind": "mlp", "activations": ["none"]}, linear(w, b))
        self.theta_bin = [0.7, -0.4]
        write_model(self.repo, "bin", bin_config(),
                    {"tier2.logits": ("F32", [2], self.theta_bin)})
        write_model(self.repo, "fitme", bin_config({"latest": {"num_versions": 2}}), None)
        write_model(self.repo, "busy", bin_config(), None)
        # 3 classes, hosted logits, families of 1 and 2
        write_model(self.repo, "tri_logit", {
            "kind": "ensemble", "member_output": "logit", "classes": 3,
            "families": [{"name": "one", "members": [{"model": "t1"}]},
                         {"name": "two", "members": [{"model": "t2"}, {"model": "t3"}]}]},
            {"tier2.logits": ("F32", [2], [0.3, -0.3])})
        # 3 classes, external probabilities, families of 2, 1 and 3
        self.theta_tri = [0.5, -0.2, 0.1]
        write_model(self.repo, "tri_prob", {
            "kind": "ensemble", "member_output": "probability", "classes": 3,
            "families": [{"name": "f1", "members": [{"external": "e1"}, {"external": "e2"}]},
                         {"name": "f2", "members": [{"external": "e3"}]},
                         {"name": "f3", "members": [{"external": "e4"}, {"external": "e5"},
                                                    {"external": "e6"}]}]},
            {"tier2.logits": ("F32", [3], self.theta_tri)})
        write_model(self.repo, "calext", {
            "kind": "ensemble", "member_output": "logit", "version_policy": {"latest": {"num_versions": 2}},
            "families": [{"name": "f", "members": [{"external": "e1"}, {"external": "e2"}]}]},
            None)
        write_model(self.repo, "mixed", {
            "kind": "ensemble", "member_output": "logit",
            "families": [{"name": "f", "members": [{"model": "a1"}, {"external": "outside"}]}]},
            None)
        write_model(self.repo, "ghostly", {
            "kind": "ensemble", "member_output": "logit",
            "families": [{"name": "f", "members": [{"model": "a1"}, {"model": "ghost"}]}]}, None)
        write_model(self.repo, "nested", {
            "kind": "ensemble", "member_output": "probability",
            "families": [{"name": "f", "members": [{"model": "bin"}, {"model": "a1"}]}]}, None)
        write_model(self.repo, "selfish", {
            "kind": "ensemble", "member_output": "logit",
            "families": [{"name": "f", "members": [{"model": "selfish"}]}]}, None)
        write_model(self.repo, "badcfg", {"kind": "ensemble", "member_output": "logits",
                                          "families": [{"name": "f", "members": [{"model": "a1"}]}]},
                    None)
        write_model(self.repo, "badkey", {"kind": "ensemble", "member_output": "logit",
                                          "families": [{"name": "f", "memebers": []}]}, None)
        self.d = Daemon(self.repo, ["--threads", "2"]).start(wait_ready=False)
        deadline = time.time() + 20
        while time.time() < deadline:  # the good models are READY
            idx = self.d.post("/v2/repository/index").json()
            if all(e["state"] == "READY" for e in idx if e["name"] not in BROKEN):
                break
            time.sleep(0.05)

    def daemon_logs(self):
        return self.d.logs()


def setup():
    return Ctx()


def teardown(ctx):
    ctx.d.stop()
    shutil.rmtree(ctx.repo, ignore_errors=True)


def check_close_list(got, want, what, rel=1e-5, abs_=2e-6):
    check(len(got) == len(want), "%s: %d values, want %d" % (what, len(got), len(want)))
    for i, (g, w) in enumerate(zip(got, want)):
        check(close(g, w, rel, abs_), "%s[%d]: %r != %r" % (what, i, g, w))


def flat(v):
    return [x for r in v for x in (flat(r) if isinstance(r[0], list) else r)] \
        if v and isinstance(v[0], list) else list(v)


# ---- infer ---------------------------------------------------------------------------------

def test_metadata(c):
    j = check_status(c.d.get("/v2/models/bin"), 200).json()
    check(j["platform"] == "ensemble", j)
    check([i["name"] for i in j["inputs"]] == ["features", "member_outputs"], j)
    check(j["inputs"][1]["shape"] == [-1, 5], j)
    check([o["name"] for o in j["outputs"]] == ["probability", "family_probability"], j)
    check(j["outputs"][1]["shape"] == [-1, 2], j)
    j = check_status(c.d.get("/v2/models/tri_prob"), 200).json()
    check([i["name"] for i in j["inputs"]] == ["member_outputs"], j)  # external: no features
    check(j["inputs"][0]["shape"] == [-1, 6, 3] and j["outputs"][1]["shape"] == [-1, 3, 3], j)


def test_infer_hosted_binary(c):
    X, _ = labelled_rows(7, 1)
    r = check_status(c.d.infer("bin", [tensor("features", X)]), 200)
    names = ["a1", "a2", "b1", "b2", "b3"]
    Z = hosted_logits(names, BIN_MEMBERS, X)
    y, P = two_tier(Z, BIN_SIZES, c.theta_bin, True, 1)
    p = output(r, "probability")
    check(p["shape"] == [7] and p["datatype"] == "FP32", p)
    check_close_list(p["data"], y, "probability")
    fp = output(r, "family_probability")
    check(fp["shape"] == [7, 2], fp)
    check_close_list(flat(fp["data"]), flat(P), "family_probability")
    # the same numbers when the caller sends the member outputs itself
    r2 = check_status(c.d.infer("bin", [tensor("member_outputs", Z)]), 200)
    check_close_list(output(r2, "probability")["data"], y, "probability from member_outputs")
    # FP64 member outputs are converted
    r3 = check_status(c.d.infer("bin", [tensor("member_outputs", Z, datatype="FP64")]), 200)
    check_close_list(output(r3, "probability")["data"], y, "probability from FP64")


def test_infer_hosted_three_classes(c):
    X, _ = labelled_rows(5, 2)
    r = check_status(c.d.infer("tri_logit", [tensor("features", X)]), 200)
    Z = hosted_logits(["t1", "t2", "t3"], TRI_MEMBERS, X)
    y, P = two_tier(Z, [1, 2], [f32(0.3), f32(-0.3)], True, 3)
    p = output(r, "probability")
    check(p["shape"] == [5, 3], p)
    check_close_list(flat(p["data"]), flat(y), "probability")
    for row in y:
        check(close(sum(row), 1.0), row)
    fp = output(r, "family_probability")
    check(fp["shape"] == [5, 2, 3], fp)
    check_close_list(flat(fp["data"]), flat(P), "family_probability")


def random_probs(rng, B, n, C):
    rows = []
    for _ in range(B):
        row = []
        for _ in range(n):
            v = [rng.random() + 0.01 for _ in range(C)]
            s = sum(v)
            row.append([f32(x / s) for x in v])
        rows.append(row)
    return rows


def test_infer_external_probabilities(c):
    rng = random.Random(3)
    Z = random_probs(rng, 6, 6, 3)
    r = check_status(c.d.infer("tri_prob", [tensor("member_outputs", Z)]), 200)
    y, P = two_tier(Z, [2, 1, 3], [f32(t) for t in c.theta_tri], False, 3)
    check_close_list(flat(output(r, "probability")["data"]), flat(y), "probability")
    check_close_list(flat(output(r, "family_probability")["data"]), flat(P), "family_probability")
    # a single output asked for
    r = check_status(c.d.infer("tri_prob", [tensor("member_outputs", Z)],
                               outputs=[{"name": "probability"}]), 200)
    check([o["name"] for o in r.json()["outputs"]] == ["probability"], r)


def test_infer_mixed_members(c):
    X, _ = labelled_rows(3, 4)
    Z = [[lin_apply(*BIN_MEMBERS["a1"], x)[0], 0.25 * i] for i, x in enumerate(X)]
    r = check_status(c.d.infer("mixed", [tensor("member_outputs", Z)]), 200)
    y, _ = two_tier(Z, [2], [0.0], True, 1)
    check_close_list(output(r, "probability")["data"], y, "probability")
    # features alone cannot score the external member
    check_status(c.d.infer("mixed", [tensor("features", X)]), 400, "outside")


# ---- 400s and 503s ------------------------------------------------------------------------

def test_errors_shape_and_count(c):
    X, _ = labelled_rows(3, 5)
    Z = hosted_logits(["a1", "a2", "b1", "b2", "b3"], BIN_MEMBERS, X)
    r = check_status(c.d.infer("bin", [tensor("member_outputs", [z[:4] for z in Z])]), 400,
                     "member_outputs")
    check("[B, 5]" in r.json()["error"] and "[3, 4]" in r.json()["error"], r)
    check_status(c.d.infer("bin", [tensor("member_outputs", [[v] for v in Z[0]])]), 400,
                 "member_outputs")  # [5, 1]: rows and members swapped
    # 3-class members sent as [B, C, n] (order of the axes wrong)
    rng = random.Random(6)
    Z3 = random_probs(rng, 2, 6, 3)
    swapped = [[[Z3[b][m][k] for m in range(6)] for k in range(3)] for b in range(2)]
    check_status(c.d.infer("tri_prob", [tensor("member_outputs", swapped)]), 400,
                 "[B, 6, 3]")
    check_status(c.d.infer("tri_prob", [tensor("member_outputs", [z[:5] for z in Z3])]), 400,
                 "member_outputs")
    # features of the wrong width reach the members, whose error names them
    check_status(c.d.infer("bin", [tensor("features", [x[:3] for x in X])]), 400, "member 'a1'")
    check_status(c.d.infer("bin", [tensor("features", [1.0, 2.0, 3.0, 4.0])]), 400,
                 "input 'features'")


def test_errors_missing_inputs(c):
    check_status(c.d.infer("bin", [tensor("something", [[1.0]])]), 400, "features")
    check_status(c.d.infer("tri_prob", [tensor("features", [[1.0] * D])]), 400,
                 "member_outputs")
    X, _ = labelled_rows(2, 7)
    Z = hosted_logits(["a1", "a2", "b1", "b2", "b3"], BIN_MEMBERS, X)
    check_status(c.d.infer("bin", [tensor("features", X), tensor("member_outputs", Z)]), 400,
                 "not both")


def test_errors_nan_and_inf(c):
    Z = [0.1, 0.2, -0.3, 0.4, 0.5, 0.0, 0.1, float("nan"), 0.2, 0.3]
    body, h = binary_body([("member_outputs", "FP32", [2, 5], "f", Z)])
    r = check_status(c.d.post("/v2/models/bin/infer", body, headers=h), 400, "NaN")
    msg = r.json()["error"]
    check("member_outputs" in msg and "row 1" in msg and "'b1'" in msg and "'fb'" in msg, msg)
    Z[7] = float("inf")
    body, h = binary_body([("member_outputs", "FP32", [2, 5], "f", Z)])
    check_status(c.d.post("/v2/models/bin/infer", body, headers=h), 400, "infinite")


def test_errors_probabilities(c):
    rng = random.Random(8)
    Z = random_probs(rng, 3, 6, 3)
    Z[2][4] = [1.2, -0.1, -0.1]
    r = check_status(c.d.infer("tri_prob", [tensor("member_outputs", Z)]), 400, "outside [0, 1]")
    check("row 2" in r.json()["error"] and "'e5'" in r.json()["error"], r)
    Z[2][4] = [0.5, 0.4, 0.4]
    check_status(c.d.infer("tri_prob", [tensor("member_outputs", Z)]), 400, "sum to")


def test_errors_labels(c):
    X, y = labelled_rows(6, 9)
    y[3] = 2
    check_status(c.d.post("/v2/models/bin/evaluate",
                          {"inputs": [tensor("features", X), tensor("labels", y, datatype="INT32")]}),
                 400, "row 3")
    y[3] = 1
    check_status(c.d.post("/v2/models/bin/evaluate",
                          {"inputs": [tensor("features", X), tensor("labels", y[:5], datatype="INT32")]}),
                 400, "labels")
    check_status(c.d.post("/v2/models/bin/evaluate", {"inputs": [tensor("features", X)]}), 400,
                 "labels")
    yf = [float(v) for v in y]
    yf[2] = 0.5
    check_status(c.d.post("/v2/models/bin/evaluate",
                          {"inputs": [tensor("features", X), tensor("labels", yf, datatype="FP32")]}),
                 400, "labels")
    rng = random.Random(10)
    Z = random_probs(rng, 2, 6, 3)
    check_status(c.d.post("/v2/models/tri_prob/fit",
                          {"inputs": [tensor("member_outputs", Z),
                                      tensor("labels", [0, 3], datatype="INT64")]}),
                 400, "class index")
    check_status(c.d.post("/v2/models/bin/fit",
                          {"inputs": [tensor("features", X), tensor("labels", y, datatype="INT32")],
                           "parameters": {"learning_rate": -1}}), 400, "learning_rate")


def test_unavailable_member(c):
    X, y = labelled_rows(4, 11)
    check_status(c.d.infer("ghostly", [tensor("features", X)]), 503, "ghost")
    check_status(c.d.post("/v2/models/ghostly/fit",
                          {"inputs": [tensor("features", X), tensor("labels", y, datatype="INT32")]}),
                 503, "ghost")
    # an external caller can still score it with member outputs
    check_status(c.d.infer("ghostly", [tensor("member_outputs", [[0.1, 0.2]] * 4)]), 200)


def test_bad_configs(c):
    idx = c.d.post("/v2/repository/index").json()
    by = {e["name"]: e for e in idx}
    check(by["badcfg"]["state"] == "UNAVAILABLE" and "member_output" in by["badcfg"]["reason"], by)
    check(by["badkey"]["state"] == "UNAVAILABLE" and "memebers" in by["badkey"]["reason"], by)
    check(by["selfish"]["state"] == "UNAVAILABLE" and "its own member" in by["selfish"]["reason"],
          by)


def test_nested_ensemble_refused(c):
    check_status(c.d.infer("nested", [tensor("features", [[0.0] * D])]), 400,
                 "itself an ensemble")


# ---- fit and evaluate --------------------------------------------------------------------

def log_loss(ys, labels):
    eps = 1e-7
    s = 0.0
    for p, t in zip(ys, labels):
        q = p if t == 1 else 1 - p
        s -= math.log(min(max(q, eps), 1 - eps))
    return s / len(ys)


def test_fit_new_version_served(c):
    X, y = labelled_rows(300, 12)
    body = {"inputs": [tensor("features", X), tensor("labels", y, datatype="INT64")],
            "parameters": {"epochs": 200, "learning_rate": 0.05, "seed": 3}}
    ev1 = check_status(c.d.post("/v2/models/fitme/evaluate", body), 200).json()
    check(ev1["model_version"] == "1" and ev1["rows"] == 300, ev1)
    Z = hosted_logits(["a1", "a2", "b1", "b2", "b3"], BIN_MEMBERS, X)
    yu, _ = two_tier(Z, BIN_SIZES, [0.0, 0.0], True, 1)
    check(close(ev1["metrics"]["log_loss"], log_loss(yu, y), 1e-4), (ev1, log_loss(yu, y)))
    check(close(ev1["uniform"]["log_loss"], ev1["metrics"]["log_loss"]), ev1)
    check(set(ev1["families"]) == {"fa", "fb"}, ev1)
    for k in ("log_loss", "auc", "accuracy", "f1"):
        check(isinstance(ev1["metrics"][k], float), (k, ev1))

    r = check_status(c.d.post("/v2/models/fitme/fit", body), 200).json()
    check(r["model_version"] == "2" and r["parent_version"] == 1, r)
    check(r["rows"] == {"train": 240, "validation": 60}, r)
    alpha, theta = r["weights"]["alpha"], r["weights"]["theta"]
    check(alpha[0] > 0.7, "the informative family should gain weight: %r" % alpha)
    check_close_list(alpha, softmax(theta), "alpha = softmax(theta)")
    m = r["metrics"]
    check(set(m) == {"before", "after", "validation", "served", "families", "uniform"}, m)
    check(m["after"]["log_loss"] < m["before"]["log_loss"], m)
    # version 1 is uniform: what it serves is the uniform "before"
    for k in ("log_loss", "auc", "accuracy", "f1"):
        check(close(m["served"][k], m["before"][k], 1e-9, 1e-12), (k, m))
    check(m["validation"]["log_loss"] < m["uniform"]["log_loss"], m)
    check(1 <= r["epochs_run"] <= 200, r)

    meta = check_status(c.d.get("/v2/models/fitme"), 200).json()
    check(meta["versions"] == ["1", "2"], meta)
    inf = check_status(c.d.infer("fitme", [tensor("features", X[:5])]), 200)
    check(inf.json()["model_version"] == "2", inf)
    want, _ = two_tier(Z[:5], BIN_SIZES, theta, True, 1)
    check_close_list(output(inf, "probability")["data"], want, "probability of version 2")

    ev2 = check_status(c.d.post("/v2/models/fitme/evaluate", body), 200).json()
    check(ev2["model_version"] == "2", ev2)
    ev1b = check_status(c.d.post("/v2/models/fitme/versions/1/evaluate", body), 200).json()
    check(ev1b["model_version"] == "1" and ev1b["metrics"] == ev1["metrics"], ev1b)
    check(ev2["metrics"]["log_loss"] < ev1b["metrics"]["log_loss"], (ev1b, ev2))

    with open(os.path.join(c.repo, "fitme", "2", "version.json")) as f:
        info = json.load(f)
    check(info["parent_version"] == 1 and len(info["sha256"]) == 64, info)
    check(len(info["sha256_training_data"]) == 64 and info["rows"] == 300, info)
    check(info["fit"]["epochs"] == 200 and info["fit"]["seed"] == 3, info)
    check(close(info["metrics"]["after"]["log_loss"], m["after"]["log_loss"]), info)

    # the same data again: same training-data digest; a different label: another
    r2 = check_status(c.d.post("/v2/models/fitme/fit", body), 200).json()
    check(r2["model_version"] == "3" and r2["parent_version"] == 2, r2)
    with open(os.path.join(c.repo, "fitme", "3", "version.json")) as f:
        info3 = json.load(f)
    check(info3["sha256_training_data"] == info["sha256_training_data"], info3)
    check_close_list(r2["weights"]["theta"], theta, "a fit from uniform is reproducible", 1e-6)
    # "before" is the uniform theta on the training rows, not the parent's:
    # the same rows and split as the first fit give the same numbers, while
    # "served" scores version 2's learned theta on those rows, which is the
    # first fit's "after"
    m2 = r2["metrics"]
    for k in ("log_loss", "auc", "accuracy", "f1"):
        check(close(m2["before"][k], m["before"][k], 1e-9, 1e-12), (k, m2["before"], m["before"]))
        check(close(m2["served"][k], m["after"][k], 1e-9, 1e-12), (k, m2["served"], m["after"]))
    check(m2["served"]["log_loss"] < m2["before"]["log_loss"] - 0.01, m2)
    check(info3["metrics"]["before"] == m2["before"] and "served" in info3["metrics"], info3)
    meta = check_status(c.d.get("/v2/models/fitme"), 200).json()
    check(meta["versions"] == ["2", "3"], meta)  # latest 2: version 1 retired


def test_fit_external_three_classes(c):
    rng = random.Random(13)
    B = 120
    labels = [rng.randrange(3) for _ in range(B)]
    Z = []
    for t in labels:  # family f1 knows the class, f2 and f3 guess
        row = []
        for m in range(6):
            v = [rng.random() for _ in range(3)]
            if m < 2:
                v[t] += 3.0
            s = sum(v)
            row.append([x / s for x in v])
        Z.append(row)
    body = {"inputs": [tensor("member_outputs", Z), tensor("labels", labels, datatype="INT32")],
            "parameters": {"epochs": 100, "learning_rate": 0.1, "validation_fraction": 0}}
    r = check_status(c.d.post("/v2/models/tri_prob/fit", body), 200).json()
    check(r["rows"] == {"train": 120, "validation": 0}, r)
    check(r["metrics"]["validation"]["log_loss"] is None, r)  # no rows: null
    check(r["weights"]["alpha"][0] > 0.6, r)
    check(r["metrics"]["after"]["log_loss"] < r["metrics"]["before"]["log_loss"], r)
    check(r["metrics"]["after"]["accuracy"] > 0.9, r)


def test_concurrent_fit_conflict(c):
    rng = random.Random(14)
    N = 20000
    Z = [rng.gauss(0, 2) for _ in range(N * 5)]
    labels = [rng.randrange(2) for _ in range(N)]
    body, h = binary_body([("member_outputs", "FP32", [N, 5], "f", Z),
                           ("labels", "INT32", [N], "i", labels)],
                          {"epochs": 1000000, "patience": 0, "batch_size": 64,
                           "timeout_ms": 4000})
    small = {"inputs": [tensor("member_outputs", [[0.0] * 5] * 2),
                        tensor("labels", [0, 1], datatype="INT32")]}
    # polls carry a bad label: one that gets the claim fails (400) without a version
    poll = {"inputs": small["inputs"][:1] + [tensor("labels", [0, 2], datatype="INT32")]}
    for attempt in range(5):
        first = {}

        def long_fit():
            first["r"] = c.d.post("/v2/models/busy/fit", body, headers=h, timeout=120)

        t = threading.Thread(target=long_fit)
        t.start()
        seen = None
        while t.is_alive():
            r = c.d.post("/v2/models/busy/fit", poll)
            if r.status == 409:
                seen = r
                break
            time.sleep(0.02)
        t.join()
        # a poll that arrived before the long fit held the claim itself, and
        # the long fit was the one refused: start over
        if not (seen is None and first["r"].status == 409):
            break
    check(seen is not None, "no 409 while the first fit ran; it answered %r" % first.get("r"))
    check_status(seen, 409, "already running")
    # the abandoned fit stopped at its deadline between epochs, leaving no version
    check_status(first["r"], 504, "deadline")
    check(check_status(c.d.get("/v2/models/busy"), 200).json()["versions"] == ["1"])
    check(not os.path.exists(os.path.join(c.repo, "busy", "2")))
    # and the model takes fits again, once the abandoned one has noticed its
    # deadline (the 504 may be answered just before the worker stops)
    deadline = time.time() + 10
    r = c.d.post("/v2/models/busy/fit", small)
    while r.status == 409 and time.time() < deadline:
        time.sleep(0.05)
        r = c.d.post("/v2/models/busy/fit", small)
    check_status(r, 200)


def ref_temperature(y, labels):
    """The log-loss-minimising T by golden-section search in log T (no
    derivatives): an independent check of the daemon's Newton fit."""
    eps = 1e-7
    z = [math.log(min(max(p, eps), 1 - eps)) - math.log(1 - min(max(p, eps), 1 - eps)) for p in y]

    def loss(u):
        T = math.exp(u)
        s = 0.0
        for zi, t in zip(z, labels):
            a = zi / T
            sp = max(a, 0) + math.log1p(math.exp(-abs(a)))
            s += sp - t * a
        return s / len(z)
    a, b, g = math.log(0.01), math.log(100), (math.sqrt(5) - 1) / 2
    for _ in range(120):
        c_, d_ = b - g * (b - a), a + g * (b - a)
        if loss(c_) < loss(d_):
            b = d_
        else:
            a = c_
    return math.exp((a + b) / 2)


def test_calibrate_temperature(c):
    """Temperature scaling: members four times too sure; calibrate fits T
    (checked against a golden-section search here), writes version 2, which
    serves sigmoid(logit(y) / T) and whose evaluate shows the lower ECE in
    its reliability bins (15 by default)."""
    rng = random.Random(21)
    rows, labels = [], []
    for _ in range(300):
        t = rng.uniform(-2, 2)
        labels.append(1 if rng.random() < sigmoid(t) else 0)
        rows.append([4 * t + rng.gauss(0, 0.1), 4 * t + rng.gauss(0, 0.1)])
    rows = [[f32(v) for v in r] for r in rows]
    body = {"inputs": [tensor("member_outputs", rows), tensor("labels", labels, datatype="INT32")]}
    ev1 = check_status(c.d.post("/v2/models/calext/evaluate", body), 200).json()
    cal1 = ev1["calibration"]
    check(cal1["temperature"] == 1.0 and cal1["bins"] == 15 and len(cal1["reliability"]) == 15, cal1)
    check(sum(b["count"] for b in cal1["reliability"]) == 300, cal1)
    r = check_status(c.d.post("/v2/models/calext/calibrate", body), 200).json()
    check(r["model_version"] == "2" and r["parent_version"] == 1, r)
    T = r["calibration"]["temperature"]
    y = [(sigmoid(a) + sigmoid(b)) / 2 for a, b in rows]
    want = ref_temperature(y, labels)
    check(abs(T - want) <= 1e-4 * want, (T, want))
    check(r["reliability"]["after"]["ece"] < r["reliability"]["before"]["ece"], r["reliability"])
    check(r["metrics"]["after"]["log_loss"] < r["metrics"]["before"]["log_loss"], r["metrics"])
    check(r["metrics"]["after"]["auc"] == r["metrics"]["before"]["auc"], r["metrics"])
    # version 2 serves the scaled probability
    inf = check_status(c.d.post("/v2/models/calext/infer",
                                {"inputs": [tensor("member_outputs", [[2.0, 1.0]])]}), 200)
    p = (sigmoid(2.0) + sigmoid(1.0)) / 2
    check_close_list(output(inf, "probability")["data"],
                     [sigmoid((math.log(p) - math.log(1 - p)) / f32(T))], "probability", rel=1e-5)
    ev2 = check_status(c.d.post("/v2/models/calext/evaluate",
                                dict(body, parameters={"ece_bins": 5})), 200).json()
    check(abs(ev2["calibration"]["temperature"] - T) < 1e-6 and ev2["calibration"]["bins"] == 5,
          ev2["calibration"])
    check(ev2["calibration"]["ece"] < cal1["ece"], (ev2["calibration"], cal1))
    # version 1 still serves unscaled
    v1 = check_status(c.d.post("/v2/models/calext/versions/1/evaluate", body), 200).json()
    check(v1["calibration"]["temperature"] == 1.0, v1["calibration"])
    # refusals: by name, as JSON errors
    e = check_status(c.d.post("/v2/models/calext/calibrate",
                              dict(body, parameters={"method": "platt"})), 400).json()
    check("platt" in e["error"], e)
    e = check_status(c.d.post("/v2/models/calext/calibrate",
                              dict(body, parameters={"bins": 3})), 400).json()
    check("bins" in e["error"], e)
    e = check_status(c.d.post("/v2/models/calext/evaluate",
                              dict(body, parameters={"ece_bins": 100000})), 400).json()
    check("ece_bins" in e["error"], e)
    e = check_status(c.d.post("/v2/models/calext/calibrate",
                              {"inputs": [tensor("member_outputs", rows)]}), 400).json()
    check("labels" in e["error"], e)
    # a fit from the calibrated version: "served" scores what version 2
    # serves (its temperature included); the new version drops the temperature
    f = check_status(c.d.post("/v2/models/calext/fit", dict(body, parameters={
        "epochs": 3, "validation_fraction": 0})), 200).json()
    check(abs(f["metrics"]["served"]["log_loss"] - ev2["metrics"]["log_loss"]) < 1e-9,
          (f["metrics"]["served"], ev2["metrics"]))
    ev3 = check_status(c.d.post("/v2/models/calext/evaluate", body), 200).json()
    check(ev3["model_version"] == "3" and ev3["calibration"]["temperature"] == 1.0, ev3)


def test_clean_exit(c):
    """Last: the daemon drains and exits 0 (under ASan a leaked version or
    member handle would make the exit status non-zero)."""
    rc = c.d.stop()
    check(rc == 0, "tallyd exited with %r:\n%s" % (rc, c.d.logs()[-3000:]))
    check("ERROR: " not in c.d.logs(), c.d.logs()[-3000:])


if __name__ == "__main__":
    run_tests(collect(globals()), setup, teardown)
