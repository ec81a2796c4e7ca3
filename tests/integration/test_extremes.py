"""Extreme numbers and strange repository entries over real HTTP (issue 10's
classes): every number from a URL, a parameter, a config file or a directory
name is range-checked (a clear 400, or the model refused at load with the
reason in the index), an answer never carries NaN, inf or null where a
number is expected, for every kind, and the repository scan opens only
regular files: a FIFO, a device, a directory or a loop of links where a file
is expected never stalls the daemon, and the other models serve. Prints a
table case -> answer that docs/reliability.md quotes."""
import json
import os
import socket
import sys
import time

from harness import (Daemon, check, check_status, collect, make_repo, output, run_tests,
                     tensor, write_model)

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "reference"))
import make_tiny_gpt2  # noqa: E402

I64_MAX = 9223372036854775807
MAX_VERSION = 9007199254740991  # 2^53 - 1
F32_MAX = 3.4e38
TABLE = []


def record(case, r):
    try:
        msg = r.json().get("error", "")
    except ValueError:
        msg = ""
    TABLE.append((case, r.status, msg[:90]))


def mlp(name, repo, scale=1.0, version=1):
    write_model(repo, name, {"kind": "mlp", "activations": ["none"]}, {
        "layers.0.weight": ("F32", [2, 4], [scale * v for v in [1, 1, 1, 1, -1, 0.5, 0, 2]]),
        "layers.0.bias": ("F32", [2], [0.0, 0.0])}, version=version)


def ensemble_cfg(extra=None):
    c = {"kind": "ensemble", "member_output": "logit", "classes": 1,
         "families": [{"name": "a", "members": [{"external": "x1"}, {"external": "x2"}]}]}
    c.update(extra or {})
    return c


class Ctx:
    def __init__(self):
        self.repo = repo = make_repo()
        mlp("m", repo)
        mlp("huge", repo, scale=1e38)  # finite weights whose products overflow FP32
        write_model(repo, "att", {"kind": "attention", "max_sequence_length": 64}, None)
        make_tiny_gpt2.make(os.path.join(repo, "gpt"), n_layer=1, n_embd=8, n_head=2,
                            vocab_size=16, n_positions=16)
        # a transformer whose logit for token 5 overflows FP32: the final
        # hidden state is all ones (ln_f weight 0, bias 1) and wte's row 5 is
        # 3e38 throughout (tokens other than 5 embed finitely)
        E, V = 8, 16
        t = make_tiny_gpt2.make_tensors(n_layer=1, n_head=2, n_embd=E, vocab_size=V,
                                        n_positions=16)
        wte = list(t["wte.weight"][2])
        wte[5 * E:6 * E] = [3e38] * E
        t["wte.weight"] = ("F32", [V, E], wte)
        t["ln_f.weight"] = ("F32", [E], [0.0] * E)
        t["ln_f.bias"] = ("F32", [E], [1.0] * E)
        write_model(repo, "gptbig", make_tiny_gpt2.make_config(n_layer=1, n_head=2, n_embd=E,
                                                             vocab_size=V, n_positions=16), t)
        write_model(repo, "ens", ensemble_cfg(), None)
        write_model(repo, "q", {"kind": "quantile_ensemble", "levels": [0.1, 0.5, 0.9],
                                "bases": [{"external": "e1"}, {"external": "e2"}],
                                "aggregator": {"granularity": "coarse", "simplex": False}},
                    None)
        # the last version there is: a fit cannot follow it
        write_model(repo, "top", ensemble_cfg(), None, version=MAX_VERSION)
        # numbers out of range in config files and directory names
        write_model(repo, "bigbatch", {"kind": "mlp", "activations": ["none"],
                                       "max_batch": 1e300}, None)
        write_model(repo, "negbatch", {"kind": "mlp", "activations": ["none"],
                                       "max_batch": -1}, None)
        write_model(repo, "attlen", {"kind": "attention", "max_sequence_length": I64_MAX}, None)
        mlp("bigver", repo)
        os.makedirs(os.path.join(repo, "bigver", "99999999999999999999"))
        # strange entries where a file is expected
        mlp("fifo_w", repo)
        os.remove(os.path.join(repo, "fifo_w", "1", "model.safetensors"))
        os.mkfifo(os.path.join(repo, "fifo_w", "1", "model.safetensors"))
        os.makedirs(os.path.join(repo, "fifo_c", "1"))
        os.mkfifo(os.path.join(repo, "fifo_c", "config.json"))
        mlp("dir_w", repo)
        os.remove(os.path.join(repo, "dir_w", "1", "model.safetensors"))
        os.makedirs(os.path.join(repo, "dir_w", "1", "model.safetensors"))
        mlp("zero_w", repo)
        os.remove(os.path.join(repo, "zero_w", "1", "model.safetensors"))
        os.symlink("/dev/zero", os.path.join(repo, "zero_w", "1", "model.safetensors"))
        mlp("loop_w", repo)
        p = os.path.join(repo, "loop_w", "1")
        os.remove(os.path.join(p, "model.safetensors"))
        os.symlink("b", os.path.join(p, "a"))
        os.symlink("a", os.path.join(p, "b"))
        os.symlink("a", os.path.join(p, "model.safetensors"))
        mlp("sock_w", repo)
        sp = os.path.join(repo, "sock_w", "1", "model.safetensors")
        os.remove(sp)
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(sp)
        mlp("fifo_vj", repo)
        os.mkfifo(os.path.join(repo, "fifo_vj", "1", "version.json"))
        self.d = Daemon(repo, ["--threads", "2", "--log-level", "warn"])
        t0 = time.time()
        self.d.start(wait_ready=False, timeout=20)
        deadline = time.time() + 20
        while time.time() < deadline and self.d.get("/v2/models/m/ready").status != 200:
            time.sleep(0.05)
        self.start_secs = time.time() - t0

    def daemon_logs(self):
        return self.d.logs()


