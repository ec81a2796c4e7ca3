"""Triton's remaining client calls (issue 11), spoken over HTTP exactly as
NVIDIA's tritonclient sends them (transcribed from its http/_client.py and
_utils.py: the paths, the bodies, the headers; tritonclient itself is not
installed here):

- get_model_config: GET v2/models/{m}[/versions/{v}]/config, Triton's shape;
- get_inference_statistics: GET v2/models/stats and v2/models/{m}[/versions/
  {v}]/stats, with counts that follow the requests sent (per version); a
  model directory named "stats" is refused with its reason;
- request_compression_algorithm / response_compression_algorithm: the whole
  body gzip.compress'ed or zlib.compress'ed with Content-Encoding (binary
  tensors included, Inference-Header-Content-Length the plain JSON's
  length), Accept-Encoding gzip / deflate; a bomb is a 413 at
  --max-body-bytes of inflated bytes without the daemon holding the rest;
- load_model(config=..., files=...) and unload_model(unload_dependents=...);
- the shared-memory, trace and log-settings calls: a 400 with the reason.

Each case fails on a daemon without the feature (a 404 route, a silent
default, an ignored header or body)."""
import gzip
import json
import os
import shutil
import signal
import struct
import time
import zlib

from harness import (ROOT, Daemon, check, check_status, collect, make_repo, run_tests, tensor)

MAX_BODY = 1 << 20  # --max-body-bytes for this daemon: the bomb's cap


def rows(n, d=16):
    return [[((i * 7 + j) % 5) * 0.25 - 0.5 for j in range(d)] for i in range(n)]


def copy_model(repo, src, name, **cfg_changes):
    shutil.copytree(os.path.join(ROOT, "deploy", "models", src), os.path.join(repo, name))
    path = os.path.join(repo, name, "config.json")
    if cfg_changes:
        with open(path) as f:
            cfg = json.load(f)
        cfg.update(cfg_changes)
        with open(path, "w") as f:
            json.dump(cfg, f)
    return path


class Ctx:
    def __init__(self):
        self.repo = make_repo()
        copy_model(self.repo, "demo_mlp", "demo_mlp")
        copy_model(self.repo, "demo_mlp", "st_mlp")       # statistics, its own counts
        self.ov_config = copy_model(self.repo, "demo_mlp", "ov_mlp")  # load overrides
        copy_model(self.repo, "demo_mlp", "mb4", max_batch=4)
        copy_model(self.repo, "demo_mlp", "stats")        # the reserved name
        with open(self.ov_config, "rb") as f:
            self.ov_bytes = f.read()
        self.d = Daemon(self.repo, ["--threads", "2", "--log-level", "warn",
                                    "--max-body-bytes", str(MAX_BODY)])
        self.d.start()

    def daemon_logs(self):
        return self.d.logs()


def teardown(c):
    c.d.stop()


def infer_body(n, binary=False, binary_out=False):
    """A tritonclient infer body for demo_mlp: (body bytes, headers)."""
    x = rows(n)
    flat = [v for r in x for v in r]
    inp = {"name": "features", "shape": [n, 16], "datatype": "FP32"}
    req = {"inputs": [inp]}
    if binary_out:
        req["parameters"] = {"binary_data_output": True}  # tritonclient with no outputs given
    else:
        req["outputs"] = [{"name": "output", "parameters": {"binary_data": False}}]
    if not binary:
        inp["data"] = flat
        return json.dumps(req).encode(), {}
    raw = struct.pack("<%df" % len(flat), *flat)
    inp["parameters"] = {"binary_data_size": len(raw)}
    head = json.dumps(req).encode()
    return head + raw, {"Inference-Header-Content-Length": str(len(head))}


