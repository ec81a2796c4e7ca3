"""GPU end-to-end check: the same attention and transformer requests sent to a
tallyd started with --device cuda and one started with --device cpu must give
the same answers (the CPU kernels are themselves tested against the scalar
reference). Prints one line per case and the tally line; exits 77 (skipped)
when the binary has no CUDA or no GPU is present. Needs a CUDA build:
    make CUDA=1 BUILD=build-cuda build-cuda/tallyd
    TALLYD_BIN=build-cuda/tallyd python3 tests/gpu/gpu_check.py REPO"""
import array
import json
import os
import random
import struct
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "integration"))
from harness import Daemon  # noqa: E402


def binary_request(tensors, params, out_names):
    head = {"inputs": [], "parameters": params,
            "outputs": [{"name": n, "parameters": {"binary_data": True}} for n in out_names]}
    blobs = []
    for name, shape, dt, values in tensors:
        fmt = {"FP32": "f", "INT64": "q"}[dt]
        b = values if isinstance(values, bytes) else struct.pack("<%d%s" % (len(values), fmt), *values)
        head["inputs"].append({"name": name, "shape": shape, "datatype": dt,
                               "parameters": {"binary_data_size": len(b)}})
        blobs.append(b)
    h = json.dumps(head).encode()
    return h + b"".join(blobs), len(h)


def floats_of(resp, name):
    n = int(resp.headers["inference-header-content-length"])
    head = json.loads(resp.body[:n])
    off = n
    for o in head["outputs"]:
        size = o["parameters"]["binary_data_size"]
        if o["name"] == name:
            return struct.unpack("<%df" % (size // 4), resp.body[off:off + size])
        off += size
    raise KeyError(name)


def post(d, path, body, hl):
    return d.request("POST", path, body, headers={"Inference-Header-Content-Length": str(hl)},
                     timeout=600)


def main():
    repo = sys.argv[1]
    gpu = Daemon(repo, ["--device", "cuda", "--log-level", "warn", "--max-body-bytes", "1000000000"])
    try:
        gpu.start()
    except RuntimeError as e:
        print("skip: tallyd --device cuda did not start: %s" % str(e)[-300:])
        print("tally: 0 passed, 0 failed, 1 skipped")
        sys.exit(77)
    cpu = Daemon(repo, ["--device", "cpu", "--log-level", "warn", "--max-body-bytes", "1000000000"]).start()
    passed = failed = 0
    rng = random.Random(3)
    cases = []
    for variant in ("softmax", "lssa", "lssar"):
        for causal in (True, False):
            cases.append((variant, causal, 8, 2, 777, 1000, 64, 32))
    cases.append(("lssar", True, 12, 12, 1, 4097, 128, 128))
    cases.append(("softmax", True, 4, 4, 63, 63, 80, 80))
    for variant, causal, H, Hkv, Lq, Lk, d, dv in cases:
        q = [rng.gauss(0, 1) for _ in range(H * Lq * d)]
        k = [rng.gauss(0, 1) for _ in range(Hkv * Lk * d)]
        v = [rng.gauss(0, 1) for _ in range(Hkv * Lk * dv)]
        body, hl = binary_request([("query", [H, Lq, d], "FP32", q), ("key", [Hkv, Lk, d], "FP32", k),
                                   ("value", [Hkv, Lk, dv], "FP32", v)],
                                  {"attention": variant, "causal": causal}, ["output"])
        times = []
        outs = []
        for dmn in (gpu, cpu):
            t0 = time.time()
            r = post(dmn, "/v2/models/attention_demo/infer", body, hl)
            times.append(time.time() - t0)
            if r.status != 200:
                outs.append(None)
                print("  %s: %d %s" % (dmn.args[1], r.status, r.body[:300]))
                continue
            outs.append(floats_of(r, "output"))
        ok = outs[0] is not None and outs[1] is not None
        err = max(abs(a - b) / max(1.0, abs(b)) for a, b in zip(*outs)) if ok else float("nan")
        ok = ok and err < 1e-4
        passed += ok
        failed += not ok
        print("%s attention %-7s causal=%d H=%d Hkv=%d Lq=%d Lk=%d d=%d dv=%d: max rel err %.2e "
              "(gpu %.3fs, cpu %.3fs)" % ("ok  " if ok else "FAIL", variant, causal, H, Hkv, Lq, Lk,
                                          d, dv, err, times[0], times[1]))
    for variant in ("softmax", "lssa", "lssar"):
        ids = [rng.randrange(256) for _ in range(300)]
        body, hl = binary_request([("input_ids", [1, len(ids)], "INT64", ids)],
                                  {"attention": variant}, ["token_logprobs", "nll"])
        outs = [floats_of(post(dmn, "/v2/models/tiny_gpt2/infer", body, hl), "token_logprobs")
                for dmn in (gpu, cpu)]
        err = max(abs(a - b) / max(1.0, abs(b)) for a, b in zip(*outs))
        ok = err < 1e-4
        passed += ok
        failed += not ok
        print("%s transformer tiny_gpt2 %-7s 300 tokens: token_logprobs max rel err %.2e"
              % ("ok  " if ok else "FAIL", variant, err))
    # one long case, timed only (its CPU answer is the same kernel the unit tests check)
    H, L, d = 12, 32768, 64
    block = array.array("f", [rng.gauss(0, 1) for _ in range(4099)])
    def big(n, shift):
        return (block[shift:] + block * (n // len(block) + 1))[:n].tobytes()
    body, hl = binary_request([("query", [H, L, d], "FP32", big(H * L * d, 1)),
                               ("key", [H, L, d], "FP32", big(H * L * d, 2)),
                               ("value", [H, L, d], "FP32", big(H * L * d, 3))],
                              {"attention": "lssar", "causal": True}, ["output"])
    for dmn in (gpu, cpu):
        t0 = time.time()
        r = post(dmn, "/v2/models/attention_demo/infer", body, hl)
        dt = time.time() - t0
        pairs = L * (L + 1) / 2 * H
        print("timing %s lssar causal H=%d L=%d d=%d over HTTP: %d in %.2fs (%.1f GFLOP/s incl. transfer)"
              % (dmn.args[1], H, L, d, r.status, dt, 4 * d * pairs / dt / 1e9))
    gpu.stop()
    cpu.stop()
    print("tally: %d passed, %d failed, 0 skipped" % (passed, failed))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
