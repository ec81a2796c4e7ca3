"""KV-cache sessions over HTTP: a sequence fed in chunks scores exactly as
one request over the whole (and as the NumPy reference), sessions pin their
model version, and they end by DELETE, by idle expiry and by eviction under
the KV-cache cap, each with a 404 that says why."""
import os
import shutil
import sys
import time

from harness import (Daemon, SkipTest, check, check_status, collect, make_repo, output,
                     run_tests, tensor, write_model)

try:
    import numpy as np
    import gpt2_ref
    import make_tiny_gpt2
except ImportError as e:
    np = None
    IMPORT_ERROR = e

V = 50
SEQ60 = [i % V for i in range(60)]
MLP = {"layers.0.weight": ("F32", [1, 2], [1, -1]), "layers.0.bias": ("F32", [1], [0.5])}


def close_rel(got, want, tol):
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    check(got.shape == want.shape, "shape %s != %s" % (got.shape, want.shape))
    err = np.abs(got - want) / np.maximum(1.0, np.abs(want))
    check(err.size == 0 or err.max() <= tol, "max error %.3g > %g" % (err.max(), tol))


class Ctx:
    def __init__(self):
        if np is None:
            raise SkipTest("numpy is needed (%s)" % IMPORT_ERROR)
        self.repo = make_repo()
        make_tiny_gpt2.make(os.path.join(self.repo, "rope"), attention="lssar", positions="rope",
                            seed=1, vocab_size=V, n_positions=64)
        make_tiny_gpt2.make(os.path.join(self.repo, "learned"), attention="softmax",
                            positions="learned", seed=2, vocab_size=V, n_positions=64)
        write_model(self.repo, "mlp", {"kind": "mlp", "activations": ["none"]}, MLP)
        self.d = Daemon(self.repo, ["--threads", "2"]).start()

    def daemon_logs(self):
        return self.d.logs()


def setup():
    return Ctx()


def teardown(ctx):
    if ctx is not None:
        ctx.d.stop()
        shutil.rmtree(ctx.repo, ignore_errors=True)


def open_session(d, model, params=None):
    r = check_status(d.post("/v2/models/%s/sessions" % model,
                            {"parameters": params} if params else {}), 201)
    j = r.json()
    # "<replica>.<32 hex>": the replica id (--replica-id) routes it (test_fleet)
    check(j["position"] == 0 and len(j["session_id"].rpartition(".")[2]) == 32, j)
    return j["session_id"]


def feed(d, model, sid, ids):
    return d.post("/v2/models/%s/sessions/%s/infer" % (model, sid),
                  {"inputs": [tensor("input_ids", [ids], datatype="INT64")]})


def chunked(d, model, seq, sizes):
    sid = open_session(d, model)
    lps, pos = [], 0
    for n in sizes:
        r = check_status(feed(d, model, sid, seq[pos:pos + n]), 200)
        pos += n
        lp = output(r, "token_logprobs")
        check(lp["shape"] == [1, n - 1 if pos == n else n], "chunk shape %s" % lp["shape"])
        lps += lp["data"]
        check(r.json()["parameters"]["position"] == pos, r.json().get("parameters"))
        last = output(r, "next_token_logits")["data"]
    return sid, lps, last


def whole(d, model, seq):
    r = check_status(d.infer(model, [tensor("input_ids", [seq], datatype="INT64")]), 200)
    return output(r, "token_logprobs")["data"], output(r, "next_token_logits")["data"]


