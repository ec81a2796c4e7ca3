"""Integration tests of the quantile_ensemble kind over HTTP: infer with
external and hosted bases against a Python computation of the aggregators,
the non-crossing guarantee, fit (each of the six aggregators, a new version
served at once, lower held-out loss), calibrate (coverage, too few rows),
evaluate, and the 400s. Standard library only."""
import json
import math
import os
import random
import struct
import sys

from harness import (ROOT, Daemon, check, check_status, close, collect, make_repo, output,
                     run_tests, tensor, write_model)

sys.path.insert(0, os.path.join(ROOT, "deploy", "gen"))
import gen_quantile as gq  # noqa: E402

L3 = [0.25, 0.5, 0.75]
L5 = [0.1, 0.3, 0.5, 0.7, 0.9]


def softmax(v):
    m = max(v)
    e = [math.exp(x - m) for x in v]
    s = sum(e)
    return [x / s for x in e]


def aggregate(gran, logits, z, simplex=True):
    """The reference aggregators: z[j][l] -> q[k] (qagg.h's formulas)."""
    M, K = len(z), len(z[0])
    if gran == "coarse":
        w = softmax(logits) if simplex else logits
        return [sum(w[j] * z[j][k] for j in range(M)) for k in range(K)]
    if gran == "medium":  # logits[j*K + k]
        q = []
        for k in range(K):
            col = [logits[j * K + k] for j in range(M)]
            w = softmax(col) if simplex else col
            q.append(sum(w[j] * z[j][k] for j in range(M)))
        return q
    q = []  # fine: logits[(j*K + l)*K + k]
    flat = [z[j][l] for j in range(M) for l in range(K)]
    for k in range(K):
        col = [logits[r * K + k] for r in range(M * K)]
        w = softmax(col) if simplex else col
        q.append(sum(w[r] * flat[r] for r in range(M * K)))
    return q


def logit_shape(gran, M, K):
    return {"coarse": [M], "medium": [M, K], "fine": [M * K, K]}[gran]


def ext_config(levels, M, gran="medium", scope="global", simplex=True, monotone="none", **kw):
    c = {"kind": "quantile_ensemble", "levels": levels,
         "bases": [{"external": "e%d" % j} for j in range(M)],
         "aggregator": {"granularity": gran, "scope": scope, "simplex": simplex},
         "monotone": monotone}
    c.update(kw)
    return c


def sorted_rows(rng, B, M, K, spread=1.0):
    """Base quantiles that are each non-crossing (like real bases)."""
    z = []
    for _ in range(B):
        z.append([sorted(rng.gauss(0, spread) for _ in range(K)) for _ in range(M)])
    return z


class Ctx:
    pass


RNG = random.Random(7)
LOGITS = {}


def setup():
    c = Ctx()
    repo = make_repo()
    gq.generate(repo)
    M, K = 2, 3
    for gran in ("coarse", "medium", "fine"):
        shape = logit_shape(gran, M, K)
        n = 1
        for s in shape:
            n *= s
        LOGITS[gran] = [round(RNG.uniform(-2, 2), 3) for _ in range(n)]
        write_model(repo, "q_" + gran, ext_config(L3, M, gran),
                    {"aggregator.logits": ("F32", shape, LOGITS[gran])})
    # adversarial free fine weights: output level k reads the base level K-1-k
    adv = [0.0] * (M * K * K)
    for j in range(M):
        for l in range(K):
            adv[(j * K + l) * K + (K - 1 - l)] = 1.0 / M
    for mono in ("none", "sort", "isotonic", "median"):
        write_model(repo, "q_adv_" + mono, ext_config(L3, M, "fine", simplex=False, monotone=mono),
                    {"aggregator.logits": ("F32", [M * K, K], adv)})
    write_model(repo, "q_local", ext_config(L3, M, "medium", "local", features=2), {})
    write_model(repo, "q_six", ext_config(L5, 3, "coarse", features=2), {})
    mixed = ext_config(L3, 3, "coarse", features=2)
    mixed["bases"] = [{"external": "x0"}, {"linear": "lin"}, {"external": "x1"}]
    write_model(repo, "q_mixed", mixed,
                {"bases.lin.weight": ("F32", [3, 2], [1, 0, 1, 1, 0, 2]),
                 "bases.lin.bias": ("F32", [3], [-1, 0, 1])})
    # two models that host each other: a cycle, refused at md_run_hosted's depth limit
    for me, other in (("cyc_a", "cyc_b"), ("cyc_b", "cyc_a")):
        cfg = ext_config(L3, 1, "coarse", features=2)
        cfg["bases"] = [{"model": other}]
        write_model(repo, me, cfg, {"aggregator.logits": ("F32", [1], [0.0])})
    c.repo = repo
    c.d = Daemon(repo).start()
    c.daemon_logs = c.d.logs
    return c


