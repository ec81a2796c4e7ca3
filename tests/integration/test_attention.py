"""The attention kind over HTTP against the NumPy reference's attend():
every variant, causal and full, grouped kv heads, query offsets, a batch
axis, FP16/FP64 inputs, the binary tensor extension (a 64k x 128 key and
value with no JSON text), and each refusal."""
import json
import shutil
import struct
import sys

from harness import (Daemon, SkipTest, check, check_status, collect, make_repo, output,
                     run_tests, tensor, write_model)

try:
    import numpy as np
    import gpt2_ref
except ImportError as e:
    np = None
    IMPORT_ERROR = e

VARIANTS = ("softmax", "lssa", "lssar")


class Ctx:
    def __init__(self):
        if np is None:
            raise SkipTest("numpy is needed (%s)" % IMPORT_ERROR)
        self.repo = make_repo()
        write_model(self.repo, "att", {"kind": "attention", "max_sequence_length": 4096}, None)
        write_model(self.repo, "att_long", {"kind": "attention"}, None)
        self.d = Daemon(self.repo, ["--max-body-bytes", "200000000"]).start()

    def daemon_logs(self):
        return self.d.logs()


def setup():
    return Ctx()


def teardown(ctx):
    if ctx is not None:
        ctx.d.stop()
        shutil.rmtree(ctx.repo, ignore_errors=True)


def close_rel(got, want, tol=1e-4):
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    check(got.shape == want.shape, "shape %s != %s" % (got.shape, want.shape))
    err = np.abs(got - want) / np.maximum(1.0, np.abs(want))
    check(err.size == 0 or err.max() <= tol, "max error %.3g > %g" % (err.max(), tol))


def qkv(seed, H, Hkv, Lq, Lk, d, dv, scale=1.0):
    rng = np.random.RandomState(seed)
    return (rng.randn(H, Lq, d) * scale, rng.randn(Hkv, Lk, d) * scale, rng.randn(Hkv, Lk, dv))


def attend_json(c, q, k, v, params=None, datatype="FP32", model="att"):
    body = {"inputs": [tensor("query", q.tolist(), datatype=datatype),
                       tensor("key", k.tolist(), datatype=datatype),
                       tensor("value", v.tolist(), datatype=datatype)]}
    if params:
        body["parameters"] = params
    return c.d.post("/v2/models/%s/infer" % model, body)


def got_output(r):
    o = output(r, "output")
    return np.array(o["data"]).reshape(o["shape"])


def test_variants(c):
    q, k, v = qkv(1, 2, 2, 70, 70, 16, 8, scale=1.5)
    for var in VARIANTS:
        for causal in (True, False):
            r = check_status(attend_json(c, q, k, v, {"attention": var, "causal": causal}), 200)
            close_rel(got_output(r), gpt2_ref.attend(q, k, v, var, causal=causal))


def test_gqa_and_offsets(c):
    q, k, v = qkv(2, 4, 2, 20, 100, 32, 16, scale=2.0)
    for var in VARIANTS:
        # default offset: the queries are the last 20 positions
        r = check_status(attend_json(c, q, k, v, {"attention": var}), 200)
        close_rel(got_output(r), gpt2_ref.attend(q, k, v, var))
        # an explicit earlier offset (later keys masked), and LSSAR settings
        p = {"attention": var, "query_offset": 30, "p": 3, "offset_rows": 0}
        r = check_status(attend_json(c, q, k, v, p), 200)
        close_rel(got_output(r), gpt2_ref.attend(q, k, v, var, query_offset=30, p=3,
                                                 offset_rows=0))
        # full attention with an offset: it only moves LSSAR's offset rows
        p = {"attention": var, "causal": False, "query_offset": 1, "offset_rows": 3}
        r = check_status(attend_json(c, q, k, v, p), 200)
        close_rel(got_output(r), gpt2_ref.attend(q, k, v, var, causal=False, query_offset=1))


def test_batch_and_dtypes(c):
    qs, ks, vs = zip(*(qkv(10 + b, 2, 1, 9, 9, 8, 8) for b in range(3)))
    q, k, v = np.stack(qs), np.stack(ks), np.stack(vs)
    for dt in ("FP32", "FP64", "FP16"):
        qq, kk, vv = ((x.astype(np.float16).astype(np.float64) if dt == "FP16" else x)
                      for x in (q, k, v))
        r = check_status(attend_json(c, qq, kk, vv, {"attention": "lssa"}, datatype=dt), 200)
        got = got_output(r)
        check(list(got.shape) == [3, 2, 9, 8], got.shape)
        for b in range(3):
            close_rel(got[b], gpt2_ref.attend(qq[b], kk[b], vv[b], "lssa"))


