"""Live coverage of quantile models under drift (docs/quantile.md, "Live
scores and adaptive conformal inference"): a stream whose noise doubles
half-way is served and its outcomes fed back to two copies of one model,
both calibrated by CQR on rows from before the shift, one with adaptive
conformal inference (ACI). The rolling coverage of the 80% interval (a
/metrics gauge) of the adaptive one returns to 0.80 +- 0.03; the static one
stays below. Twice: through the learning loop (infer with request ids, then
POST /feedback with the ids and targets, docs/learning.md) and through
evaluate's observe (callers that keep their own inputs). Also: the adaptive
state survives a restart, the gauges' names and labels, and the 400s of the
new parameters. Standard library only; about 15 s on 2 cores."""
import os
import random
import re

from harness import (Daemon, check, check_status, collect, make_repo, run_tests, tensor,
                     write_model)

LEVELS = [0.1, 0.5, 0.9]
Z80 = 1.2815515655446004  # the 0.9 quantile of N(0, 1)
N_CAL, N_BEFORE, N_AFTER = 1000, 2000, 7000
WINDOW = 2000  # rows of the rolling gauges
BATCH = 100


def config(log=False):
    # one external base whose quantiles are right for the noise before the
    # shift; the uniform aggregator passes them through
    c = {"kind": "quantile_ensemble", "levels": LEVELS, "bases": [{"external": "b"}],
         "monotone": "sort", "conformal": {"window": WINDOW},
         "version_policy": {"latest": {"num_versions": 1}}}
    if log:
        c["log"] = {"sample_rate": 1.0, "max_rows": 20000}
    return c


def rows(n, sd, rng):
    xs = [rng.uniform(-3, 3) for _ in range(n)]
    bq = [[[x - Z80, x, x + Z80]] for x in xs]
    ys = [x + sd * rng.gauss(0, 1) for x in xs]
    return bq, ys


def body(bq, ys, params=None):
    b = {"inputs": [tensor("base_quantiles", bq), tensor("targets", ys)]}
    if params is not None:
        b["parameters"] = params
    return b


class Ctx:
    def __init__(self):
        self.repo = make_repo()
        for name in ("drift_on", "drift_off", "refusals"):
            write_model(self.repo, name, config(), None)
        for name in ("loop_on", "loop_off"):
            write_model(self.repo, name, config(log=True), None)
        self.d = Daemon(self.repo).start()

    def daemon_logs(self):
        return self.d.logs()[-4000:]


def setup():
    return Ctx()


def teardown(c):
    c.d.stop()


def gauge(text, name, model, interval=None):
    lab = 'model="%s",version="2"' % model
    if interval:
        lab += ',interval="%s"' % interval
    m = re.search(r"^%s\{%s\} (\S+)$" % (re.escape(name), re.escape(lab)), text, re.M)
    return float(m.group(1)) if m else None


def feed(c, model, bq, ys):
    """Outcomes of the rows, as feedback: evaluate's "observe" runs each row
    through the version's answer of the moment, then hands it and its target
    to the live state. Returns the live block after each batch."""
    out = []
    for i in range(0, len(ys), BATCH):
        r = check_status(c.d.post("/v2/models/%s/evaluate" % model,
                                  body(bq[i:i + BATCH], ys[i:i + BATCH], {"observe": True})), 200)
        out.append(r.json()["live"])
    return out


def feed_loop(c, model, bq, ys, tag):
    """The learning loop's way: each batch is served (infer with a request
    id: its rows are logged as <id>:<row>), then its targets come back
    through POST /feedback, which hands the rows, the answers they got and
    their targets to the version's live state. Returns the live state after
    each batch."""
    out = []
    for i in range(0, len(ys), BATCH):
        rid = "%s-%d" % (tag, i)
        check_status(c.d.infer(model, [tensor("base_quantiles", bq[i:i + BATCH])], id=rid), 200)
        n = len(ys[i:i + BATCH])
        fb = check_status(c.d.post("/v2/models/%s/feedback" % model, {"inputs": [
            {"name": "id", "shape": [n], "datatype": "BYTES",
             "data": ["%s:%d" % (rid, k) for k in range(n)]},
            tensor("targets", ys[i:i + BATCH])]}), 200).json()
        check(fb["accepted"] == n, fb)
        obs = fb["observed"]
        check(len(obs) == 1 and obs[0]["rows"] == n and "error" not in obs[0], obs)
        out.append(obs[0]["result"])
    return out