def teardown(c):
    c.d.stop()


def bq(z):
    B, M, K = len(z), len(z[0]), len(z[0][0])
    return tensor("base_quantiles", [v for r in z for b in r for v in b], [B, M, K])


def quantiles(r):
    check_status(r, 200)
    o = output(r, "quantiles")
    K = o["shape"][1]
    d = o["data"]
    return [d[i:i + K] for i in range(0, len(d), K)]


# ---- infer -----------------------------------------------------------------

def test_infer_external_matches_reference(c):
    z = sorted_rows(RNG, 5, 2, 3)
    for gran in ("coarse", "medium", "fine"):
        q = quantiles(c.d.infer("q_" + gran, [bq(z)]))
        for b in range(5):
            want = aggregate(gran, LOGITS[gran], z[b])
            for k in range(3):
                check(close(q[b][k], want[k], 1e-5, 1e-5), (gran, b, k, q[b], want))


def test_hosted_cycle_refused(c):
    """A base that (through others) hosts its own model: a 400 that says so,
    not a stack overflow; the daemon keeps serving."""
    r = c.d.infer("cyc_a", [tensor("features", [[0.5, -0.5]], [1, 2])])
    check_status(r, 400, "nest more than")
    check("cyc_" in r.json()["error"], r.json())
    check_status(c.d.get("/v2/health/ready"), 200)


def test_infer_hosted_matches_reference(c):
    xs, _ = gq.rows(7, 11)
    body = gq.request(xs)
    q = quantiles(c.d.post("/v2/models/quantile_demo/infer", body))
    names = ["qbase_a", "qbase_b", "qbase_c", "lin"]
    for b, x in enumerate(xs):
        want = [sum(v) / 4 for v in zip(*[gq.base_quantiles(n, x) for n in names])]
        for k in range(9):
            check(close(q[b][k], want[k], 1e-4, 1e-4), (b, k, q[b], want))


def test_infer_mixed_linear_and_external(c):
    # bases x0 (external), lin (linear in this model's weights), x1 (external);
    # base_quantiles carries only the external ones, in config order
    x = [[0.5, -1.0], [2.0, 1.0]]
    ext = [[[0, 1, 2], [3, 4, 5]], [[-1, 0, 1], [1, 2, 3]]]
    q = quantiles(c.d.infer("q_mixed", [bq(ext), tensor("features", x)]))
    for b in range(2):
        lin = [x[b][0] - 1, x[b][0] + x[b][1], 2 * x[b][1] + 1]
        for k in range(3):
            want = (ext[b][0][k] + lin[k] + ext[b][1][k]) / 3
            check(close(q[b][k], want, 1e-5, 1e-5), (b, k, q[b], want))


def test_monotone_never_crosses(c):
    z = sorted_rows(RNG, 20, 2, 3, spread=3.0)
    raw = quantiles(c.d.infer("q_adv_none", [bq(z)]))
    check(any(r[0] > r[2] for r in raw), "the adversarial weights should cross without a fix")
    for mono in ("sort", "isotonic", "median"):
        q = quantiles(c.d.infer("q_adv_" + mono, [bq(z)]))
        for r, rr in zip(q, raw):
            check(all(r[k] <= r[k + 1] for k in range(2)), (mono, r))
            if mono == "sort":
                check(all(close(a, b) for a, b in zip(r, sorted(rr))), (r, rr))
            if mono == "isotonic":
                check(close(sum(r), sum(rr), 1e-5, 1e-4), "PAV keeps the row mean")


# ---- errors ----------------------------------------------------------------