def outputs_of(body, headers):
    """The answer's output values, whatever its framing (JSON or binary)."""
    n = headers.get("inference-header-content-length")
    head = json.loads(body[:int(n)] if n else body)
    o = head["outputs"][0]
    if "data" in o:
        return o["shape"], o["data"]
    raw = body[int(n):int(n) + o["parameters"]["binary_data_size"]]
    return o["shape"], list(struct.unpack("<%df" % (len(raw) // 4), raw))


# ---- get_model_config ----------------------------------------------------------

def test_model_config(c):
    for path in ("/v2/models/demo_mlp/config", "/v2/models/demo_mlp/versions/1/config"):
        j = check_status(c.d.get(path), 200).json()
        check(j["name"] == "demo_mlp" and j["platform"] == "tallyd" and j["backend"] == "tallyd", j)
        check(j["max_batch_size"] == 0, j)
        check(j["version_policy"] == {"latest": {"num_versions": 1}}, j)
        check(j["input"] == [{"name": "features", "data_type": "TYPE_FP32", "dims": [-1, 16]}], j)
        check(j["output"] == [{"name": "output", "data_type": "TYPE_FP32", "dims": [-1, 4]}], j)
        check(j["parameters"]["kind"] == {"string_value": "mlp"}, j)
        check(json.loads(j["parameters"]["activations"]["string_value"]) == ["relu", "softmax"], j)
        check("dynamic_batching" not in j, "no dynamic_batching in config.json, none answered")
    # max_batch_size > 0: Triton's dims leave the batch dimension out
    j = check_status(c.d.get("/v2/models/mb4/config"), 200).json()
    check(j["max_batch_size"] == 4 and j["input"][0]["dims"] == [16], j)
    check("max_batch" not in j["parameters"], "max_batch has its own field")
    check_status(c.d.get("/v2/models/nope/config"), 404, "nope")
    check_status(c.d.get("/v2/models/demo_mlp/versions/9/config"), 404, "version 9")
    ext = c.d.get("/v2").json()["extensions"]
    check("model_configuration" in ext and "statistics" in ext, ext)


# ---- get_inference_statistics ----------------------------------------------------

def stats_of(c, model, version=None):
    path = "/v2/models/%s%s/stats" % (model, "/versions/%s" % version if version else "")
    j = check_status(c.d.get(path), 200).json()
    return j["model_stats"]


def test_statistics_follow_requests(c):
    before = stats_of(c, "st_mlp")
    check(len(before) == 1 and before[0]["name"] == "st_mlp" and before[0]["version"] == "1", before)
    s = before[0]
    check(s["inference_count"] == 0 and s["execution_count"] == 0 and s["last_inference"] == 0, s)
    check(s["inference_stats"]["success"] == {"count": 0, "ns": 0}, s)
    t0 = time.time()
    for n in (2, 2, 2, 5):
        body, h = infer_body(n, binary=(n == 5), binary_out=(n == 5))
        check_status(c.d.request("POST", "/v2/models/st_mlp/infer", body, headers=h), 200)
    bad = c.d.infer("st_mlp", [tensor("features", rows(1, 3))])     # wrong shape: a failure
    check_status(bad, 400)
    check_status(c.d.infer("demo_mlp", [tensor("features", rows(1))]), 200)  # another model
    s = stats_of(c, "st_mlp")[0]
    check(s["execution_count"] == 4, s)
    check(s["inference_count"] == 11, "rows: 2+2+2+5, got %r" % s["inference_count"])
    st = s["inference_stats"]
    check(st["success"]["count"] == 4 and st["fail"]["count"] == 1, st)
    for k in ("queue", "compute_input", "compute_infer", "compute_output"):
        check(st[k]["count"] == 4 and st[k]["ns"] > 0, (k, st[k]))
    # the parts are the whole: queue + input + infer + output = success (ns
    # rounded per part: a few ns either way)
    parts = sum(st[k]["ns"] for k in ("queue", "compute_input", "compute_infer", "compute_output"))
    check(abs(parts - st["success"]["ns"]) <= 16, (parts, st["success"]))
    check(st["fail"]["ns"] > 0 and st["cache_hit"] == {"count": 0, "ns": 0}, st)
    # wall clock in ms: bounds are the test's own span, widened by a minute
    check((t0 - 60) * 1000 <= s["last_inference"] <= (time.time() + 60) * 1000, s["last_inference"])
    by = {b["batch_size"]: b for b in s["batch_stats"]}
    check(sorted(by) == [2, 5], s["batch_stats"])
    check(by[2]["compute_infer"]["count"] == 3 and by[5]["compute_infer"]["count"] == 1, by)
    # the same through the version's path and the all-models path
    check(stats_of(c, "st_mlp", 1)[0]["execution_count"] == 4, "versioned stats")
    allm = check_status(c.d.get("/v2/models/stats"), 200).json()["model_stats"]
    names = {m["name"]: m for m in allm}
    check("st_mlp" in names and "demo_mlp" in names and "stats" not in names, sorted(names))
    check(names["st_mlp"]["execution_count"] == 4 and names["demo_mlp"]["execution_count"] >= 1,
          names["demo_mlp"])
    check_status(c.d.get("/v2/models/nope/stats"), 404, "nope")
    check_status(c.d.get("/v2/models/st_mlp/versions/7/stats"), 404, "version 7")
    check_status(c.d.post("/v2/models/stats", {}), 405)


def test_reserved_model_name_stats(c):
    # the daemon is ready (Ctx waited for it) although "stats" is not served
    idx = [m for m in c.d.post("/v2/repository/index").json() if m["name"] == "stats"]
    check(len(idx) == 1 and idx[0]["state"] == "UNAVAILABLE" and "reserved" in idx[0]["reason"], idx)
    check_status(c.d.post("/v2/repository/models/stats/load", {}), 400, "reserved")
    check_status(c.d.get("/v2/models/stats/ready"), 404)
    check(c.d.get("/v2/health/ready").status == 200, "a reserved name holds readiness back")


# ---- compression -------------------------------------------------------------------

def test_request_compression(c):
    plain_body, h = infer_body(6, binary=True)
    want = outputs_of(*(lambda r: (r.body, r.headers))(
        check_status(c.d.request("POST", "/v2/models/demo_mlp/infer", plain_body, headers=h), 200)))
    for coding, pack in (("gzip", gzip.compress), ("deflate", zlib.compress),
                         ("x-gzip", gzip.compress)):
        hh = dict(h, **{"Content-Encoding": coding})
        r = check_status(c.d.request("POST", "/v2/models/demo_mlp/infer", pack(plain_body),
                                     headers=hh), 200)
        check(outputs_of(r.body, r.headers) == want, coding)
    # JSON-only body, deflate
    body, _ = infer_body(3)
    r = check_status(c.d.request("POST", "/v2/models/demo_mlp/infer", zlib.compress(body),
                                 headers={"Content-Encoding": "deflate"}), 200)
    check(r.json()["outputs"][0]["shape"] == [3, 4], r)
    # a broken stream, a truncated one, trailing bytes: 400 naming the coding
    z = gzip.compress(plain_body)
    for bad in (b"not gzip at all", z[:len(z) // 2], z + b"junk"):
        check_status(c.d.request("POST", "/v2/models/demo_mlp/infer", bad,
                                 headers=dict(h, **{"Content-Encoding": "gzip"})), 400, "gzip")
    # codings tallyd does not read: 415, before the body
    for coding in ("br", "gzip, gzip", "compress"):
        check_status(c.d.request("POST", "/v2/models/demo_mlp/infer", plain_body,
                                 headers=dict(h, **{"Content-Encoding": coding})), 415,
                     "Content-Encoding")
    # Inference-Header-Content-Length is checked against the inflated body
    hh = {"Content-Encoding": "gzip", "Inference-Header-Content-Length": str(len(plain_body) + 1)}
    check_status(c.d.request("POST", "/v2/models/demo_mlp/infer", z, headers=hh), 400,
                 "Inference-Header-Content-Length")


def vm_kb(pid, key):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def test_compression_bomb(c):
    # 256 MiB of zeros is 254 KiB of gzip: small enough to send, 256 times
    # the --max-body-bytes of 1 MiB once inflated
    co = zlib.compressobj(9, zlib.DEFLATED, 31)
    zeros = b"\0" * (1 << 20)
    bomb = b"".join(co.compress(zeros) for _ in range(256)) + co.flush()
    check(len(bomb) < MAX_BODY, len(bomb))
    hwm0 = vm_kb(c.d.proc.pid, "VmHWM")
    r = check_status(c.d.request("POST", "/v2/models/demo_mlp/infer", bomb,
                                 headers={"Content-Encoding": "gzip"}), 413, "inflate")
    hwm1 = vm_kb(c.d.proc.pid, "VmHWM")
    # inflating stops at the cap: the peak grows by about 1 MiB, never by
    # the 256 MiB of the whole (bound: 64 MiB, for allocator slack and sanitizers)
    check(hwm1 - hwm0 < 64 * 1024, "peak memory grew by %d KiB" % (hwm1 - hwm0))
    # a body just under the cap inflated is taken (it is then a JSON error,
    # not a 413): the cap is on the inflated size, inclusive
    pad = b" " * (MAX_BODY - 64)
    body = pad + json.dumps({"inputs": 1}).encode()
    check(len(body) <= MAX_BODY, len(body))
    check_status(c.d.request("POST", "/v2/models/demo_mlp/infer", gzip.compress(body),
                             headers={"Content-Encoding": "gzip"}), 400)
    check(r.headers.get("content-encoding") is None, "an error is never compressed")


def test_response_compression(c):
    body, h = infer_body(40)
    plain = check_status(c.d.request("POST", "/v2/models/demo_mlp/infer", body, headers=h), 200)
    check(plain.headers.get("content-encoding") is None, plain.headers)
    check("Accept-Encoding" in plain.headers.get("vary", ""), "Vary: %r" % plain.headers.get("vary"))
    cases = [("gzip", "gzip"), ("deflate", "deflate"), ("gzip;q=0.5, deflate", "deflate"),
             ("deflate;q=0.4, gzip;q=0.6", "gzip"), ("*", "gzip"), ("gzip;q=0, deflate;q=0", None),
             ("br", None), ("identity;q=0, br", None), ("x-gzip", "gzip")]
    for accept, coding in cases:
        r = check_status(c.d.request("POST", "/v2/models/demo_mlp/infer", body,
                                     headers=dict(h, **{"Accept-Encoding": accept})), 200)
        check(r.headers.get("content-encoding") == coding,
              "Accept-Encoding %r: Content-Encoding %r" % (accept, r.headers.get("content-encoding")))
        check("Accept-Encoding" in r.headers.get("vary", ""), accept)
        raw = r.body
        if coding == "gzip":
            raw = gzip.decompress(raw)
            check(len(r.body) < len(raw) // 2, "gzip did not shrink %d bytes" % len(raw))
        elif coding == "deflate":
            raw = zlib.decompress(raw)
        check(raw == plain.body, accept)
    # binary outputs (tritonclient's default): the header gives the plain JSON's length
    body, h = infer_body(40, binary=True, binary_out=True)
    r = check_status(c.d.request("POST", "/v2/models/demo_mlp/infer", body,
                                 headers=dict(h, **{"Accept-Encoding": "gzip"})), 200)
    check(r.headers.get("content-encoding") == "gzip", r.headers)
    shape, vals = outputs_of(gzip.decompress(r.body), r.headers)
    check(shape == [40, 4] and len(vals) == 160, shape)
    # small answers and errors go as they are
    small = c.d.request("POST", "/v2/models/demo_mlp/infer", infer_body(1)[0],
                        headers={"Accept-Encoding": "gzip"})
    check(len(small.body) < 256 and small.headers.get("content-encoding") is None, small.headers)
    err = c.d.request("POST", "/v2/models/demo_mlp/infer", b"{" * 400,
                      headers={"Accept-Encoding": "gzip"})
    check_status(err, 400)
    check(err.headers.get("content-encoding") is None, err.headers)


# ---- load_model / unload_model ---------------------------------------------------------

def load(c, model, config=None, files=None, raw=None):
    """tritonclient's load_model body: {"parameters": {"config": <text>, "file:..": b64}}."""
    if raw is not None:
        return c.d.request("POST", "/v2/repository/models/%s/load" % model, raw)
    req = {}
    if config is not None:
        req.setdefault("parameters", {})["config"] = config
    for path, b64 in (files or {}).items():
        req.setdefault("parameters", {})[path] = b64
    return c.d.request("POST", "/v2/repository/models/%s/load" % model, json.dumps(req).encode())


def infer_status(c, model, n):
    return c.d.infer(model, [tensor("features", rows(n))]).status


def test_load_with_config_override(c):
    cfg = check_status(c.d.get("/v2/models/ov_mlp/config"), 200).json()
    check(infer_status(c, "ov_mlp", 3) == 200, "no max batch yet")
    # get_model_config's answer, changed and sent back
    cfg2 = dict(cfg, max_batch_size=2)
    cfg2["input"] = [dict(cfg["input"][0], dims=[16])]  # dims without the batch, as Triton's
    cfg2["output"] = [dict(cfg["output"][0], dims=[4])]
    check_status(load(c, "ov_mlp", json.dumps(cfg2)), 200)
    now = check_status(c.d.get("/v2/models/ov_mlp/config"), 200).json()
    check(now["max_batch_size"] == 2 and now["input"][0]["dims"] == [16], now)
    check(infer_status(c, "ov_mlp", 2) == 200 and infer_status(c, "ov_mlp", 3) == 400,
          "the override's max_batch is in force")
    with open(c.ov_config, "rb") as f:
        check(f.read() == c.ov_bytes, "the override was written to config.json")
    # bad overrides: 400 naming the key, and the model keeps what it had
    bad = [
        (dict(cfg2, instance_group=[{"count": 1}]), "instance_group"),
        (dict(cfg2, parameters=dict(cfg2["parameters"], foo={"string_value": "1"})), "foo"),
        (dict(cfg2, parameters=dict(cfg2["parameters"],
                                    activations={"string_value": '["relu", "bogus"]'})), "bogus"),
        (dict(cfg2, max_batch_size=-1), "max_batch"),
        (dict(cfg2, name="other"), "name"),
        (dict(cfg2, platform="onnxruntime_onnx"), "platform"),
        (dict(cfg2, version_policy={"newest": {}}), "version_policy"),
        (dict(cfg2, input=[dict(cfg2["input"][0], dims=[17])]), "input"),
        ({k: v for k, v in cfg2.items() if k != "parameters"}, "kind"),
    ]
    for body, word in bad:
        check_status(load(c, "ov_mlp", json.dumps(body)), 400, word)
    check_status(load(c, "ov_mlp", "{not json"), 400, "config")
    check_status(load(c, "ov_mlp", json.dumps([1])), 400, "object")
    check(infer_status(c, "ov_mlp", 2) == 200 and infer_status(c, "ov_mlp", 3) == 400,
          "a refused override changed what is served")
    # tallyd's own config.json shape is taken too
    native = {"kind": "mlp", "activations": ["relu", "softmax"], "max_batch": 1}
    check_status(load(c, "ov_mlp", json.dumps(native)), 200)
    check(infer_status(c, "ov_mlp", 1) == 200 and infer_status(c, "ov_mlp", 2) == 400, "native")
    check_status(load(c, "ov_mlp", json.dumps(dict(native, colour="red"))), 400, "colour")
    # files: not supported, said so; unknown parameters and fields named
    check_status(load(c, "ov_mlp", json.dumps(cfg2), files={"file:1/model.safetensors": "AAAA"}),
                 400, "file:1/model.safetensors")
    check_status(load(c, "ov_mlp", raw=b'{"parameters": {"confg": "{}"}}'), 400, "confg")
    check_status(load(c, "ov_mlp", raw=b'{"params": {}}'), 400, "params")
    check_status(load(c, "ov_mlp", raw=b'{"parameters": '), 400, "JSON")
    check_status(load(c, "nope", json.dumps(dict(cfg2, name="nope"))), 404, "nope")
    # a load without config goes back to config.json
    check_status(load(c, "ov_mlp"), 200)
    check(c.d.get("/v2/models/ov_mlp/config").json()["max_batch_size"] == 0, "back to config.json")
    check(infer_status(c, "ov_mlp", 3) == 200, "back to config.json")
    # an empty body (curl -X POST) is a plain load
    check_status(c.d.request("POST", "/v2/repository/models/ov_mlp/load", b""), 200)


def test_override_outlives_rescans(c):
    """While an override is in force, a rescan (SIGHUP) that finds a new
    version and a changed config.json loads the new version with the
    override; a load without config then takes config.json's."""
    cfg = check_status(c.d.get("/v2/models/ov_mlp/config"), 200).json()
    # input and output left out: they are the model's own
    slim = {k: v for k, v in cfg.items() if k not in ("input", "output")}
    check_status(load(c, "ov_mlp", json.dumps(dict(slim, max_batch_size=2))), 200)
    with open(c.ov_config) as f:
        disk = json.load(f)
    try:
        with open(c.ov_config, "w") as f:
            json.dump(dict(disk, max_batch=3), f)
        shutil.copytree(os.path.join(c.repo, "ov_mlp", "1"), os.path.join(c.repo, "ov_mlp", "2"))
        c.d.proc.send_signal(signal.SIGHUP)
        deadline = time.time() + 30  # a bound on the rescan, not a timing assertion
        while time.time() < deadline:
            r = c.d.get("/v2/models/ov_mlp/versions/2/config")
            if r.status == 200:
                break
            time.sleep(0.05)
        check_status(r, 200)
        check(r.json()["max_batch_size"] == 2, "version 2 loaded with config.json, not the override")
        check(infer_status(c, "ov_mlp", 3) == 400, "the override's max_batch")
        check_status(load(c, "ov_mlp"), 200)
        check(c.d.get("/v2/models/ov_mlp/config").json()["max_batch_size"] == 3, "config.json's")
    finally:
        with open(c.ov_config, "w") as f:
            f.write(c.ov_bytes.decode())
        shutil.rmtree(os.path.join(c.repo, "ov_mlp", "2"), ignore_errors=True)
        check_status(load(c, "ov_mlp"), 200)
    check(c.d.get("/v2/models/ov_mlp/config").json()["max_batch_size"] == 0, "restored")


def test_unload_dependents(c):
    path = "/v2/repository/models/ov_mlp/unload"
    check_status(c.d.request("POST", path, json.dumps(
        {"parameters": {"unload_dependents": True}}).encode()), 400, "unload_dependents")
    check_status(c.d.request("POST", path, b'{"parameters": {"force": true}}'), 400, "force")
    check(infer_status(c, "ov_mlp", 1) == 200, "a refused unload unloaded")
    check_status(c.d.request("POST", path, json.dumps(
        {"parameters": {"unload_dependents": False}}).encode()), 200)
    check(infer_status(c, "ov_mlp", 1) in (404, 503), "still served after unload")
    check_status(load(c, "ov_mlp"), 200)
    check(infer_status(c, "ov_mlp", 1) == 200, "reloaded")


# ---- the calls tallyd refuses ----------------------------------------------------------

def test_unsupported_calls_say_so(c):
    calls = [
        ("GET", "/v2/systemsharedmemory/status", None, "system shared memory"),
        ("GET", "/v2/systemsharedmemory/region/r0/status", None, "system shared memory"),
        ("POST", "/v2/systemsharedmemory/region/r0/register",
         {"key": "/shm0", "offset": 0, "byte_size": 64}, "system shared memory"),
        ("POST", "/v2/systemsharedmemory/region/r0/unregister", "", "system shared memory"),
        ("POST", "/v2/systemsharedmemory/unregister", "", "system shared memory"),
        ("GET", "/v2/cudasharedmemory/status", None, "CUDA shared memory"),
        ("GET", "/v2/cudasharedmemory/region/r0/status", None, "CUDA shared memory"),
        ("POST", "/v2/cudasharedmemory/region/r0/register",
         {"raw_handle": {"b64": "AAAA"}, "device_id": 0, "byte_size": 64}, "CUDA shared memory"),
        ("POST", "/v2/cudasharedmemory/region/r0/unregister", "", "CUDA shared memory"),
        ("POST", "/v2/cudasharedmemory/unregister", "", "CUDA shared memory"),
        ("GET", "/v2/trace/setting", None, "trace settings"),
        ("POST", "/v2/trace/setting", {"trace_level": ["TIMESTAMPS"]}, "trace settings"),
        ("GET", "/v2/models/demo_mlp/trace/setting", None, "trace settings"),
        ("POST", "/v2/models/demo_mlp/trace/setting", {"trace_rate": "1"}, "trace settings"),
        ("GET", "/v2/logging", None, "log settings"),
        ("POST", "/v2/logging", {"log_verbose_level": 1}, "log settings"),
    ]
    for method, path, body, words in calls:
        data = None if body is None else (body.encode() if isinstance(body, str)
                                          else json.dumps(body).encode())
        r = c.d.request(method, path, data)
        check_status(r, 400, words)
        check("not supported" in r.json()["error"] or "cannot" in r.json()["error"], r)
    check_status(c.d.request("DELETE", "/v2/logging"), 405)


if __name__ == "__main__":
    run_tests(collect(globals()), setup=Ctx, teardown=teardown)