def calibrate_pair(c, on, off, rng):
    bq, ys = rows(N_CAL, 1.0, rng)
    a = check_status(c.d.post("/v2/models/%s/calibrate" % on, body(
        bq, ys, {"method": "cqr", "adaptive": {"gamma": 0.01, "window": 1000}})), 200).json()
    check(a["model_version"] == "2", a)
    b = check_status(c.d.post("/v2/models/%s/calibrate" % off, body(
        bq, ys, {"method": "cqr"})), 200).json()
    check("adaptive" not in b["corrections"], b)
    check(abs(a["corrections"]["lower"][0] - b["corrections"]["lower"][0]) < 1e-6, (a, b))
    return a


def check_recovery(live_on, live_off, how):
    cov_on = [x["coverage"]["0.8"] for x in live_on]
    cov_off = [x["coverage"]["0.8"] for x in live_off]
    before = N_BEFORE // BATCH - 1  # the last batch before the shift
    miss = [x["adaptive"]["misses"][0] for x in live_on]
    first = miss[before + 1] - miss[before]
    print("%s: rolling coverage of the 80%% interval (window %d): before the shift %.3f / %.3f "
          "(adaptive / static); lowest after it %.3f / %.3f; at the end %.3f / %.3f; alpha_t at "
          "the end %.4f; misses in the %d rows after the shift %d"
          % (how, WINDOW, cov_on[before], cov_off[before], min(cov_on[before:]),
             min(cov_off[before:]), cov_on[-1], cov_off[-1], live_on[-1]["adaptive"]["alpha_t"][0],
             BATCH, first))
    check(abs(cov_on[before] - 0.8) <= 0.03 and abs(cov_off[before] - 0.8) <= 0.03,
          (cov_on[before], cov_off[before]))
    # the shift showed: the first batch after it missed far more than 20%
    # (the misses count every row ever observed; the window hides a short dip)
    check(first >= 0.3 * BATCH, miss[before - 2:before + 5])
    check(abs(cov_on[-1] - 0.8) <= 0.03, "adaptive: %r" % cov_on[-WINDOW // BATCH:])
    check(max(cov_off[-(N_AFTER - WINDOW) // BATCH:]) < 0.77,
          "static: %r" % cov_off[-(N_AFTER - WINDOW) // BATCH:])
    check(live_on[-1]["rows"] == N_BEFORE + N_AFTER, live_on[-1])
    check(live_on[-1]["rows_in_window"] == WINDOW, live_on[-1])
    check(live_on[-1]["adaptive"]["width"][0] > live_on[0]["adaptive"]["width"][0], live_on[-1])
    # WIS follows: the adaptive model scores better after the shift
    check(live_on[-1]["wis"] < live_off[-1]["wis"], (live_on[-1], live_off[-1]))
    return cov_on, cov_off


def stream(rng):
    bq, ys = rows(N_BEFORE, 1.0, rng)
    b2, y2 = rows(N_AFTER, 2.0, rng)  # the noise doubles
    return bq + b2, ys + y2


def test_drift_through_feedback(c):
    """The issue's test: served rows, outcomes through the learning loop's
    feedback, the coverage gauge in /metrics."""
    rng = random.Random(6)
    calibrate_pair(c, "loop_on", "loop_off", rng)
    sbq, sy = stream(rng)
    live_on = feed_loop(c, "loop_on", sbq, sy, "on")
    live_off = feed_loop(c, "loop_off", sbq, sy, "off")
    cov_on, cov_off = check_recovery(live_on, live_off, "feedback")
    m = check_status(c.d.get("/metrics"), 200).body.decode()
    for model, cov in (("loop_on", cov_on[-1]), ("loop_off", cov_off[-1])):
        g = gauge(m, "tallyd_quantile_rolling_coverage", model, "0.8")
        check(g is not None and abs(g - cov) < 1e-9, (model, g, cov))


def test_drift(c):
    """The same through evaluate's observe."""
    rng = random.Random(7)
    on = calibrate_pair(c, "drift_on", "drift_off", rng)
    ad = on["corrections"]["adaptive"]
    check(ad["gamma"] == 0.01 and ad["window"] == 1000 and ad["scores"] == 1000, ad)
    sbq, sy = stream(rng)
    live_on = feed(c, "drift_on", sbq, sy)
    live_off = feed(c, "drift_off", sbq, sy)
    cov_on, cov_off = check_recovery(live_on, live_off, "evaluate observe")
    m = check_status(c.d.get("/metrics"), 200).body.decode()
    for model, cov in (("drift_on", cov_on[-1]), ("drift_off", cov_off[-1])):
        g = gauge(m, "tallyd_quantile_rolling_coverage", model, "0.8")
        check(g is not None and abs(g - cov) < 1e-9, (model, g, cov))
        check(gauge(m, "tallyd_quantile_rolling_wis", model) is not None, model)
        check(gauge(m, "tallyd_quantile_rolling_pinball", model) is not None, model)
        check(gauge(m, "tallyd_quantile_observed_rows_total", model) == N_BEFORE + N_AFTER, model)
    a = gauge(m, "tallyd_quantile_adaptive_alpha", "drift_on", "0.8")
    check(a is not None and abs(a - live_on[-1]["adaptive"]["alpha_t"][0]) < 1e-9, a)
    check(gauge(m, "tallyd_quantile_adaptive_alpha", "drift_off", "0.8") is None, m[-2000:])
    check("# TYPE tallyd_quantile_rolling_coverage gauge" in m, m[-2000:])
    c.state_on = live_on[-1]["adaptive"]


def test_state_survives_restart(c):
    """a_t, the misses and the score window are in <version>/.adaptive.safetensors:
    a restarted daemon serves the same corrections."""
    before = c.state_on
    rng = random.Random(8)
    bq, ys = rows(3, 2.0, rng)
    q1 = check_status(c.d.post("/v2/models/drift_on/infer", {"inputs": [
        tensor("base_quantiles", bq)]}), 200).json()["outputs"][0]["data"]
    rc = c.d.stop()
    check(rc == 0 and "ERROR: " not in c.d.logs(), c.d.logs()[-3000:])
    state = os.path.join(c.repo, "drift_on", "2", ".adaptive.safetensors")
    check(os.path.getsize(state) > 4 * 1000, state)  # 1000 FP32 scores and more
    c.d = Daemon(c.repo).start()
    q2 = check_status(c.d.post("/v2/models/drift_on/infer", {"inputs": [
        tensor("base_quantiles", bq)]}), 200).json()["outputs"][0]["data"]
    check(q1 == q2, (q1, q2))
    ev = check_status(c.d.post("/v2/models/drift_on/evaluate", body(bq, ys)), 200).json()
    after = ev["live"]["adaptive"]
    for k in ("alpha_t", "misses", "rows", "width", "scores_taken"):
        check(after[k] == before[k], (k, before[k], after[k]))
    check(ev["live"]["rows"] == 0, ev["live"])  # the rolling window starts empty
    check("coverage" not in ev["live"], ev["live"])
    # a state file that is not this version's (here: torn) is set aside with
    # a warning; the version serves from its calibration
    rc = c.d.stop()
    check(rc == 0, c.d.logs()[-3000:])
    state = os.path.join(c.repo, "drift_on", "2", ".adaptive.safetensors")
    with open(state, "r+b") as f:
        f.truncate(os.path.getsize(state) // 2)
    c.d = Daemon(c.repo).start()
    ev = check_status(c.d.post("/v2/models/drift_on/evaluate", body(bq, ys)), 200).json()
    check(ev["live"]["adaptive"]["rows"] == 0, ev["live"])
    check(ev["live"]["adaptive"]["alpha_t"][0] == 0.2, ev["live"])
    check("does not hold this version's adaptive state" in c.d.logs(), c.d.logs()[-3000:])


def test_refusals(c):
    rng = random.Random(9)
    bq, ys = rows(50, 1.0, rng)
    for params, word in (({"method": "cqr_asymmetric", "adaptive": {"gamma": 0.01}}, "cqr"),
                         ({"adaptive": {"gamma": 2}}, "gamma"),
                         ({"adaptive": {"gamma": "x"}}, "gamma"),
                         ({"adaptive": {"gama": 0.1}}, "gama"),
                         ({"adaptive": {"window": 0}}, "window"),
                         ({"adaptive": 0.01}, "adaptive")):
        r = check_status(c.d.post("/v2/models/refusals/calibrate", body(bq, ys, params)), 400)
        check(word in r.json()["error"], (params, r.json()))
    r = check_status(c.d.post("/v2/models/refusals/evaluate", body(bq, ys, {"observe": "yes"})),
                     400)
    check("observe" in r.json()["error"], r.json())
    # without targets there is nothing to observe
    r = check_status(c.d.post("/v2/models/refusals/evaluate", {
        "inputs": [tensor("base_quantiles", bq)], "parameters": {"observe": True}}), 400)
    check("targets" in r.json()["error"], r.json())
    # a bad config names the key
    write_model(c.repo, "badwin", dict(config(), conformal={"window": 0}), None)
    check_status(c.d.post("/v2/repository/models/badwin/load"), 503, "window")
    write_model(c.repo, "badada", dict(config(), conformal={"adaptive": {"gamma": 0}}), None)
    check_status(c.d.post("/v2/repository/models/badada/load"), 503, "gamma")



def test_clean_exit(c):
    """Last: the daemon drains and exits 0 (under ASan a leaked live state
    would make the exit status non-zero)."""
    rc = c.d.stop()
    check(rc == 0, "tallyd exited with %r:\n%s" % (rc, c.d.logs()[-3000:]))
    check("ERROR: " not in c.d.logs(), c.d.logs()[-3000:])


if __name__ == "__main__":
    run_tests(collect(globals()), setup, teardown)