def test_errors_400(c):
    z = sorted_rows(RNG, 2, 2, 3)
    check_status(c.d.infer("q_medium", [bq(z)], parameters={"levels": [0.1, 0.5, 0.9]}), 400,
                 "levels mismatch")
    check_status(c.d.infer("q_medium", [bq(z)], parameters={"levels": L3}), 200)
    check_status(c.d.infer("q_medium", [bq(sorted_rows(RNG, 2, 3, 3))]), 400, "external bases")
    check_status(c.d.infer("q_medium", [bq(sorted_rows(RNG, 2, 2, 4))]), 400, "K=3 levels")
    check_status(c.d.infer("q_medium", []), 400, "base_quantiles")
    check_status(c.d.infer("q_local", [bq(z)]), 400, "missing input 'features'")
    check_status(c.d.infer("q_local", [bq(z), tensor("features", [[1.0, 2.0, 3.0]] * 2)]), 400,
                 "features")
    check_status(c.d.infer("q_local", [bq(z), tensor("features", [[1.0, 2.0]] * 3)]), 400,
                 "features")
    check_status(c.d.infer("quantile_demo", [bq(z), tensor("features", [[1.0] * 4] * 2)]), 400,
                 "not accepted")
    # NaN can only arrive as binary data (JSON has no NaN)
    vals = [v for r in z for b in r for v in b]
    vals[4] = float("nan")
    raw = struct.pack("<%df" % len(vals), *vals)
    js = json.dumps({"inputs": [{"name": "base_quantiles", "shape": [2, 2, 3], "datatype": "FP32",
                                 "parameters": {"binary_data_size": len(raw)}}]}).encode()
    r = c.d.post("/v2/models/q_medium/infer", js + raw,
                 headers={"Inference-Header-Content-Length": str(len(js)),
                          "Content-Type": "application/octet-stream"})
    check_status(r, 400, "base_quantiles")
    check("nan" in r.json()["error"].lower() or "finite" in r.json()["error"].lower(), r)
    # targets must be finite too
    tg = struct.pack("<2f", 1.0, float("inf"))
    js = json.dumps({"inputs": [bq(z), {"name": "targets", "shape": [2], "datatype": "FP32",
                                        "parameters": {"binary_data_size": len(tg)}}]}).encode()
    r = c.d.post("/v2/models/q_medium/evaluate", js + tg,
                 headers={"Inference-Header-Content-Length": str(len(js))})
    check_status(r, 400, "targets")


def test_bad_config_and_weights_refused_at_load(c):
    M = 2
    write_model(c.repo, "q_badshape", ext_config(L3, M, "medium"),
                {"aggregator.logits": ("F32", [M], [0.0, 0.0])})
    check_status(c.d.post("/v2/repository/models/q_badshape/load"), 503, "aggregator.logits")
    write_model(c.repo, "q_badname", ext_config(L3, M, "coarse"),
                {"aggregator.logit": ("F32", [M], [0.0, 0.0])})
    check_status(c.d.post("/v2/repository/models/q_badname/load"), 503, "aggregator.logit'")
    write_model(c.repo, "q_badlevels", ext_config([0.5, 0.25, 0.75], M), {})
    check_status(c.d.post("/v2/repository/models/q_badlevels/load"), 503, "increase strictly")
    write_model(c.repo, "q_badlocal", ext_config(L3, M, "fine", "local"), {})
    check_status(c.d.post("/v2/repository/models/q_badlocal/load"), 503, "features")


# ---- fit -------------------------------------------------------------------

def test_fit_new_version_lowers_heldout_loss(c):
    xs, ys = gq.rows(600, 2)
    ev = gq.request(xs, ys)
    before = c.d.post("/v2/models/quantile_demo/evaluate", ev)
    check_status(before, 200)
    b = before.json()["metrics"]
    xs, ys = gq.rows(1500, 1)
    r = c.d.post("/v2/models/quantile_demo/fit", gq.request(xs, ys, {
        "epochs": 40, "learning_rate": 0.05, "validation_fraction": 0.2, "patience": 8, "seed": 3}))
    check_status(r, 200)
    j = r.json()
    check(j["model_version"] == "2" and j["parent_version"] == 1, j)
    m = j["metrics"]
    for key in ("before", "after", "validation", "bases", "best_base", "gain_over_best_base"):
        check(key in m, key)
    check(set(m["bases"]) == {"qbase_a", "qbase_b", "qbase_c", "lin"}, m["bases"].keys())
    check(m["after"]["pinball"] < m["before"]["pinball"], m)
    check(m["gain_over_best_base"]["wis"] > 0.05, m["gain_over_best_base"])
    check(set(m["after"]["coverage"]) == {"0.8", "0.6", "0.4", "0.2"}, m["after"]["coverage"])
    check(j["rows"] == {"train": 1200, "validation": 300}, j["rows"])
    check(1 <= j["epochs_run"] <= 40, j)
    share = j["weights"]["base_share"]
    check(close(sum(share.values()), 1.0, 1e-5, 1e-5), share)
    check(share["qbase_b"] + share["qbase_c"] > share["lin"] * 2, share)
    # served at once, and better on held-out rows
    inf = c.d.post("/v2/models/quantile_demo/infer", gq.request(xs[:2]))
    check(inf.json()["model_version"] == "2", inf)
    after = c.d.post("/v2/models/quantile_demo/evaluate", ev).json()
    check(after["model_version"] == "2", after)
    check(after["metrics"]["model"]["pinball"] < b["model"]["pinball"] - 1e-3, (after, b))
    info = json.load(open(os.path.join(c.repo, "quantile_demo", "2", "version.json")))
    check(info["rows"] == 1500 and len(info["sha256_training_data"]) == 64, info)
    check(info["fit"]["aggregator"]["granularity"] == "medium", info["fit"])


