"""The OIP v2 contract over real HTTP: every endpoint and every error status
of api.md, on a daemon started on a free port with a temporary repository."""
import array
import json
import os
import random
import shutil
import signal
import socket
import struct
import threading
import time

from harness import (SLOW, Daemon, check, check_status, close, collect, make_repo, output,
                     run_tests, tensor, write_model)

# A hand-checkable mlp: h = relu(W0 x + b0), y = W1 h + b1.
#   x = [1, 2, 3]: h = relu([1-3, 0.5*6+1]) = [0, 4]; y = 0 - 4 + 0.5 = -3.5
#   x = [3, 2, 1]: h = relu([3-1, 4]) = [2, 4];      y = 2 - 4 + 0.5 = -1.5
HAND = {
    "layers.0.weight": ("F32", [2, 3], [1, 0, -1, 0.5, 0.5, 0.5]),
    "layers.0.bias": ("F32", [2], [0, 1]),
    "layers.1.weight": ("F32", [1, 2], [1, -1]),
    "layers.1.bias": ("F32", [1], [0.5]),
}


def heavy_tensors(width=1024, depth=6, d_in=16):
    """A wide mlp whose large batches take a while (429 and 504 tests)."""
    rng = random.Random(7)
    block = array.array("f", [rng.uniform(-0.03, 0.03) for _ in range(4096)])
    def mat(n):
        reps = n // len(block) + 1
        return (block * reps)[:n].tobytes()
    t = {"layers.0.weight": ("F32", [width, d_in], mat(width * d_in)),
         "layers.0.bias": ("F32", [width], mat(width))}
    for i in range(1, depth - 1):
        t["layers.%d.weight" % i] = ("F32", [width, width], mat(width * width))
        t["layers.%d.bias" % i] = ("F32", [width], mat(width))
    t["layers.%d.weight" % (depth - 1)] = ("F32", [1, width], mat(width))
    t["layers.%d.bias" % (depth - 1)] = ("F32", [1], mat(1))
    return t, ["relu"] * (depth - 1) + ["none"]


class Ctx:
    def __init__(self):
        self.repo = make_repo()
        write_model(self.repo, "hand", {"kind": "mlp", "activations": ["relu", "none"]}, HAND)
        write_model(self.repo, "hand", {"kind": "mlp", "activations": ["relu", "none"]}, HAND,
                    version=2)
        # version 3 is broken: the newest working version (2) keeps serving
        os.makedirs(os.path.join(self.repo, "hand", "3"))
        with open(os.path.join(self.repo, "hand", "3", "model.safetensors"), "wb") as f:
            f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
        # a model that cannot load at all
        write_model(self.repo, "broken", {"kind": "mlp", "activations": ["relu"]},
                    {"layers.0.weight": ("F32", [2, 3], [0] * 6)})  # bias missing
        write_model(self.repo, "nokind", {"kind": "no_such_kind"}, None)
        t, acts = heavy_tensors()
        write_model(self.repo, "heavy", {"kind": "mlp", "activations": acts}, t)
        with open(os.path.join(self.repo, "hand", "config.json"), "w") as f:
            json.dump({"kind": "mlp", "activations": ["relu", "none"],
                       "version_policy": {"specific": {"versions": [1, 2, 3]}}}, f)
        self.d = Daemon(self.repo, ["--max-body-bytes", "200000000", "--threads", "2"]).start(
            wait_ready=False)

    def daemon_logs(self):
        return self.d.logs()


def setup():
    return Ctx()


def teardown(ctx):
    ctx.d.stop()
    shutil.rmtree(ctx.repo, ignore_errors=True)


def test_health(c):
    r = check_status(c.d.get("/v2/health/live"), 200)
    check(r.json() == {"live": True})
    # 'broken' and 'nokind' never load, so the daemon is not ready
    r = c.d.get("/v2/health/ready")
    check(r.status == 503 and r.json() == {"ready": False}, r)


def test_server_metadata(c):
    j = check_status(c.d.get("/v2"), 200).json()
    check(j["name"] == "tallyd" and "version" in j and "binary_tensor_data" in j["extensions"], j)


def test_model_metadata(c):
    j = check_status(c.d.get("/v2/models/hand"), 200).json()
    check(j["name"] == "hand" and j["platform"] == "mlp", j)
    check(j["versions"] == ["1", "2"], j)
    check(j["inputs"] == [{"name": "features", "datatype": "FP32", "shape": [-1, 3]}], j)
    check(j["outputs"] == [{"name": "output", "datatype": "FP32", "shape": [-1, 1]}], j)
    check(len(j["parameters"]["sha256"]) == 64, j)
    check(j["parameters"]["version"] == "2", j)
    j = check_status(c.d.get("/v2/models/hand/versions/1"), 200).json()
    check(j["parameters"]["version"] == "1", j)
    check_status(c.d.get("/v2/models/nope"), 404, "unknown model")
    check_status(c.d.get("/v2/models/hand/versions/9"), 404, "version 9")
    check_status(c.d.get("/v2/models/hand/versions/01"), 400, "leading zeros")
    check_status(c.d.get("/v2/models/hand/versions/3"), 404)