def setup():
    return Ctx()


def teardown(c):
    if c:
        c.d.stop()
        c.sock.close()
        print("\ncase | status | error")
        for case, status, msg in TABLE:
            print("%s | %s | %s" % (case, status, msg))


def index(c):
    return {(e["name"], str(e.get("version", ""))): e
            for e in check_status(c.d.post("/v2/repository/index", {}), 200).json()}


def entry(c, name):
    es = [e for (n, _), e in index(c).items() if n == name]
    check(es, "model %s is not in the index" % name)
    return es


def alive(c):
    r = c.d.infer("m", [tensor("features", [[1, 2, 3, 4]])])
    check_status(r, 200)
    check(output(r, "output")["data"] == [10.0, 8.0], r)


def test_version_in_url(c):
    for v, what in [(str(I64_MAX), "largest version"), ("99999999999999999999", "largest version"),
                    (str(MAX_VERSION + 1), "largest version"), ("0", "positive integer"),
                    ("-1", "positive integer"), ("1e3", "positive integer")]:
        r = c.d.get("/v2/models/m/versions/%s" % v)
        record("GET /v2/models/m/versions/%s" % v, r)
        check_status(r, 400, what)
    r = c.d.get("/v2/models/m/versions/%d" % MAX_VERSION)
    record("GET /v2/models/m/versions/%d (no such version)" % MAX_VERSION, r)
    check_status(r, 404)
    alive(c)


def test_version_directory_out_of_range(c):
    es = entry(c, "bigver")
    check(all(e["state"] == "UNAVAILABLE" for e in es), es)
    check(any("largest version" in (e.get("reason") or "") for e in es), es)
    TABLE.append(("version directory 99999999999999999999", "UNAVAILABLE", es[0].get("reason")))
    alive(c)