def test_chunked_equals_whole(c):
    seq = np.random.RandomState(0).randint(0, V, 90).tolist()
    for model in ("rope", "learned"):
        seq_m = seq[:64] if model == "learned" else seq
        sizes = [7, 1, 12, 20, 24] if model == "learned" else [7, 1, 12, 20, 50]
        sid, lps, last = chunked(c.d, model, seq_m, sizes)
        w_lp, w_last = whole(c.d, model, seq_m)
        close_rel(lps, w_lp, 1e-5)
        close_rel(last, w_last, 1e-5)
        w, cfg = gpt2_ref.load_model(os.path.join(c.repo, model))
        ref = gpt2_ref.forward(w, cfg, seq_m)
        close_rel(lps, ref["token_logprobs"], 1e-4)
        close_rel(last, ref["next_token_logits"], 1e-4)
        check_status(c.d.request("DELETE", "/v2/models/%s/sessions/%s" % (model, sid)), 200)


def test_info_and_delete(c):
    sid = open_session(c.d, "rope")
    check_status(feed(c.d, "rope", sid, [1, 2, 3, 4, 5]), 200)
    j = check_status(c.d.get("/v2/models/rope/sessions/" + sid), 200).json()
    check(j["session_id"] == sid and j["model_name"] == "rope" and j["model_version"] == "1", j)
    check(j["position"] == 5 and j["memory_bytes"] > 0, j)
    check(0 < j["expires_in_s"] <= 600, j)
    check_status(c.d.request("DELETE", "/v2/models/rope/sessions/" + sid), 200)
    check_status(c.d.get("/v2/models/rope/sessions/" + sid), 404, "deleted")
    check_status(feed(c.d, "rope", sid, [1]), 404, "deleted")
    check_status(c.d.request("DELETE", "/v2/models/rope/sessions/" + sid), 404)


def test_refusals(c):
    check_status(c.d.post("/v2/models/mlp/sessions", {}), 400, "sessions")
    check_status(c.d.post("/v2/models/nosuch/sessions", {}), 404)
    check_status(c.d.get("/v2/models/rope/sessions/0123456789abcdef0123456789abcdef"), 404,
                 "unknown session")
    check_status(c.d.post("/v2/models/rope/sessions", {"parameters": {"attention": "x"}}), 400)
    check_status(c.d.post("/v2/models/rope/sessions", b"[1]"), 400, "object")
    sid = open_session(c.d, "rope")
    check_status(c.d.get("/v2/models/learned/sessions/" + sid), 404)  # another model's id
    check_status(feed(c.d, "rope", sid, [1, V]), 400, "vocabulary")
    r = c.d.post("/v2/models/rope/sessions/%s/infer" % sid,
                 {"inputs": [tensor("input_ids", [[1, 2], [3, 4]], datatype="INT64")]})
    check_status(r, 400, "one sequence")
    check(c.d.get("/v2/models/rope/sessions/" + sid).json()["position"] == 0)
    # a refused chunk leaves the session where it was
    sid = open_session(c.d, "learned")
    check_status(feed(c.d, "learned", sid, list(range(40))), 200)
    check_status(feed(c.d, "learned", sid, list(range(30))), 400, "n_positions")
    check(c.d.get("/v2/models/learned/sessions/" + sid).json()["position"] == 40)
    check_status(feed(c.d, "learned", sid, list(range(24))), 200)


def test_session_parameters(c):
    """Variant settings given at creation hold for every chunk."""
    seq = list(range(3, 40))
    sid = open_session(c.d, "rope", {"attention": "lssa"})
    r = check_status(feed(c.d, "rope", sid, seq), 200)
    w, cfg = gpt2_ref.load_model(os.path.join(c.repo, "rope"))
    close_rel(output(r, "token_logprobs")["data"],
              gpt2_ref.forward(w, cfg, seq, attention="lssa")["token_logprobs"], 1e-4)


