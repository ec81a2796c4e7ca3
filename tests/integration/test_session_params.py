"""Request parameters of KV-cache session chunks: the request
parameters of a chunk ("attention", "p", "offset_rows") were silently ignored,
so a chunk asking for softmax was scored with the session's LSSAR and a bad
value was accepted. Standard library only (the model generator needs no
numpy)."""
import os
import shutil
import sys

from harness import (ROOT, Daemon, check, check_status, collect, make_repo, output, run_tests,
                     tensor)

sys.path.insert(0, os.path.join(ROOT, "tests", "reference"))
import make_tiny_gpt2  # noqa: E402

V = 50
SEQ = [(7 * i + 3) % V for i in range(24)]


class Ctx:
    pass


def setup():
    c = Ctx()
    c.repo = make_repo()
    make_tiny_gpt2.make(os.path.join(c.repo, "rope"), attention="lssar", positions="rope",
                        seed=1, vocab_size=V, n_positions=64)
    c.d = Daemon(c.repo).start()
    c.daemon_logs = c.d.logs
    return c


def teardown(c):
    c.d.stop()
    shutil.rmtree(c.repo, ignore_errors=True)


def one_shot(c, params):
    r = check_status(c.d.post("/v2/models/rope/infer", {
        "parameters": params, "inputs": [tensor("input_ids", [SEQ], datatype="INT64")]}), 200)
    return output(r, "token_logprobs")["data"]


def chunked(c, params, sizes):
    r = check_status(c.d.post("/v2/models/rope/sessions", {}), 201)
    sid = r.json()["session_id"]
    lps, pos = [], 0
    for n in sizes:
        r = check_status(c.d.post("/v2/models/rope/sessions/%s/infer" % sid, {
            "parameters": params,
            "inputs": [tensor("input_ids", [SEQ[pos:pos + n]], datatype="INT64")]}), 200)
        pos += n
        lps += output(r, "token_logprobs")["data"]
    return lps


def maxdiff(a, b):
    check(len(a) == len(b), (len(a), len(b)))
    return max(abs(x - y) for x, y in zip(a, b))


def test_chunk_parameters_are_honoured(c):
    for params in ({}, {"attention": "softmax"}, {"attention": "lssa"}, {"p": 3, "offset_rows": 0}):
        want = one_shot(c, params)
        got = chunked(c, params, [5, 1, 10, 8])
        check(maxdiff(got, want) < 2e-4, "%r: chunked differs from one request by %g"
              % (params, maxdiff(got, want)))
    # and the parameters really change the answer (else the test proves nothing)
    check(maxdiff(one_shot(c, {"attention": "softmax"}), one_shot(c, {})) > 1e-3,
          "softmax and lssar score alike")


def test_bad_chunk_parameters_are_400(c):
    r = check_status(c.d.post("/v2/models/rope/sessions", {}), 201)
    sid = r.json()["session_id"]
    for params in ({"attention": "nope"}, {"p": -1}, {"offset_rows": -5}, {"p": "x"}):
        check_status(c.d.post("/v2/models/rope/sessions/%s/infer" % sid, {
            "parameters": params,
            "inputs": [tensor("input_ids", [[1, 2]], datatype="INT64")]}), 400)
    r = check_status(c.d.get("/v2/models/rope/sessions/%s" % sid), 200)
    check(r.json()["position"] == 0, "a refused chunk moved the session: %r" % r.json())


if __name__ == "__main__":
    run_tests(collect(globals()), setup, teardown)