def test_fit_after_last_version(c):
    body = {"inputs": [tensor("member_outputs", [[1, -1], [0.5, 0.2], [-2, 1], [3, 3]]),
                       tensor("labels", [1, 0, 0, 1], datatype="INT64")],
            "parameters": {"epochs": 2}}
    r = c.d.post("/v2/models/top/fit", body)
    record("fit of a model at version 2^53-1", r)
    check_status(r, 409, "largest")
    check_status(c.d.get("/v2/models/top/versions/%d" % MAX_VERSION), 200)


def test_config_numbers(c):
    for name, what in [("bigbatch", "max_batch"), ("negbatch", "max_batch"),
                       ("attlen", "max_sequence_length")]:
        es = entry(c, name)
        check(es[0]["state"] == "UNAVAILABLE" and what in (es[0].get("reason") or ""), es)
        TABLE.append(("config.json %s" % name, "UNAVAILABLE", es[0].get("reason")))


def test_query_offset_extremes(c):
    qkv = [tensor(n, [[[0.1, 0.2], [0.3, 0.4]]]) for n in ("query", "key", "value")]
    for causal in (True, False):
        for off in (I64_MAX, I64_MAX - 1, 63, -1):
            r = c.d.infer("att", qkv, parameters={"causal": causal, "query_offset": off,
                                                   "attention": "lssar"})
            record("attention query_offset %d causal %s" % (off, causal), r)
            check_status(r, 400, "query_offset")
    r = c.d.infer("att", qkv, parameters={"causal": False, "query_offset": 62})
    check_status(r, 200)
    ids = [tensor("input_ids", [[1, 2, 3]], datatype="INT64")]
    for off in (I64_MAX, -I64_MAX - 1, 1e300):
        r = c.d.infer("gpt", ids, parameters={"query_offset": off})
        record("transformer query_offset %r" % off, r)
        check_status(r, 400, "query_offset")
    alive(c)


def test_timeout_ms_huge(c):
    # a deadline past the documented range is refused by name, never wrapped
    for t in (1e308, I64_MAX, 1.7976931348623157e308):
        r = c.d.infer("m", [tensor("features", [[1, 2, 3, 4]])], parameters={"timeout_ms": t})
        record("timeout_ms %r" % t, r)
        check_status(r, 400)
        if "timeout_ms" not in r.json()["error"]:
            raise AssertionError("the error does not name timeout_ms: %r" % r.body)


def test_shape_product_overflow(c):
    for shape in ([4294967296, 4294967296], [I64_MAX, 2], [65536, 65536, 65536, 65536]):
        r = c.d.infer("m", [{"name": "features", "shape": shape, "datatype": "FP32",
                             "data": [1, 2, 3, 4]}])
        record("infer shape %s" % shape, r)
        check(r.status in (400, 413), r)
        check_status(r, r.status)
    alive(c)


# Keys whose null is documented as "undefined" (not an overflow): AUC with one
# class present, WIS without the level 0.5, metrics of a validation set
# without rows, an empty reliability bin (docs/ensemble.md, docs/quantile.md).
UNDEFINED_OK = {"auc", "wis", "validation"}


def walk_numbers(v, case, key=None):
    if v is None:
        check(key in UNDEFINED_OK, "%s: null at key %r" % (case, key))
    elif isinstance(v, float):
        check(v == v and abs(v) != float("inf"), "%s: %r at key %r" % (case, v, key))
    elif isinstance(v, dict):
        for k, x in v.items():
            # an empty reliability bin has no mean confidence or accuracy
            if x is None and k in ("confidence", "accuracy") and v.get("count") == 0:
                continue
            walk_numbers(x, case, k)
    elif isinstance(v, list):
        for x in v:
            walk_numbers(x, case, key)


def finite_or_400(r, case):
    """200 with only finite numbers (null only where documented as
    undefined), or a 400 that says what overflowed."""
    record(case, r)
    if r.status == 200:
        body = r.body.decode()
        for bad in ("NaN", "Infinity"):
            check(bad not in body, "%s: %s in %s" % (case, bad, body[:300]))
        walk_numbers(json.loads(body), case)
        return r
    check_status(r, 400)
    return r


