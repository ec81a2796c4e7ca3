#!/usr/bin/env python3
"""Writes the seed corpora of the OIP, binary-extension, config and HTTP
fuzz targets (tests/fuzz/corpus/<target>/) from real requests: the shapes,
datatypes and encodings the integration tests send. Standard library only;
the safetensors seeds come from make_st_seeds.py.

    python3 tests/fuzz/make_seeds.py
"""
import json
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "corpus")


def put(target, name, data):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


def j(o):
    return json.dumps(o, separators=(",", ":")).encode()


def feat(rows, d=4, dt="FP32", nested=False):
    flat = [float((i * 3) % 7) - 3 for i in range(rows * d)]
    data = [flat[r * d:(r + 1) * d] for r in range(rows)] if nested else flat
    if dt.startswith("INT") or dt.startswith("UINT"):
        data = [int(abs(x)) for x in flat]
    return {"name": "features", "shape": [rows, d], "datatype": dt, "data": data}


OIP = {
    "flat": {"inputs": [feat(2)]},
    "nested": {"id": "req-1", "inputs": [feat(2, nested=True)]},
    "fp64": {"inputs": [feat(1, dt="FP64")], "outputs": [{"name": "output"}]},
    "int32": {"inputs": [feat(3, dt="INT32")]},
    "fp16": {"inputs": [feat(1, dt="FP16")], "parameters": {"timeout_ms": 100}},
    "bool": {"inputs": [{"name": "features", "shape": [1, 4], "datatype": "BOOL",
                         "data": [True, False, 1, 0]}]},
    "bytes": {"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": ["ab", "c"]}]},
    "wrong_shape": {"inputs": [feat(2, d=3)]},
    "unknown_output": {"inputs": [feat(1)], "outputs": [{"name": "nope"}]},
    "binary_out": {"inputs": [feat(1)], "parameters": {"binary_data_output": True}},
    "empty_batch": {"inputs": [{"name": "features", "shape": [0, 4], "datatype": "FP32", "data": []}]},
    "two_inputs": {"inputs": [feat(1), {"name": "extra", "shape": [1], "datatype": "INT64", "data": [7]}]},
}
for name, body in OIP.items():
    put("oip", name + ".json", j(body))
# One seed per kind of the fuzz model table (fuzz_common.h), so that every
# kind's infer, fit, evaluate, calibrate and session paths start reachable.
def t(name, shape, dt, data):
    return {"name": name, "shape": shape, "datatype": dt, "data": data}


KINDS = {
    "ens_members": {"inputs": [t("member_outputs", [2, 3], "FP32", [0.5, -1, 2, 0, 0.1, -3])]},
    "ens_features": {"inputs": [feat(2)]},
    "ens_fit": {"inputs": [t("member_outputs", [4, 3], "FP32", [0.5, -1, 2, 0, 0.1, -3, 1, 1, 1,
                                                             -2, -2, -2]),
                           t("labels", [4], "INT64", [1, 0, 1, 0])],
                "parameters": {"epochs": 3, "learning_rate": 0.1, "validation_fraction": 0.25}},
    "ens_ext_eval": {"inputs": [t("member_outputs", [2, 3, 3], "FP32",
                                  [0.2, 0.3, 0.5] * 6),
                                t("labels", [2], "INT64", [2, 0])]},
    "quantile": {"inputs": [t("base_quantiles", [2, 2, 3], "FP32", [-1, 0, 1, -2, 0, 2] * 2),
                            feat(2)]},
    "quantile_fit": {"inputs": [t("base_quantiles", [4, 2, 3], "FP32", [-1, 0, 1, -2, 0, 2] * 4),
                                feat(4), t("targets", [4], "FP32", [0.5, -0.5, 1.5, 0])],
                     "parameters": {"epochs": 2, "batch_size": 2, "method": "cqr"}},
    "attention": {"inputs": [t("query", [2, 2, 2], "FP32", [0.1] * 8),
                             t("key", [1, 3, 2], "FP32", [0.2] * 6),
                             t("value", [1, 3, 2], "FP32", [0.3] * 6)],
                  "parameters": {"causal": True, "query_offset": 1}},
    "attention_lssar": {"inputs": [t("query", [1, 1, 2, 2], "FP32", [0.1, 2, 3, -4]),
                                   t("key", [1, 1, 2, 2], "FP32", [0.2, 1, -1, 3]),
                                   t("value", [1, 1, 2, 2], "FP32", [0.3, 0, 1, 2])],
                        "parameters": {"attention": "lssar", "p": 15, "offset_rows": 1,
                                       "causal": False}},
    "transformer": {"inputs": [t("input_ids", [1, 5], "INT64", [1, 2, 3, 4, 7])]},
    "transformer_offset": {"inputs": [t("input_ids", [2, 2], "INT32", [0, 1, 2, 3])],
                           "parameters": {"query_offset": 0, "attention": "lssa"}},
    "extreme_offset": {"inputs": [t("input_ids", [1, 1], "INT64", [9223372036854775807])],
                       "parameters": {"query_offset": 9223372036854775807,
                                      "timeout_ms": 1e308, "epochs": 9223372036854775807}},
    "fp32_max": {"inputs": [t("member_outputs", [1, 3], "FP32", [3.4e38, -3.4e38, 0]),
                            t("labels", [1], "INT64", [1])]},
}
for name, body in KINDS.items():
    put("oip", "kind_" + name + ".json", j(body))