def six_data(n, seed):
    """3 external bases; base e1 is right, e0 too low, e2 too wide; x decides noise."""
    rng = random.Random(seed)
    z, x, y = [], [], []
    zs = [-1.2816, -0.5244, 0.0, 0.5244, 1.2816]
    for _ in range(n):
        f = [rng.uniform(-1, 1), rng.uniform(-1, 1)]
        s = 0.2 + abs(f[0])
        yy = f[1] + s * rng.gauss(0, 1)
        z.append([[f[1] - 0.8 + t * s for t in zs], [f[1] + t * s for t in zs],
                  [f[1] + t * 2.5 * s for t in zs]])
        x.append(f)
        y.append(yy)
    return z, x, y


def test_fit_each_of_the_six(c):
    z, x, y = six_data(400, 5)
    inputs = [bq(z), tensor("features", x), tensor("targets", y)]
    last = None
    for scope in ("global", "local"):
        for gran in ("coarse", "medium", "fine"):
            params = {"aggregator": {"granularity": gran, "scope": scope}, "epochs": 15,
                      "learning_rate": 0.02, "batch_size": 32, "seed": 1}
            if scope == "local":
                params.update({"hidden": 8, "depth": 2, "dropout": 0.1})
            r = c.d.post("/v2/models/q_six/fit", {"inputs": inputs, "parameters": params})
            check_status(r, 200)
            j = r.json()
            m = j["metrics"]
            # e1 is the true quantile function: a fit must get close to it on
            # the held-out rows, where the bases are scored too
            check(m["validation"]["rows"] == m["bases"]["e1"]["rows"] == 40, m)
            check(m["validation"]["pinball"] < 1.06 * m["best_base"]["pinball"], (gran, scope, m))
            check(j["weights"]["granularity"] == gran and j["weights"]["scope"] == scope, j)
            v = j["model_version"]
            check(v != last, v)
            last = v
            # the new version carries its own aggregator
            e = c.d.post("/v2/models/q_six/evaluate", {"inputs": inputs})
            check_status(e, 200)
            agg = e.json()["aggregator"]
            check(agg["granularity"] == gran and agg["scope"] == scope, agg)
            if scope == "local":
                check(agg["hidden"] == 8, agg)
                q = quantiles(c.d.infer("q_six", [bq(z[:3]), tensor("features", x[:3])]))
                check(len(q) == 3 and len(q[0]) == 5, q)
    # flat keys work too; the same key both ways is refused
    r = c.d.post("/v2/models/q_six/fit", {"inputs": inputs, "parameters": {
        "granularity": "coarse", "scope": "global", "simplex": False, "epochs": 2}})
    check_status(r, 200)
    check(r.json()["weights"]["simplex"] is False, r.json()["weights"])
    check_status(c.d.post("/v2/models/q_six/fit", {"inputs": inputs, "parameters": {
        "granularity": "fine", "aggregator": {"granularity": "fine"}}}), 400, "both")
    check_status(c.d.post("/v2/models/q_six/fit", {"inputs": inputs, "parameters": {
        "aggregator": {"granularity": "huge"}}}), 400, "granularity")
    check_status(c.d.post("/v2/models/q_six/fit", {"inputs": inputs[:2]}), 400, "targets")