def test_nonfinite_mlp(c):
    r = c.d.infer("huge", [tensor("features", [[1, 2, 3, 4]])])
    finite_or_400(r, "mlp weights 3e38: infer")
    check_status(r, 400, "overflow")
    r = c.d.infer("huge", [tensor("features", [[1, 2, 3, 4]])],
                  outputs=[{"name": "output", "parameters": {"binary_data": True}}])
    check_status(r, 400, "overflow")  # binary answers too
    r = c.d.infer("m", [tensor("features", [[F32_MAX, F32_MAX, F32_MAX, F32_MAX]])])
    finite_or_400(r, "mlp inputs at FP32 max")
    check_status(r, 400, "overflow")


def test_nonfinite_attention(c):
    big = [[[F32_MAX, -F32_MAX], [F32_MAX, F32_MAX]]]
    for variant in ("softmax", "lssa", "lssar"):
        r = c.d.infer("att", [tensor("query", big), tensor("key", big), tensor("value", big)],
                      parameters={"attention": variant, "causal": False})
        finite_or_400(r, "attention %s, q/k/v at FP32 max" % variant)
    for p in (1e6, 1e-300):
        r = c.d.infer("att", [tensor(n, [[[0.5, 2.0], [3.0, -1.0]]]) for n in
                              ("query", "key", "value")],
                      parameters={"attention": "lssar", "p": p, "causal": False})
        finite_or_400(r, "attention lssar p=%g" % p)


def test_nonfinite_transformer(c):
    r = c.d.infer("gpt", [tensor("input_ids", [[15, 0, 15, 0, 15]], datatype="INT64")])
    finite_or_400(r, "transformer infer")
    check_status(r, 200)
    for p in (1e6, 1e-300):
        r = c.d.infer("gpt", [tensor("input_ids", [[1, 2, 3, 4]], datatype="INT64")],
                      parameters={"attention": "lssar", "p": p})
        finite_or_400(r, "transformer lssar p=%g" % p)


def test_nonfinite_transformer_session(c):
    ids = [tensor("input_ids", [[1, 2, 3]], datatype="INT64")]
    r = c.d.infer("gptbig", ids)
    finite_or_400(r, "transformer whose logits overflow FP32: infer")
    check_status(r, 400, "overflow")
    r = check_status(c.d.post("/v2/models/gptbig/sessions", {}), 201)
    sid = r.json()["session_id"]
    for _ in range(2):
        r = c.d.post("/v2/models/gptbig/sessions/%s/infer" % sid, {"inputs": ids})
        finite_or_400(r, "transformer whose logits overflow FP32: session chunk")
        check_status(r, 400, "overflow")
        # the refused chunk did not advance the session: a retry is not a repeat
        j = check_status(c.d.get("/v2/models/gptbig/sessions/" + sid), 200).json()
        check(j["position"] == 0, j)
    check_status(c.d.request("DELETE", "/v2/models/gptbig/sessions/" + sid), 200)


def test_nonfinite_ensemble(c):
    mo = [[F32_MAX, -F32_MAX], [0.0, F32_MAX]]
    r = c.d.infer("ens", [tensor("member_outputs", mo)])
    finite_or_400(r, "ensemble logits at FP32 max: infer")
    body = {"inputs": [tensor("member_outputs", mo + [[-F32_MAX, -F32_MAX], [1, 1]]),
                       tensor("labels", [1, 0, 0, 1], datatype="INT64")]}
    r = c.d.post("/v2/models/ens/evaluate", body)
    finite_or_400(r, "ensemble evaluate, logits at FP32 max (log loss of 0 probabilities)")
    body["parameters"] = {"epochs": 3, "learning_rate": 1e300}
    r = c.d.post("/v2/models/ens/fit", body)
    finite_or_400(r, "ensemble fit, learning_rate 1e300")
    for k in ("l2", "weight_decay", "min_delta"):
        body["parameters"] = {"epochs": 3, k: 1e308}
        r = c.d.post("/v2/models/ens/fit", body)
        finite_or_400(r, "ensemble fit, %s 1e308" % k)