put("oip", "nan.json", b'{"inputs":[{"name":"features","shape":[1,4],"datatype":"FP32",'
    b'"data":[NaN,1,2,3]}]}')
put("oip", "huge_number.json", b'{"inputs":[{"name":"features","shape":[1,4],"datatype":"FP32",'
    b'"data":[1e999,123456789012345678901234567890,2,3]}]}')


def binary(inputs_meta, blobs, extra=None):
    body = {"inputs": inputs_meta}
    body.update(extra or {})
    head = j(body)
    return head, b"".join(blobs)


def bin_seed(name, head, blob):
    put("oip_binary", name, struct.pack("<H", len(head) & 0xFFFF) + head + blob)


rows = 2
vals = struct.pack("<%df" % (rows * 4), *[float(i) / 4 for i in range(rows * 4)])
h, b = binary([{"name": "features", "shape": [rows, 4], "datatype": "FP32",
                "parameters": {"binary_data_size": len(vals)}}], [vals])
bin_seed("fp32", h, b)
nan = struct.pack("<4f", float("nan"), 1.0, 2.0, 3.0)
h, b = binary([{"name": "features", "shape": [1, 4], "datatype": "FP32",
                "parameters": {"binary_data_size": 16}}], [nan])
bin_seed("nan", h, b)
i64 = struct.pack("<4q", 1, 2, 3, 4)
h, b = binary([{"name": "features", "shape": [1, 4], "datatype": "INT64",
                "parameters": {"binary_data_size": 32}}], [i64],
              {"outputs": [{"name": "output", "parameters": {"binary_data": True}}]})
bin_seed("int64_binary_out", h, b)
byt = struct.pack("<I", 3) + b"abc"
h, b = binary([{"name": "text", "shape": [1], "datatype": "BYTES",
                "parameters": {"binary_data_size": len(byt)}},
               feat(1)], [byt])
bin_seed("bytes_mixed", h, b)
h, b = binary([{"name": "features", "shape": [1, 4], "datatype": "FP32",
                "parameters": {"binary_data_size": 16}}], [vals[:12]])
bin_seed("short", h, b)

# every kind through the binary extension too
ids = struct.pack("<5q", 1, 2, 3, 4, 7)
h, b = binary([{"name": "input_ids", "shape": [1, 5], "datatype": "INT64",
                "parameters": {"binary_data_size": len(ids)}}], [ids])
bin_seed("kind_transformer", h, b)
qkv = struct.pack("<8f", *[0.5, -1, 2, 0.25, 1, 1, -2, 3])
h, b = binary([{"name": n, "shape": [2, 2, 2], "datatype": "FP32",
                "parameters": {"binary_data_size": len(qkv)}} for n in ("query", "key", "value")],
              [qkv] * 3, {"parameters": {"attention": "lssar", "causal": False}})