def post_binary(c, model, inputs, params=None, binary_out=True):
    """inputs: [(name, float32 array)]; every tensor travels as raw bytes."""
    head = {"inputs": [{"name": n, "shape": list(a.shape), "datatype": "FP32",
                        "parameters": {"binary_data_size": a.nbytes}} for n, a in inputs],
            "outputs": [{"name": "output", "parameters": {"binary_data": binary_out}}]}
    if params:
        head["parameters"] = params
    js = json.dumps(head).encode()
    body = js + b"".join(a.astype("<f4").tobytes() for _, a in inputs)
    return c.d.request("POST", "/v2/models/%s/infer" % model, body,
                       headers={"Inference-Header-Content-Length": str(len(js)),
                                "Content-Type": "application/octet-stream"})


def read_binary_output(r):
    n = int(r.headers["inference-header-content-length"])
    head = json.loads(r.body[:n])
    o = head["outputs"][0]
    size = o["parameters"]["binary_data_size"]
    check("data" not in o, "binary output also carried JSON data")
    return np.frombuffer(r.body[n:n + size], dtype="<f4").reshape(o["shape"])


def test_binary_64k(c):
    """A 65536 x 128 key and value: 64 MiB of input with no JSON numbers."""
    rng = np.random.RandomState(3)
    Lk, Lq, d = 65536, 16, 128
    q = rng.randn(1, Lq, d).astype(np.float32)
    k = rng.randn(1, Lk, d).astype(np.float32)
    v = rng.randn(1, Lk, d).astype(np.float32)
    for var in ("softmax", "lssar"):
        r = check_status(post_binary(c, "att_long", [("query", q), ("key", k), ("value", v)],
                                     {"attention": var}), 200)
        got = read_binary_output(r)
        check(got.shape == (1, Lq, d), got.shape)
        close_rel(got, gpt2_ref.attend(q, k, v, var))


def test_refusals(c):
    q, k, v = qkv(4, 3, 2, 5, 5, 8, 8)
    check_status(attend_json(c, q, k, v), 400, "key/value heads")
    q, k, v = qkv(4, 2, 2, 5, 5, 8, 8)
    check_status(attend_json(c, q, k[:, :, :4], v), 400, "head dimension")
    check_status(attend_json(c, q, k, v[:, :4]), 400, "value")
    check_status(attend_json(c, q, k[:, :3], v[:, :3]), 400, "causal")
    check_status(attend_json(c, q, k, v, {"query_offset": 1}), 400, "query_offset")
    check_status(attend_json(c, q, k, v, {"query_offset": -1}), 400, "query_offset")
    check_status(attend_json(c, q, k, v, {"attention": "linear"}), 400, "attention")
    check_status(attend_json(c, q, k, v, {"p": -2}), 400, "'p'")
    check_status(attend_json(c, q, k, v, {"causal": "yes"}), 400, "causal")
    check_status(attend_json(c, q[0], k, v), 400, "[H, Lq, d]")
    check_status(attend_json(c, q[None], k, v), 400, "batch dimension")
    check_status(attend_json(c, q[None], k[None], v[None, :, :2]), 400)
    body = {"inputs": [tensor("query", q.tolist()), tensor("key", k.tolist())]}
    check_status(c.d.post("/v2/models/att/infer", body), 400, "value")
    q, k, v = qkv(5, 1, 1, 1, 4097, 4, 4)
    check_status(attend_json(c, q, k, v), 400, "max_sequence_length")
    # NaN and Inf travel only in binary form
    q, k, v = (a.astype(np.float32) for a in qkv(6, 1, 1, 4, 4, 4, 4))
    k[0, 2, 1] = np.nan
    check_status(post_binary(c, "att", [("query", q), ("key", k), ("value", v)]), 400)
    k[0, 2, 1] = np.inf
    check_status(post_binary(c, "att", [("query", q), ("key", k), ("value", v)]), 400)


def test_bad_config(c):
    repo = make_repo()
    try:
        write_model(repo, "a", {"kind": "attention", "max_sequence_length": 0}, None)
        write_model(repo, "b", {"kind": "attention", "heads": 4}, None)
        d = Daemon(repo).start(wait_ready=False)
        try:
            idx = {m["name"]: m for m in d.post("/v2/repository/index").json()}
            check("max_sequence_length" in idx["a"]["reason"], idx)
            check("heads" in idx["b"]["reason"], idx)
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
