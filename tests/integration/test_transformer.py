"""The transformer kind over HTTP against the independent NumPy reference
(tests/reference/gpt2_ref.py): every attention variant with learned and RoPE
positions, per-request overrides, and each way a request can be refused."""
import os
import shutil
import sys

from harness import (Daemon, SkipTest, check, check_status, collect, make_repo, output,
                     run_tests, tensor, write_model)

try:
    import numpy as np
    import gpt2_ref  # tests/reference, on the path through harness
    import make_tiny_gpt2
except ImportError as e:  # numpy missing: run with /usr/bin/python3
    np = None
    IMPORT_ERROR = e

VARIANTS = ("softmax", "lssa", "lssar")
POSITIONS = ("learned", "rope")
V = 50


def close_rel(got, want, tol=1e-4):
    """|got - want| <= tol * max(1, |want|), elementwise (README's tolerance form)."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    check(got.shape == want.shape, "shape %s != %s" % (got.shape, want.shape))
    err = np.abs(got - want) / np.maximum(1.0, np.abs(want))
    check(err.size == 0 or err.max() <= tol, "max error %.3g > %g" % (err.max(), tol))
    return err.max() if err.size else 0.0


class Ctx:
    def __init__(self):
        if np is None:
            raise SkipTest("numpy is needed (%s)" % IMPORT_ERROR)
        self.repo = make_repo()
        for v in VARIANTS:
            for p in POSITIONS:
                make_tiny_gpt2.make(os.path.join(self.repo, "%s_%s" % (v, p)), attention=v,
                                    positions=p, seed=VARIANTS.index(v) * 2 + POSITIONS.index(p),
                                    n_layer=2, n_head=2, n_embd=32, vocab_size=V, n_positions=64)
        self.models = {name: gpt2_ref.load_model(os.path.join(self.repo, name))
                       for name in os.listdir(self.repo)}
        self.d = Daemon(self.repo, ["--threads", "2"]).start()

    def ref(self, name, ids, **kw):
        w, c = self.models[name]
        return gpt2_ref.forward(w, c, ids, **kw)

    def daemon_logs(self):
        return self.d.logs()


def setup():
    return Ctx()


def teardown(ctx):
    if ctx is not None:
        ctx.d.stop()
        shutil.rmtree(ctx.repo, ignore_errors=True)


def ids_batch(seed, B, L):
    rng = np.random.RandomState(seed)
    return rng.randint(0, V, size=(B, L)).tolist()


def infer_ids(c, name, ids, datatype="INT64", params=None):
    body = {"inputs": [tensor("input_ids", ids, datatype=datatype)]}
    if params is not None:
        body["parameters"] = params
    return c.d.post("/v2/models/%s/infer" % name, body)


def compare(c, name, ids, params=None, **kw):
    r = check_status(infer_ids(c, name, ids, params=params), 200)
    lp = output(r, "token_logprobs")
    check(lp["shape"] == [len(ids), len(ids[0]) - 1], "token_logprobs shape %s" % lp["shape"])
    got_lp = np.array(lp["data"]).reshape(lp["shape"])
    got_nll = np.array(output(r, "nll")["data"])
    lg = output(r, "next_token_logits")
    check(lg["shape"] == [len(ids), V], "next_token_logits shape %s" % lg["shape"])
    got_lg = np.array(lg["data"]).reshape(lg["shape"])
    worst = 0.0
    for b, row in enumerate(ids):
        want = c.ref(name, row, **kw)
        worst = max(worst, close_rel(got_lp[b], want["token_logprobs"]),
                    close_rel(got_nll[b], want["nll"]),
                    close_rel(got_lg[b], want["next_token_logits"]))
    return worst


def make_variant_test(v, p):
    def t(c):
        worst = compare(c, "%s_%s" % (v, p), ids_batch(11, 2, 48))
        print("     %s/%s: largest error %.2g" % (v, p, worst))
    t.__name__ = "test_reference_%s_%s" % (v, p)
    return t


for _v in VARIANTS:
    for _p in POSITIONS:
        globals()["test_reference_%s_%s" % (_v, _p)] = make_variant_test(_v, _p)


def test_full_learned_table(c):
    """Every learned position is usable: 64 tokens on n_positions 64."""
    compare(c, "lssar_learned", ids_batch(3, 1, 64))


def test_long_rope(c):
    """RoPE has no table: a sequence well past n_positions, several key tiles."""
    compare(c, "lssar_rope", ids_batch(4, 1, 300))


def test_overrides(c):
    ids = ids_batch(5, 1, 40)
    compare(c, "softmax_learned", ids, params={"attention": "lssar", "p": 3},
            attention="lssar", p=3)
    compare(c, "lssar_rope", ids, params={"offset_rows": 0}, offset_rows=0)
    compare(c, "lssar_rope", ids, params={"attention": "lssa"}, attention="lssa")
    compare(c, "lssa_learned", ids, params={"attention": "softmax"}, attention="softmax")
    # the override really changes the answer
    a = output(infer_ids(c, "lssar_rope", ids), "nll")["data"][0]
    b = output(infer_ids(c, "lssar_rope", ids, params={"p": 3}), "nll")["data"][0]
    check(abs(a - b) > 1e-4, "p made no difference: %r %r" % (a, b))


def test_dtypes(c):
    ids = ids_batch(6, 1, 12)
    want = output(infer_ids(c, "softmax_rope", ids), "token_logprobs")["data"]
    for dt in ("INT32", "FP32", "UINT16"):
        got = output(check_status(infer_ids(c, "softmax_rope", ids, datatype=dt), 200),
                     "token_logprobs")["data"]
        check(got == want, "%s ids gave other answers" % dt)


def test_one_token(c):
    r = check_status(infer_ids(c, "lssa_rope", [[7], [8]]), 200)
    check(output(r, "token_logprobs")["shape"] == [2, 0])
    check(output(r, "nll")["data"] == [0.0, 0.0])
    close_rel(np.array(output(r, "next_token_logits")["data"][:V]),
              c.ref("lssa_rope", [7])["next_token_logits"])


def test_metadata(c):
    m = check_status(c.d.get("/v2/models/lssar_rope"), 200).json()
    check([i["name"] for i in m["inputs"]] == ["input_ids"], m)
    check({o["name"] for o in m["outputs"]} == {"token_logprobs", "nll", "next_token_logits"}, m)


def test_refusals(c):
    ok = ids_batch(7, 1, 10)
    check_status(infer_ids(c, "softmax_rope", [[1, 2, V]]), 400, "vocabulary")
    check_status(infer_ids(c, "softmax_rope", [[1, -1, 2]]), 400, "vocabulary")
    check_status(infer_ids(c, "softmax_learned", ids_batch(8, 1, 65)), 400, "n_positions")
    check_status(infer_ids(c, "softmax_rope", [[1.5, 2, 3]], datatype="FP32"), 400, "integer")
    check_status(infer_ids(c, "softmax_rope", ok[0]), 400, "[B, L]")
    check_status(infer_ids(c, "softmax_rope", [ok]), 400, "[B, L]")
    check_status(infer_ids(c, "softmax_rope", [[]]), 400)
    check_status(infer_ids(c, "softmax_rope", ok, params={"attention": "linear"}), 400, "attention")
    check_status(infer_ids(c, "softmax_rope", ok, params={"p": 0}), 400, "'p'")
    check_status(infer_ids(c, "softmax_rope", ok, params={"offset_rows": -1}), 400, "offset_rows")
    r = c.d.post("/v2/models/softmax_rope/infer",
                 {"inputs": [tensor("tokens", ok, datatype="INT64")]})
    check_status(r, 400, "input_ids")


def test_query_offset(c):
    """query_offset is the absolute position of the first token. An infer
    request has no tokens before its own, so 0 is the only offset it can
    honour (nothing changes with it); any other is refused, pointing to a
    session, where the offset is the session's position and is checked."""
    ids = ids_batch(9, 2, 20)
    names = ("softmax_rope", "lssar_learned", "lssa_rope")
    for name in names:
        a = check_status(infer_ids(c, name, ids), 200).json()["outputs"]
        b = check_status(infer_ids(c, name, ids, params={"query_offset": 0}), 200)
        check(b.json()["outputs"] == a, "%s: query_offset 0 changed the answer" % name)
        for off in (1, 5):
            check_status(infer_ids(c, name, ids, params={"query_offset": off}), 400, "session")
    check_status(infer_ids(c, "softmax_rope", ids, params={"query_offset": -1}), 400,
                 "query_offset")
    check_status(infer_ids(c, "softmax_rope", ids, params={"query_offset": 2.5}), 400,
                 "query_offset")
    check_status(infer_ids(c, "softmax_rope", ids, params={"query_offset": "0"}), 400,
                 "query_offset")
    # sessions: a new one starts at 0; a chunk may state the session's
    # position, and gets what it would get without it
    name, seq = "lssar_learned", ids[0]
    check_status(c.d.post("/v2/models/%s/sessions" % name,
                          {"parameters": {"query_offset": 3}}), 400, "session")

    def feed(sid, chunk, params=None):
        body = {"inputs": [tensor("input_ids", [chunk], datatype="INT64")]}
        if params is not None:
            body["parameters"] = params
        return c.d.post("/v2/models/%s/sessions/%s/infer" % (name, sid), body)

    sids = [check_status(c.d.post("/v2/models/%s/sessions" % name,
                                  {"parameters": {"query_offset": 0}}), 201).json()["session_id"]
            for _ in range(2)]
    plain = [check_status(feed(sids[0], seq[:8]), 200).json()["outputs"],
             check_status(feed(sids[0], seq[8:]), 200).json()["outputs"]]
    stated = [check_status(feed(sids[1], seq[:8], {"query_offset": 0}), 200).json()["outputs"]]
    # a stale offset (the first chunk sent again) conflicts, and moves nothing
    check_status(feed(sids[1], seq[:8], {"query_offset": 0}), 409, "position 8")
    check_status(feed(sids[1], seq[8:], {"query_offset": 9}), 409, "position 8")
    info = check_status(c.d.get("/v2/models/%s/sessions/%s" % (name, sids[1])), 200).json()
    check(info["position"] == 8, info)
    stated.append(check_status(feed(sids[1], seq[8:], {"query_offset": 8}), 200).json()["outputs"])
    check(stated == plain, "a stated session position changed the answer")
    # and the session over the whole sequence matches one request over it
    whole = check_status(infer_ids(c, name, [seq]), 200)
    lp = plain[0][0]["data"] + plain[1][0]["data"]
    close_rel(lp, output(whole, "token_logprobs")["data"])
    for sid in sids:
        check_status(c.d.request("DELETE", "/v2/models/%s/sessions/%s" % (name, sid)), 200)