def pooled(a, b, get):
    """A mean metric over the rows of two blocks scored on disjoint rows."""
    return (get(a) * a["rows"] + get(b) * b["rows"]) / (a["rows"] + b["rows"])


def test_fit_validation_block_on_heldout_rows(c):
    z, x, y = six_data(300, 21)
    write_model(c.repo, "q_split", ext_config(L5, 3, "medium", monotone="sort"), {})
    check_status(c.d.post("/v2/repository/models/q_split/load"), 200)
    inputs = [bq(z), tensor("targets", y)]
    ev1 = check_status(c.d.post("/v2/models/q_split/evaluate", {"inputs": inputs}), 200).json()
    r = c.d.post("/v2/models/q_split/fit", {"inputs": inputs, "parameters": {
        "epochs": 20, "learning_rate": 0.05, "validation_fraction": 0.3, "seed": 4}})
    check_status(r, 200)
    j = r.json()
    m = j["metrics"]
    check(j["rows"] == {"train": 210, "validation": 90}, j["rows"])
    check(set(m) == {"before", "after", "validation", "uniform", "bases", "best_base",
                     "gain_over_best_base"}, sorted(m))
    v = m["validation"]
    # the whole metric set, on the held-out rows
    check(set(v) == {"pinball", "wis", "interval_score", "coverage", "rows"}, v)
    check(v["rows"] == 90 and set(v["coverage"]) == set(v["interval_score"]) == {"0.8", "0.4"}, v)
    check(m["before"]["rows"] == m["after"]["rows"] == 210, m)
    check(m["uniform"]["rows"] == 90 and all(b["rows"] == 90 for b in m["bases"].values()), m)
    # after (training rows) and validation (held-out rows) split the rows the
    # fit was sent: pooled, they are what the new version scores on all of them
    ev2 = check_status(c.d.post("/v2/models/q_split/evaluate", {"inputs": inputs}), 200).json()
    check(ev2["model_version"] == j["model_version"] == "2", ev2)
    getters = [("pinball", lambda b: b["pinball"]), ("wis", lambda b: b["wis"])]
    for nom in ("0.8", "0.4"):
        getters.append(("coverage " + nom, lambda b, n=nom: b["coverage"][n]))
        getters.append(("interval_score " + nom, lambda b, n=nom: b["interval_score"][n]))
    for name, get in getters:
        check(close(pooled(m["after"], v, get), get(ev2["metrics"]["model"]), 1e-9, 1e-12),
              (name, m["after"], v, ev2["metrics"]["model"]))
    # version 1 has no weights: it serves the uniform blend, so "before" (it,
    # on the training rows) and "uniform" (held-out rows) pool to its score
    for name, get in getters:
        check(close(pooled(m["before"], m["uniform"], get), get(ev1["metrics"]["model"]), 1e-5,
                    1e-6), (name, m["before"], m["uniform"], ev1["metrics"]["model"]))
    best = m["best_base"]
    check(best["wis"] == m["bases"][best["name"]]["wis"], m)
    check(close(m["gain_over_best_base"]["wis"], 1 - v["wis"] / best["wis"], 1e-12, 1e-12), m)
    # nothing held out: no validation block; the yardsticks use the training rows
    r = c.d.post("/v2/models/q_split/fit", {"inputs": inputs, "parameters": {
        "epochs": 5, "learning_rate": 0.05, "validation_fraction": 0}})
    check_status(r, 200)
    m0 = r.json()["metrics"]
    check(m0["validation"] is None and m0["uniform"]["rows"] == 300, m0)
    for name in ("e0", "e1", "e2"):
        for key in ("pinball", "wis"):
            check(close(m0["bases"][name][key], ev1["metrics"]["bases"][name][key], 1e-9, 1e-12),
                  (name, key, m0["bases"][name], ev1["metrics"]["bases"][name]))
    # a negative margin would let levels cross unpenalised: refused, no version
    check_status(c.d.post("/v2/models/q_split/fit", {"inputs": inputs, "parameters": {
        "lambda": 1.0, "margin": -0.1}}), 400, "margin")
    check(not os.path.exists(os.path.join(c.repo, "q_split", "4")), "no version after a 400")


# ---- calibrate and evaluate ---------------------------------------------------