bin_seed("kind_attention", h, b)
mo = struct.pack("<6f", 0.5, -1, 2, 0, 0.1, -3)
lab = struct.pack("<2q", 1, 0)
h, b = binary([{"name": "member_outputs", "shape": [2, 3], "datatype": "FP32",
                "parameters": {"binary_data_size": len(mo)}},
               {"name": "labels", "shape": [2], "datatype": "INT64",
                "parameters": {"binary_data_size": len(lab)}}], [mo, lab],
              {"parameters": {"epochs": 2}})
bin_seed("kind_ensemble_fit", h, b)
bq = struct.pack("<12f", *([-1, 0, 1, -2, 0, 2] * 2))
tg = struct.pack("<2f", 0.5, -0.5)
h, b = binary([{"name": "base_quantiles", "shape": [2, 2, 3], "datatype": "FP32",
                "parameters": {"binary_data_size": len(bq)}},
               {"name": "targets", "shape": [2], "datatype": "FP32",
                "parameters": {"binary_data_size": len(tg)}}, feat(2)], [bq, tg])
bin_seed("kind_quantile", h, b)

CONFIGS = {
    "full": {"model_repository": "/tmp/x", "listen": "127.0.0.1:8000", "threads": 2,
             "queue_depth": 16, "max_body_bytes": 1048576, "drain_timeout": 100,
             "request_timeout_ms": 0, "max_request_elements": 1000, "log_level": "debug",
             "log_format": "json", "model": ["a", "b"]},
    "dashes": {"max-body-bytes": "4096", "listen": "[::1]:0"},
    "bad_key": {"no_such": 1},
    "bad_value": {"threads": -1},
}
for name, c in CONFIGS.items():
    put("config", name, b"\x00" + j(c))
put("config", "argv", b"\x01" + b"\x00".join([b"--model-repository", b"/tmp/x", b"--listen=0.0.0.0:1",
                                              b"--threads", b"3", b"--model", b"m", b"--version"]))

INFER = j({"inputs": [feat(1)]})


def http(method, path, body=b"", headers=()):
    h = ["%s %s HTTP/1.1" % (method, path), "Host: fuzz"] + list(headers)
    if body or method == "POST":
        h.append("Content-Length: %d" % len(body))
    return ("\r\n".join(h) + "\r\n\r\n").encode() + body


put("http", "live", b"\x00" + http("GET", "/v2/health/live"))
put("http", "ready_meta", b"\x00" + http("GET", "/v2/health/ready") + http("GET", "/v2/models/m")
    + http("GET", "/v2"))
put("http", "infer", b"\x00" + http("POST", "/v2/models/m/infer", INFER,
                                    ["Content-Type: application/json"]))
put("http", "infer_version", b"\x00" + http("POST", "/v2/models/m/versions/1/infer", INFER))
head, blob = binary([{"name": "features", "shape": [1, 4], "datatype": "FP32",
                      "parameters": {"binary_data_size": 16}}], [nan[:0] + vals[:16]])
put("http", "infer_binary", b"\x00" + http("POST", "/v2/models/m/infer", head + blob,
                                           ["Inference-Header-Content-Length: %d" % len(head)]))
chunk = b"%x\r\n%s\r\n0\r\n\r\n" % (len(INFER), INFER)
put("http", "chunked", b"\x00" + ("POST /v2/models/m/infer HTTP/1.1\r\nHost: fuzz\r\n"
                                  "Transfer-Encoding: chunked\r\n\r\n").encode() + chunk)
put("http", "index_load", b"\x00" + http("POST", "/v2/repository/index", b"{}")
    + http("POST", "/v2/repository/models/m/load", b"{}"))
put("http", "abort_infer", b"\x01" + http("POST", "/v2/models/m/infer", INFER))
put("http", "bad_method", b"\x00" + http("DELETE", "/v2/models/m/infer"))
put("http", "truncated", b"\x00" + http("POST", "/v2/models/m/infer", INFER)[:-10])
put("http", "metrics_close", b"\x00" + http("GET", "/metrics", headers=["Connection: close"]))
print("seeds written to %s" % CORPUS)