def test_pins_version(c):
    """A new version does not change a session under way."""
    sid = open_session(c.d, "rope")
    seq = list(range(1, 31))
    check_status(feed(c.d, "rope", sid, seq[:10]), 200)
    make_tiny_gpt2.make(os.path.join(c.repo, "rope"), attention="lssar", positions="rope",
                        seed=99, vocab_size=V, n_positions=64, version=2)
    check_status(c.d.post("/v2/repository/models/rope/load"), 200)
    meta = c.d.get("/v2/models/rope").json()
    check("2" in [str(v) for v in meta["versions"]], meta)
    r = check_status(feed(c.d, "rope", sid, seq[10:]), 200)
    check(r.json()["model_version"] == "1", r.json())
    w, cfg = gpt2_ref.load_model(os.path.join(c.repo, "rope"), version=1)
    close_rel(output(r, "token_logprobs")["data"],
              gpt2_ref.forward(w, cfg, seq)["token_logprobs"][9:], 1e-4)
    check(c.d.get("/v2/models/rope/sessions/" + sid).json()["model_version"] == "1")
    check_status(c.d.request("DELETE", "/v2/models/rope/sessions/" + sid), 200)


def test_ttl_expiry(c):
    d = Daemon(c.repo, ["--session-ttl-secs", "1"]).start()
    try:
        sid = open_session(d, "learned")
        check_status(feed(d, "learned", sid, [1, 2, 3]), 200)
        keep = open_session(d, "learned")
        deadline = time.time() + 10
        while time.time() < deadline:
            time.sleep(0.3)
            check_status(feed(d, "learned", keep, [4]), 200)  # used: stays alive
            if d.get("/v2/models/learned/sessions/" + sid).status == 404:
                break
        check_status(d.get("/v2/models/learned/sessions/" + sid), 404, "expired")
        check_status(feed(d, "learned", sid, [4]), 404, "expired")
        check_status(d.get("/v2/models/learned/sessions/" + keep), 200)
    finally:
        d.stop()


def test_session_chunks_obey_request_limits(c):
    """Session chunks go through the same decoding as infer: --max-sequence-length
    and --max-request-memory apply, and a refused chunk leaves the session where
    it was."""
    d = Daemon(c.repo, ["--max-sequence-length", "4", "--max-request-memory", "4096"]).start()
    try:
        sid = open_session(d, "learned")
        check_status(feed(d, "learned", sid, [1, 2, 3]), 200)
        check_status(feed(d, "learned", sid, [1, 2, 3, 4, 5]), 400, "sequence")
        big = {"inputs": [tensor("input_ids", [[1] * 4] * 200, datatype="INT64")]}
        check_status(d.post("/v2/models/learned/sessions/%s/infer" % sid, big), 413)
        check(d.get("/v2/models/learned/sessions/" + sid).json()["position"] == 3)
    finally:
        d.stop()


def test_eviction(c):
    # measure one session's memory at 60 tokens, then cap at 2.5 of them
    sid = open_session(c.d, "rope")
    check_status(feed(c.d, "rope", sid, SEQ60), 200)
    one = c.d.get("/v2/models/rope/sessions/" + sid).json()["memory_bytes"]
    c.d.request("DELETE", "/v2/models/rope/sessions/" + sid)
    d = Daemon(c.repo, ["--kv-cache-bytes", str(int(one * 2.5))]).start()
    try:
        a, b, e = (open_session(d, "rope") for _ in range(3))
        check_status(feed(d, "rope", a, SEQ60), 200)
        check_status(feed(d, "rope", b, SEQ60), 200)
        check_status(feed(d, "rope", a, [5]), 200)  # a is now more recent than b
        check_status(feed(d, "rope", e, SEQ60), 200)  # over the cap: b goes
        check_status(d.get("/v2/models/rope/sessions/" + b), 404, "evicted")
        check_status(feed(d, "rope", b, [1]), 404, "kv cache cap")
        check_status(d.get("/v2/models/rope/sessions/" + a), 200)
        check_status(feed(d, "rope", e, [1]), 200)
    finally:
        d.stop()


if __name__ == "__main__":
    if np is None:
        print("skip: numpy is needed; run with /usr/bin/python3")
        print("tally: 0 passed, 0 failed, 1 skipped")
        sys.exit(0)
    run_tests(collect(globals()), setup, teardown)