def test_bad_configs(c):
    """A config the kind cannot serve leaves the model unavailable, with the reason."""
    repo = make_repo()
    try:
        make_tiny_gpt2.make(os.path.join(repo, "odd"), positions="rope", n_head=2, n_embd=32)
        cfg = os.path.join(repo, "odd", "config.json")
        import json
        conf = json.load(open(cfg))
        conf["attention"] = "cosine"
        json.dump(conf, open(cfg, "w"))
        make_tiny_gpt2.make(os.path.join(repo, "nowpe"), positions="rope")
        conf = json.load(open(os.path.join(repo, "nowpe", "config.json")))
        conf["positions"] = "learned"  # wpe.weight is missing from the file
        json.dump(conf, open(os.path.join(repo, "nowpe", "config.json"), "w"))
        d = Daemon(repo).start(wait_ready=False)
        try:
            idx = {m["name"]: m for m in d.post("/v2/repository/index").json()}
            check(idx["odd"]["state"] == "UNAVAILABLE" and "cosine" in idx["odd"]["reason"], idx)
            check(idx["nowpe"]["state"] == "UNAVAILABLE" and "wpe" in idx["nowpe"]["reason"], idx)
        finally:
            d.stop()
    finally:
        shutil.rmtree(repo, ignore_errors=True)


if __name__ == "__main__":
    if np is None:
        print("skip: numpy is needed; run with /usr/bin/python3")
        print("tally: 0 passed, 0 failed, 1 skipped")
        sys.exit(0)
    run_tests(collect(globals()), setup, teardown)