def test_model_ready(c):
    check(check_status(c.d.get("/v2/models/hand/ready"), 200).json() ==
          {"name": "hand", "ready": True})
    check_status(c.d.get("/v2/models/hand/versions/1/ready"), 200)
    check(c.d.get("/v2/models/broken/ready").status == 503)
    check_status(c.d.get("/v2/models/nope/ready"), 404)


def test_infer_hand_values(c):
    r = check_status(c.d.infer("hand", [tensor("features", [[1, 2, 3], [3, 2, 1]])], id="req-7"), 200)
    j = r.json()
    check(j["model_name"] == "hand" and j["model_version"] == "2" and j["id"] == "req-7", j)
    o = output(r, "output")
    check(o["shape"] == [2, 1] and o["datatype"] == "FP32", o)
    check(close(o["data"][0], -3.5) and close(o["data"][1], -1.5), o)
    r = check_status(c.d.infer("hand", [tensor("features", [1, 2, 3, 3, 2, 1], shape=[2, 3])],
                               version=1), 200)
    check(r.json()["model_version"] == "1")
    check(close(output(r, "output")["data"][0], -3.5))


def test_infer_every_datatype(c):
    for dt in ["UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16",
               "FP32", "FP64"]:
        r = check_status(c.d.infer("hand", [tensor("features", [[1, 2, 3]], datatype=dt)]), 200)
        check(close(output(r, "output")["data"][0], -3.5), (dt, r))
    r = check_status(c.d.infer("hand", [tensor("features", [[True, False, True]], datatype="BOOL")]), 200)
    # x = [1,0,1]: h = relu([1-1, 0.5*2+1]) = [0, 2]; y = 0 - 2 + 0.5 = -1.5
    check(close(output(r, "output")["data"][0], -1.5), r)
    check_status(c.d.infer("hand", [tensor("features", [["a", "b", "c"]], datatype="BYTES")]), 400,
                 "BYTES")
    check_status(c.d.infer("hand", [tensor("features", [[1.5, 2, 3]], datatype="INT32")]), 400,
                 "not an integer")
    check_status(c.d.infer("hand", [tensor("features", [[300, 2, 3]], datatype="UINT8")]), 400,
                 "out of range")
    check_status(c.d.infer("hand", [tensor("features", [[1e300, 2, 3]], datatype="FP64")]), 400,
                 "overflows FP32")


def test_outputs_filter(c):
    r = check_status(c.d.infer("hand", [tensor("features", [[1, 2, 3]])],
                               outputs=[{"name": "output"}]), 200)
    check([o["name"] for o in r.json()["outputs"]] == ["output"])
    check_status(c.d.infer("hand", [tensor("features", [[1, 2, 3]])], outputs=[{"name": "zzz"}]),
                 400, "unknown output")


def test_infer_errors(c):
    p = "/v2/models/hand/infer"
    check_status(c.d.post(p, b"{not json"), 400, "malformed JSON")
    check_status(c.d.post(p, b"[1,2]"), 400, "object")
    check_status(c.d.post(p, {"inputs": "x"}), 400, "inputs")
    check_status(c.d.post(p, {"inputs": [tensor("features", [[1, 2]])]}), 400, "expected shape")
    check_status(c.d.post(p, {"inputs": [tensor("features", [1, 2, 3, 4], shape=[2, 3])]}), 400,
                 "elements")
    check_status(c.d.post(p, {"inputs": [tensor("other", [[1, 2, 3]])]}), 400, "missing input")
    check_status(c.d.post(p, {"inputs": [dict(tensor("features", [[1, 2, 3]]), datatype="FP99")]}),
                 400, "datatype")
    check_status(c.d.post(p, {"inputs": [tensor("features", [[1, 2, 3]], shape=[-1, 3])]}), 400,
                 "non-negative")
    check_status(c.d.post(p, {"inputs": [tensor("features", [], shape=[2 ** 40, 2 ** 40])]}), 400)
    check_status(c.d.post(p, b'{"inputs": [], "inputs": []}'), 400, "duplicate")
    check_status(c.d.post("/v2/models/nope/infer", {"inputs": []}), 404, "unknown model")
    check_status(c.d.post("/v2/models/broken/infer", {"inputs": []}), 503)
    check_status(c.d.post("/v2/models/nokind/infer", {"inputs": []}), 503, "unknown kind")