def test_nonfinite_quantile(c):
    bq = [[[F32_MAX, F32_MAX, F32_MAX], [F32_MAX, F32_MAX, F32_MAX]]]
    r = c.d.infer("q", [tensor("base_quantiles", bq)])
    finite_or_400(r, "quantile base quantiles at FP32 max: infer")
    body = {"inputs": [tensor("base_quantiles", bq * 2), tensor("targets", [-F32_MAX, F32_MAX])]}
    r = c.d.post("/v2/models/q/evaluate", body)
    finite_or_400(r, "quantile evaluate, FP32 max")
    r = c.d.post("/v2/models/q/calibrate", body)
    finite_or_400(r, "quantile calibrate, FP32 max, 2 rows")
    fit = dict(body, parameters={"epochs": 2, "learning_rate": 1e300})
    r = c.d.post("/v2/models/q/fit", fit)
    finite_or_400(r, "quantile fit, FP32 max, learning_rate 1e300")
    rows = {"inputs": [tensor("base_quantiles", [[[-1, 0, 1], [-2, 0, 2]]] * 8),
                       tensor("targets", [0.5, -0.5, 1.5, 0, 0.2, -1, 3, 0.1])]}
    for k in ("weight_decay", "lambda", "margin", "learning_rate"):
        r = c.d.post("/v2/models/q/fit", dict(rows, parameters={"epochs": 3, k: 1e308}))
        finite_or_400(r, "quantile fit, %s 1e308" % k)
    # enough rows for finite corrections, whose size (target - quantile =
    # 6.8e38) does not fit the FP32 the weights store
    body = {"inputs": [tensor("base_quantiles", bq * 24),
                       tensor("targets", [-F32_MAX, F32_MAX] * 12)]}
    r = c.d.post("/v2/models/q/calibrate", body)
    finite_or_400(r, "quantile calibrate, FP32 max, 24 rows")
    if r.status == 200:
        v = r.json()["model_version"]
        r = c.d.infer("q", [tensor("base_quantiles", [[[0, 0, 0], [0, 0, 0]]])], version=v)
        finite_or_400(r, "quantile infer after that calibration")
    alive(c)


def test_strange_entries(c):
    # the daemon started (no FIFO blocked the first scan)...
    check(c.start_secs < 15, "start took %.1f s" % c.start_secs)
    for name, what in [("fifo_w", "FIFO"), ("fifo_c", "FIFO"), ("dir_w", "directory"),
                       ("zero_w", "character device"), ("loop_w", "loop"),
                       ("sock_w", "socket"),
                       ("fifo_vj", "FIFO")]:
        es = entry(c, name)
        reasons = " ".join(e.get("reason") or "" for e in es)
        check(all(e["state"] == "UNAVAILABLE" for e in es) and what in reasons,
              "%s: %r" % (name, es))
        TABLE.append(("%s (%s)" % (name, what), "UNAVAILABLE", reasons[:90]))
        r = c.d.infer(name, [tensor("features", [[1, 2, 3, 4]])])
        check(r.status in (400, 404, 503), r)
    # ...and a rescan and an explicit load do not block either
    t0 = time.time()
    for name in ("fifo_w", "fifo_c", "zero_w"):
        r = c.d.post("/v2/repository/models/%s/load" % name, {}, timeout=10)
        check(r.status >= 400, r)
    check_status(c.d.post("/v2/repository/index", {}, timeout=10), 200)
    check(time.time() - t0 < 10, "loads took %.1f s" % (time.time() - t0))
    alive(c)


if __name__ == "__main__":
    run_tests(collect(globals()), setup, teardown)