def test_calibrate_coverage(c):
    z, x, y = six_data(300, 9)
    body = {"inputs": [bq(z), tensor("features", x), tensor("targets", y)]}
    # a medium model with bad (narrow) intervals: calibration must widen them
    write_model(c.repo, "q_cal", ext_config(L5, 3, "medium", monotone="sort"),
                {"aggregator.logits": ("F32", [3, 5], [0, -3, 0, -3, 0, 5, 0, 0, 0, 5, 0, 0, 0,
                                                       0, 0])})
    check_status(c.d.post("/v2/repository/models/q_cal/load"), 200)
    for method in ("cqr", "cqr_asymmetric", "per_quantile"):
        body["parameters"] = {"method": method}
        r = c.d.post("/v2/models/q_cal/calibrate", body)
        check_status(r, 200)
        j = r.json()
        cov = j["metrics"]["after"]["coverage"]
        for nominal, got in cov.items():
            check(got >= float(nominal) - 1e-9, (method, nominal, got, j["metrics"]))
        check(len(j["corrections"]["lower"]) == 5, j)
        # the version served now applies the corrections
        e = c.d.post("/v2/models/q_cal/evaluate", {"inputs": body["inputs"]}).json()
        check(e["model_version"] == j["model_version"] and e.get("conformal") == method, e)
        check(close(e["metrics"]["model"]["coverage"]["0.8"], cov["0.8"]), (e, cov))
    few = {"inputs": [bq(z[:3]), tensor("features", x[:3]), tensor("targets", y[:3])]}
    check_status(c.d.post("/v2/models/q_cal/calibrate", few), 400, "too few")
    few["parameters"] = {"allow_infinite": True}
    r = c.d.post("/v2/models/q_cal/calibrate", few)
    check_status(r, 200)
    check(None in r.json()["corrections"]["upper"], r.json())  # +inf is JSON null
    check_status(c.d.post("/v2/models/q_cal/calibrate", {
        "inputs": body["inputs"], "parameters": {"method": "magic"}}), 400, "method")


def pinball(t, y, q):
    d = y - q
    return max(t * d, (t - 1) * d)


def test_evaluate_matches_reference(c):
    z = sorted_rows(RNG, 40, 2, 3)
    y = [RNG.gauss(0, 1) for _ in range(40)]
    body = {"inputs": [bq(z), tensor("targets", y)]}
    r1 = c.d.post("/v2/models/q_medium/evaluate", body)
    check_status(r1, 200)
    j = r1.json()
    m = j["metrics"]
    check(j["model_version"] == "1" and m["model"]["rows"] == 40, j)
    q = [aggregate("medium", LOGITS["medium"], zz) for zz in z]
    pin = sum(pinball(t, yy, v) for qq, yy in zip(q, y) for t, v in zip(L3, qq)) / 120
    # one central interval (0.25, 0.75): alpha 0.5, nominal 0.5
    isc = [(u - l) + 4 * max(l - yy, 0) + 4 * max(yy - u, 0) for (l, _, u), yy in zip(q, y)]
    wis = sum((0.5 * abs(yy - qq[1]) + 0.25 * i) / 1.5 for qq, yy, i in zip(q, y, isc)) / 40
    cov = sum(1 for (l, _, u), yy in zip(q, y) if l <= yy <= u) / 40
    check(close(m["model"]["pinball"], pin, 1e-5, 1e-6), (m["model"], pin))
    check(close(m["model"]["wis"], wis, 1e-5, 1e-6), (m["model"], wis))
    check(close(m["model"]["interval_score"]["0.5"], sum(isc) / 40, 1e-5, 1e-6), m["model"])
    check(close(m["model"]["coverage"]["0.5"], cov, 1e-9, 1e-9), m["model"])
    for jb, name in enumerate(("e0", "e1")):
        bp = sum(pinball(t, yy, v) for zz, yy in zip(z, y) for t, v in zip(L3, zz[jb])) / 120
        check(close(m["bases"][name]["pinball"], bp, 1e-5, 1e-6), (name, m["bases"][name], bp))
    best = min(("e0", "e1"), key=lambda n: m["bases"][n]["wis"])
    check(m["best_base"]["name"] == best, m["best_base"])
    r2 = c.d.post("/v2/models/q_medium/evaluate", body)
    check(r2.json()["metrics"] == m, "evaluate must not change the model")
    check(not os.path.exists(os.path.join(c.repo, "q_medium", "2")), "no new version")


if __name__ == "__main__":
    run_tests(collect(globals()), setup, teardown)