def test_routes_and_methods(c):
    check_status(c.d.get("/v3/nothing"), 404, "unknown route")
    check_status(c.d.get("/v2/models/hand/infer"), 405)
    r = c.d.get("/v2/models/hand/infer")
    check(r.headers.get("allow") == "POST", r.headers)
    check_status(c.d.post("/v2/health/live"), 405)
    check_status(c.d.request("DELETE", "/v2/models/hand"), 405)
    check_status(c.d.get("/v2/models/" + "x" * 10000), 404)


def test_repository_index_and_reasons(c):
    idx = check_status(c.d.post("/v2/repository/index"), 200).json()
    by = {(e["name"], e["version"]): e for e in idx}
    check(by[("hand", "1")]["state"] == "READY" and by[("hand", "2")]["state"] == "READY", idx)
    check(by[("hand", "3")]["state"] == "UNAVAILABLE", idx)
    check("not valid JSON" in by[("hand", "3")]["reason"], by[("hand", "3")])
    check(by[("broken", "1")]["state"] == "UNAVAILABLE", idx)
    check("layers.0.bias" in by[("broken", "1")]["reason"], by[("broken", "1")])
    check("unknown kind" in by[("nokind", "1")]["reason"], idx)


def test_load_unload(c):
    check(check_status(c.d.post("/v2/repository/models/hand/unload"), 200).json() == {})
    check_status(c.d.infer("hand", [tensor("features", [[1, 2, 3]])]), 503)
    check_status(c.d.post("/v2/repository/models/hand/load"), 200)
    check_status(c.d.infer("hand", [tensor("features", [[1, 2, 3]])]), 200)
    check_status(c.d.post("/v2/repository/models/nope/load"), 404)
    check_status(c.d.post("/v2/repository/models/broken/load"), 503, "layers.0.bias")
    check_status(c.d.get("/v2/repository/models/hand/load"), 405)


def test_binary_extension(c):
    x = struct.pack("<6f", 1, 2, 3, 3, 2, 1)
    js = json.dumps({"inputs": [{"name": "features", "shape": [2, 3], "datatype": "FP32",
                                 "parameters": {"binary_data_size": len(x)}}],
                     "outputs": [{"name": "output", "parameters": {"binary_data": True}}]}).encode()
    r = c.d.post("/v2/models/hand/infer", js + x,
                 headers={"Inference-Header-Content-Length": str(len(js)),
                          "Content-Type": "application/octet-stream"})
    check(r.status == 200, r)
    n = int(r.headers["inference-header-content-length"])
    head = json.loads(r.body[:n])
    check(head["outputs"][0]["parameters"]["binary_data_size"] == 8, head)
    y = struct.unpack("<2f", r.body[n:])
    check(close(y[0], -3.5) and close(y[1], -1.5), y)
    check_status(c.d.post("/v2/models/hand/infer", js + x[:-4],
                          headers={"Inference-Header-Content-Length": str(len(js))}), 400,
                 "binary")


def test_request_id(c):
    r = c.d.get("/v2/health/live", headers={"X-Request-Id": "abc-123"})
    check(r.headers.get("x-request-id") == "abc-123", r.headers)
    r = c.d.get("/v2/health/live")
    check(len(r.headers.get("x-request-id", "")) >= 16, r.headers)


def test_413():
    repo = make_repo()
    write_model(repo, "hand", {"kind": "mlp", "activations": ["relu", "none"]}, HAND)
    d = Daemon(repo, ["--max-body-bytes", "1000"]).start()
    try:
        big = {"inputs": [tensor("features", [[1.0, 2.0, 3.0]] * 200)]}
        check_status(d.post("/v2/models/hand/infer", big), 413, "limit")
        # chunked: no Content-Length, the cap applies while reading
        s = socket.create_connection(("127.0.0.1", d.port))
        s.sendall(b"POST /v2/models/hand/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"x" * 600
        for _ in range(3):
            s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        s.sendall(b"0\r\n\r\n")
        resp = s.recv(65536)
        s.close()
        check(resp.startswith(b"HTTP/1.1 413"), resp[:200])
        check_status(d.infer("hand", [tensor("features", [[1, 2, 3]])]), 200)
    finally:
        d.stop()
        shutil.rmtree(repo, ignore_errors=True)


def heavy_request(rows=3000):
    # ~10 GFLOP per 1000 rows; under valgrind (SLOW) a tenth keeps the same
    # order of seconds
    if SLOW > 1:
        rows = max(1, rows // 10)
    return {"inputs": [tensor("features", [0.5] * (rows * 16), shape=[rows, 16])]}


def test_429_and_504(c):
    d = Daemon(c.repo, ["--threads", "1", "--queue-depth", "1", "--model", "heavy",
                        "--request-timeout-ms", str(60000 * SLOW)]).start()
    try:
        results = []
        def worker():
            results.append(d.post("/v2/models/heavy/infer", heavy_request()))
        ts = [threading.Thread(target=worker) for _ in range(5)]
        for t in ts:
            t.start()
            time.sleep(0.02)
        for t in ts:
            t.join()
        codes = sorted(r.status for r in results)
        check(200 in codes and 429 in codes, codes)
        busy = [r for r in results if r.status == 429][0]
        check_status(busy, 429, "queue is full")
        check(busy.headers.get("retry-after") == "1", busy.headers)
        body = heavy_request(6000)
        body["parameters"] = {"timeout_ms": 30}
        t0 = time.time()
        check_status(d.post("/v2/models/heavy/infer", body), 504, "deadline")
        check(time.time() - t0 < 5 * SLOW, "504 came late")
        check_status(d.infer("heavy", [tensor("features", [[0.5] * 16])]), 200)
    finally:
        check(d.stop() == 0, "exit code")


def test_config_file_and_only_models(c):
    """--config holds the same keys as the flags; flags win; --model limits loading."""
    import tempfile
    cfg = tempfile.mktemp(suffix=".json")
    with open(cfg, "w") as f:
        json.dump({"max_body_bytes": 300, "model": ["hand"], "log-format": "json",
                   "queue_depth": 8}, f)
    d = Daemon(c.repo, ["--config", cfg]).start()
    try:
        idx = check_status(d.post("/v2/repository/index"), 200).json()
        check(sorted({e["name"] for e in idx}) == ["hand"], idx)
        check_status(d.infer("hand", [tensor("features", [[1.0, 2.0, 3.0]] * 20)]), 413)
        check('"level":"info"' in d.logs(), d.logs()[-500:])
    finally:
        d.stop()
    d = Daemon(c.repo, ["--config", cfg, "--max-body-bytes", "100000"]).start()
    try:
        check_status(d.infer("hand", [tensor("features", [[1.0, 2.0, 3.0]] * 20)]), 200)
    finally:
        d.stop()
    with open(cfg, "w") as f:
        json.dump({"no_such_key": 1}, f)
    import subprocess
    from harness import BIN
    r = subprocess.run([BIN, "--model-repository", c.repo, "--config", cfg], capture_output=True)
    check(r.returncode == 2 and b"unknown key 'no_such_key'" in r.stderr, r)
    r = subprocess.run([BIN, "--model-repository", c.repo, "--weights-load", "copy"],
                       capture_output=True)
    check(r.returncode == 2 and b"--weights-load must be read or mmap" in r.stderr, r)
    r = subprocess.run([BIN, "--threads", "x"], capture_output=True)
    check(r.returncode == 2 and b"--threads" in r.stderr, r)
    r = subprocess.run([BIN, "--help"], capture_output=True)
    check(r.returncode == 0 and b"--model-repository" in r.stdout and b"--drain-timeout" in r.stdout, r)
    r = subprocess.run([BIN, "--version"], capture_output=True)
    check(r.returncode == 0 and r.stdout.startswith(b"tallyd "), r)
    os.unlink(cfg)


def test_request_log_line(c):
    r = c.d.get("/v2/health/live", headers={"X-Request-Id": "log-check-1"})
    check(r.status == 200)
    time.sleep(0.05)
    line = [l for l in c.d.logs().splitlines() if "log-check-1" in l]
    check(line and "GET /v2/health/live 200" in line[-1] and "ms" in line[-1], line)


def test_drain_on_sigterm(c):
    d = Daemon(c.repo, ["--threads", "1", "--model", "heavy",
                        "--drain-timeout", str(30000 * SLOW),
                        "--request-timeout-ms", str(60000 * SLOW)]).start()
    out = []
    t = threading.Thread(target=lambda: out.append(d.post("/v2/models/heavy/infer", heavy_request(4000))))
    t.start()
    time.sleep(0.3 if SLOW == 1 else 2.0)
    d.proc.send_signal(signal.SIGTERM)
    t.join()
    check(out and out[0].status == 200, out)
    check(d.proc.wait(30 * SLOW) == 0, "exit code %s" % d.proc.returncode)
    try:
        socket.create_connection(("127.0.0.1", d.port), timeout=1).close()
        check(False, "still accepting after drain")
    except OSError:
        pass
    d.stop()


if __name__ == "__main__":
    tests = collect(globals())
    ctx_tests = [(n, f) for n, f in tests if f.__code__.co_argcount == 1]
    plain = [(n, f) for n, f in tests if f.__code__.co_argcount == 0]
    run_tests([(n, (lambda f: lambda c: f(c))(f)) for n, f in ctx_tests] +
              [(n, (lambda f: lambda c: f())(f)) for n, f in plain], setup=setup, teardown=teardown)
