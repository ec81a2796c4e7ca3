#!/usr/bin/env python3
"""tallyclient - a one-file Python client of tallyd (Open Inference Protocol v2
plus tallyd's fit/evaluate/calibrate/session extensions). Standard library
only: copy the file next to your code, or run it as a command-line tool.

    from tallyclient import TallyClient, TallyError
    c = TallyClient()                      # TALLY_URL / TALLY_API_KEY, else :8000
    ans = c.infer("demo_mlp", {"features": [[0.1] * 16]})
    print(c.output(ans, "output"))

    python3 tallyclient.py [--url URL] [--format json|table] COMMAND ...

Commands and exit codes match tallyctl's: 0 ok, 1 usage or a bad local file,
2 no connection, 3 HTTP 4xx, 4 HTTP 5xx or an unusable answer."""
import argparse
import array
import base64
import csv
import hashlib
import http.client
import json
import os
import secrets
import struct
import sys
import urllib.parse

DEFAULT_URL = "http://127.0.0.1:8000"
EXIT_OK, EXIT_USAGE, EXIT_CONNECT, EXIT_4XX, EXIT_5XX = 0, 1, 2, 3, 4


class TallyError(Exception):
    """A failed call. status: the HTTP status, or 0 when no answer came
    (connection refused, timeout); message: the server's "error" string."""

    def __init__(self, status, message):
        super().__init__("HTTP %d: %s" % (status, message) if status else message)
        self.status = status
        self.message = message

    @property
    def exit_code(self):
        if self.status == 0:
            return EXIT_CONNECT
        return EXIT_5XX if self.status >= 500 else EXIT_4XX


def _shape_of(data):
    shape, d = [], data
    while isinstance(d, list):
        shape.append(len(d))
        d = d[0] if d else None
    return shape


def _flatten(data, out):
    if isinstance(data, list):
        for x in data:
            _flatten(x, out)
    else:
        out.append(data)
    return out


# OIP datatype -> (array module typecode or None, struct code, numpy dtype)
_DTYPES = {"FP32": ("f", "f", "<f4"), "FP64": ("d", "d", "<f8"), "FP16": (None, "e", "<f2"),
           "INT8": ("b", "b", "i1"), "INT16": ("h", "h", "<i2"), "INT32": ("i", "i", "<i4"),
           "INT64": ("q", "q", "<i8"), "UINT8": ("B", "B", "u1"), "UINT16": ("H", "H", "<u2"),
           "UINT32": ("I", "I", "<u4"), "UINT64": ("Q", "Q", "<u8"), "BOOL": (None, "?", "?")}
_NUMPY_KINDS = {"float32": "FP32", "float64": "FP64", "float16": "FP16", "int8": "INT8",
                "int16": "INT16", "int32": "INT32", "int64": "INT64", "uint8": "UINT8",
                "uint16": "UINT16", "uint32": "UINT32", "uint64": "UINT64", "bool": "BOOL"}
# Inputs of at least this many elements travel as binary tensors when the
# caller does not say (no JSON text to write, send and parse).
BINARY_MIN_ELEMENTS = 4096


def _is_array(x):
    return hasattr(x, "dtype") and hasattr(x, "shape") and hasattr(x, "tobytes")


def _pack(flat, datatype):
    """Little-endian bytes of a flat list in an OIP datatype."""
    if datatype not in _DTYPES:
        raise ValueError("datatype %r cannot be sent as a binary tensor" % datatype)
    tc, sc, _ = _DTYPES[datatype]
    if tc and array.array(tc).itemsize == struct.calcsize(sc):
        a = array.array(tc, flat)
        if sys.byteorder != "little":
            a.byteswap()
        return a.tobytes()
    return struct.pack("<%d%s" % (len(flat), sc), *flat)


def _unpack(raw, datatype, shape):
    """A binary output: a numpy array where numpy is installed, else a flat list."""
    _, sc, npd = _DTYPES[datatype]
    try:
        import numpy
        return numpy.frombuffer(raw, numpy.dtype(npd)).reshape(shape)
    except ImportError:
        return list(struct.unpack("<%d%s" % (len(raw) // struct.calcsize(sc), sc), raw))


def tensor(name, data, datatype=None, shape=None, binary=None):
    """An OIP input tensor from a nested list or a numpy array. datatype: given,
    else the array's own, else INT64 for all-integer data and FP32 otherwise.
    binary: send the values as a binary tensor (raw bytes after the JSON)
    instead of JSON text; None: when it has BINARY_MIN_ELEMENTS or more."""
    if _is_array(data):
        datatype = datatype or _NUMPY_KINDS.get(str(data.dtype))
        if datatype is None:
            raise ValueError("tensor %r: numpy dtype %s has no OIP datatype" % (name, data.dtype))
        shape = list(shape if shape is not None else data.shape)
        n = 1
        for d in shape:
            n *= d
        if n != data.size:
            raise ValueError("tensor %r: %d values for shape %s" % (name, data.size, shape))
        if binary is None:
            binary = data.size >= BINARY_MIN_ELEMENTS
        if binary:
            import numpy
            raw = numpy.ascontiguousarray(data, dtype=numpy.dtype(_DTYPES[datatype][2])).tobytes()
            return {"name": name, "shape": shape, "datatype": datatype,
                    "parameters": {"binary_data_size": len(raw)}, "_raw": raw}
        data = data.tolist()
    flat = _flatten(data, [])
    if shape is None:
        shape = _shape_of(data)
    n = 1
    for s in shape:
        n *= s
    if n != len(flat):
        raise ValueError("tensor %r: %d values for shape %s (ragged rows?)" % (name, len(flat), shape))
    if datatype is None:
        datatype = "INT64" if all(isinstance(x, int) and not isinstance(x, bool) for x in flat) else "FP32"
    if binary is None:
        binary = len(flat) >= BINARY_MIN_ELEMENTS and datatype in _DTYPES
    if binary:
        raw = _pack(flat, datatype)
        return {"name": name, "shape": list(shape), "datatype": datatype,
                "parameters": {"binary_data_size": len(raw)}, "_raw": raw}
    return {"name": name, "shape": list(shape), "datatype": datatype, "data": flat}


class TallyClient:
    """One keep-alive HTTP connection to tallyd. Not thread-safe: one client
    per thread."""

    def __init__(self, url=None, api_key=None, timeout=60.0):
        url = url or os.environ.get("TALLY_URL") or DEFAULT_URL
        u = urllib.parse.urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError("url %r must be http://HOST[:PORT] or https://..." % url)
        self.url = url.rstrip("/")
        self._https = u.scheme == "https"
        self._host = u.hostname
        self._port = u.port or (443 if self._https else 80)
        self._prefix = u.path.rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get("TALLY_API_KEY", "")
        self.timeout = timeout if timeout else None
        self._conn = None

    # ---- transport ----

    def _connection(self):
        if self._conn is None:
            cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
            self._conn = cls(self._host, self._port, timeout=self.timeout)
        return self._conn

    def close(self):
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def request(self, method, path, body=None):
        """Any request; returns the decoded JSON answer or raises TallyError.
        Input tensors made with binary=True (see tensor()) go as raw bytes after
        the JSON; binary outputs in the answer come back decoded into their
        entries' "data" (numpy arrays where numpy is installed)."""
        status, raw, hdr = self._exchange(method, path, body, "application/json")
        if not raw:
            return {}
        json_len = hdr.get("inference-header-content-length")
        try:
            n = int(json_len) if json_len is not None else len(raw)
            if not 0 <= n <= len(raw):
                raise ValueError("Inference-Header-Content-Length %s is outside the body" % json_len)
            ans = json.loads(raw[:n])
        except ValueError as e:
            raise TallyError(status, "the answer is not JSON: %s" % e) from None
        if n < len(raw):
            off = n
            for o in ans.get("outputs", []):
                size = (o.get("parameters") or {}).get("binary_data_size")
                if size is None:
                    continue
                if off + size > len(raw):
                    raise TallyError(status, "binary output %r runs past the body" % o.get("name"))
                o["data"] = _unpack(raw[off:off + size], o["datatype"], o["shape"])
                off += size
        return ans

    def _exchange(self, method, path, body, accept):
        """One request: (status, body bytes, {header: value}) of a 2xx/3xx
        answer, else TallyError."""
        headers = {"Accept": accept}
        payload = None
        if body is not None:
            blobs = []
            if isinstance(body, dict) and any("_raw" in t for t in body.get("inputs", [])):
                blobs = [t["_raw"] for t in body["inputs"] if "_raw" in t]
                body = dict(body)
                body["inputs"] = [{k: v for k, v in t.items() if k != "_raw"} for t in body["inputs"]]
            payload = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
            if blobs:
                headers["Inference-Header-Content-Length"] = str(len(payload))
                headers["Content-Type"] = "application/octet-stream"
                payload += b"".join(blobs)
        if self.api_key:
            headers["Authorization"] = "Bearer " + self.api_key
        # One retry, on a fresh connection, only when a reused keep-alive
        # connection failed: the server may have closed it while idle. A new
        # connection that fails is not retried (a fit must not run twice).
        for attempt in (0, 1):
            reused = self._conn is not None
            try:
                c = self._connection()
                c.request(method, self._prefix + path, body=payload, headers=headers)
                r = c.getresponse()
                raw = r.read()
                break
            except (ConnectionError, http.client.HTTPException, OSError) as e:
                self.close()
                if attempt == 1 or not reused or isinstance(e, (ConnectionRefusedError, TimeoutError)):
                    raise TallyError(0, "%s%s: %s" % (self.url, path, e)) from None
        if r.status >= 400:
            msg = None
            try:
                msg = json.loads(raw).get("error")
                if isinstance(msg, dict):  # OpenAI's shape on /v1/*
                    msg = msg.get("message")
            except (ValueError, AttributeError):
                pass
            raise TallyError(r.status, msg or raw[:300].decode("utf-8", "replace") or r.reason)
        return r.status, raw, {k.lower(): v for k, v in r.getheaders()}

    @staticmethod
    def _q(s):
        if not s:
            raise ValueError("an empty model, version or session name")
        return urllib.parse.quote(str(s), safe="")

    def _model(self, model, version=None):
        p = "/v2/models/" + self._q(model)
        return p + "/versions/" + self._q(version) if version else p

    @staticmethod
    def _body(inputs, parameters, binary=None, binary_outputs=False):
        """inputs: {name: nested list or numpy array} or a list of tensor()s.
        binary: True sends every {name: data} input as a binary tensor, False
        none, None the large ones (tensor()'s rule)."""
        if isinstance(inputs, dict):
            inputs = [tensor(k, v, binary=binary) for k, v in inputs.items()]
        body = {"inputs": list(inputs)}
        params = dict(parameters or {})
        if binary_outputs:
            params["binary_data_output"] = True
        if params:
            body["parameters"] = params
        return body

    # ---- endpoints ----

    def live(self):
        return self.request("GET", "/v2/health/live").get("live") is True

    def ready(self):
        try:
            return self.request("GET", "/v2/health/ready").get("ready") is True
        except TallyError as e:
            if e.status == 503:
                return False
            raise

    def server_metadata(self):
        return self.request("GET", "/v2")

    def model_metadata(self, model, version=None):
        return self.request("GET", self._model(model, version))

    def model_ready(self, model, version=None):
        try:
            return self.request("GET", self._model(model, version) + "/ready").get("ready") is True
        except TallyError as e:
            if e.status == 503:
                return False
            raise

    def repository_index(self):
        return self.request("POST", "/v2/repository/index", {})

    def load(self, model):
        return self.request("POST", "/v2/repository/models/%s/load" % self._q(model), {})

    def unload(self, model):
        return self.request("POST", "/v2/repository/models/%s/unload" % self._q(model), {})

    def infer(self, model, inputs, parameters=None, version=None, outputs=None, binary=None,
              binary_outputs=False, id=None):
        """inputs: {name: nested list or numpy array} or a list of OIP tensors
        (see tensor()). binary: send inputs as binary tensors (None: the large
        ones); binary_outputs: ask for every output as raw bytes (decoded into
        numpy arrays where numpy is installed). id: the request's OIP "id"
        (the key feedback joins labels to: docs/learning.md)."""
        body = self._body(inputs, parameters, binary, binary_outputs)
        if id is not None:
            body["id"] = id
        if outputs:
            body["outputs"] = [{"name": n} for n in outputs]
        return self.request("POST", self._model(model, version) + "/infer", body)

    def fit(self, model, inputs, parameters=None, binary=None):
        return self.request("POST", self._model(model) + "/fit", self._body(inputs, parameters, binary))

    def evaluate(self, model, inputs, parameters=None, version=None, binary=None):
        return self.request("POST", self._model(model, version) + "/evaluate",
                            self._body(inputs, parameters, binary))

    def calibrate(self, model, inputs, parameters=None, binary=None):
        return self.request("POST", self._model(model) + "/calibrate", self._body(inputs, parameters, binary))

    # ---- the learning loop (docs/learning.md) ----

    def feedback(self, model, ids, labels=None, targets=None):
        """Labels (ensembles) or observed targets (quantile models) for served
        request ids ("<id>:<row>" for a row of a batch)."""
        if (labels is None) == (targets is None):
            raise ValueError("feedback takes labels or targets, one of them")
        y = tensor("labels", list(labels), datatype="INT64") if labels is not None else \
            tensor("targets", list(targets), datatype="FP64")
        ids = [str(i) for i in ids]
        return self.request("POST", self._model(model) + "/feedback",
                            {"inputs": [{"name": "id", "shape": [len(ids)], "datatype": "BYTES",
                                         "data": ids}, y]})

    def refit(self, model, parameters=None):
        """A candidate version fitted on the newest labelled rows (not served)."""
        body = {"parameters": dict(parameters)} if parameters else {}
        return self.request("POST", self._model(model) + "/refit", body)

    def candidates(self, model):
        return self.request("GET", self._model(model) + "/candidates")

    # ---- text generation (docs/generation.md) ----

    def complete(self, model, prompt, **fields):
        """POST /v1/completions (OpenAI's fields: max_tokens, temperature, stop,
        seed, n, logprobs, echo, ...); the whole answer."""
        body = dict(fields, model=model, prompt=prompt)
        body.pop("stream", None)
        return self.request("POST", "/v1/completions", body)

    def complete_stream(self, model, prompt, **fields):
        """The same, streamed: yields each server-sent event's decoded JSON as
        it arrives (choices[i].text holds the new text), until data: [DONE]."""
        body = json.dumps(dict(fields, model=model, prompt=prompt, stream=True)).encode()
        cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        c = cls(self._host, self._port, timeout=self.timeout)
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if self.api_key:
            headers["Authorization"] = "Bearer " + self.api_key
        try:
            try:
                c.request("POST", self._prefix + "/v1/completions", body=body, headers=headers)
                r = c.getresponse()
            except (ConnectionError, http.client.HTTPException, OSError) as e:
                raise TallyError(0, "%s/v1/completions: %s" % (self.url, e)) from None
            if r.status >= 400:
                raw = r.read()
                try:
                    msg = json.loads(raw)["error"]["message"]
                except (ValueError, KeyError, TypeError):
                    msg = raw[:300].decode("utf-8", "replace")
                raise TallyError(r.status, msg)
            while True:
                line = r.readline()
                if not line:
                    raise TallyError(r.status, "the stream ended without data: [DONE]")
                line = line.strip()
                if not line.startswith(b"data: "):
                    continue
                data = line[6:]
                if data == b"[DONE]":
                    return
                yield json.loads(data)
        finally:
            c.close()

    def tokenize(self, model, text):
        return self.request("POST", "/v2/models/%s/tokenize" % model, {"text": text})["tokens"]

    def detokenize(self, model, tokens):
        return self.request("POST", "/v2/models/%s/detokenize" % model,
                            {"tokens": list(tokens)})["text"]

    def session_create(self, model, parameters=None):
        return self.request("POST", self._model(model) + "/sessions",
                            {"parameters": parameters} if parameters else {})

    def session_infer(self, model, session, inputs, parameters=None, outputs=None, binary=None):
        """The next tokens of a session: inputs as for infer (input_ids)."""
        body = self._body(inputs, parameters, binary)
        if outputs:
            body["outputs"] = [{"name": n} for n in outputs]
        return self.request("POST", "%s/sessions/%s/infer" % (self._model(model), self._q(session)), body)

    def session_get(self, model, session):
        return self.request("GET", "%s/sessions/%s" % (self._model(model), self._q(session)))

    def session_delete(self, model, session):
        return self.request("DELETE", "%s/sessions/%s" % (self._model(model), self._q(session)))

    def metrics(self, families=None):
        """GET /metrics: the Prometheus text; with families (names), only the
        lines of those metric families (HELP/TYPE, samples, a histogram's
        _bucket/_sum/_count)."""
        status, raw, _ = self._exchange("GET", "/metrics", None, "text/plain")
        text = raw.decode("utf-8", "replace")
        if not families:
            return text
        return "".join(l + "\n" for l in text.splitlines() if _metric_family(l, families))

    @staticmethod
    def output(answer, name):
        """The named output of an infer answer, as a nested list of its shape."""
        for o in answer.get("outputs", []):
            if o.get("name") == name:
                if _is_array(o["data"]):
                    return o["data"].reshape(o["shape"]).tolist()
                data = _flatten(o["data"], [])
                for dim in reversed(o["shape"][1:]):
                    data = [data[i:i + dim] for i in range(0, len(data), dim)] if dim else []
                return data
        raise KeyError(name)


def _metric_family(line, families):
    if line.startswith("# HELP ") or line.startswith("# TYPE "):
        line = line[7:]
    elif line.startswith("#"):
        return False
    name = line.split("{", 1)[0].split(None, 1)[0] if line.strip() else ""
    for f in families:
        if name == f or (name.startswith(f) and name[len(f):] in ("_bucket", "_sum", "_count")):
            return True
    return False


def keygen(scope="infer"):
    """A random API key and its key-file line (the SHA-256 of the key, its scope)."""
    if scope not in ("infer", "admin"):
        raise ValueError("scope must be infer or admin")
    # tallyd --keygen's format: 32 random bytes, base64url without padding (43 characters)
    key = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")
    return key, "%s %s" % (hashlib.sha256(key.encode()).hexdigest(), scope)


# ---- command line ----

class UsageError(Exception):
    pass


def _number(s):
    try:
        return int(s)
    except ValueError:
        return float(s)


def read_csv(path, input_name):
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f) if r and not r[0].lstrip().startswith("#")]
    header = None
    if rows:
        try:
            [float(x) for x in rows[0]]
        except ValueError:  # a first row that is not numbers names the columns
            header, rows = [h.strip() for h in rows[0]], rows[1:]
    if not rows:
        raise UsageError("%s: no rows" % path)
    try:
        rows = [[_number(x.strip()) for x in r] for r in rows]
    except ValueError as e:
        raise UsageError("%s: %s" % (path, e))
    if any(len(r) != len(rows[0]) for r in rows):
        raise UsageError("%s: rows of different lengths" % path)
    if input_name:
        return [(input_name, rows, None, None)]
    if not header:
        raise UsageError("%s: no header row naming the columns (or use --input NAME)" % path)
    return [(h, [r[i] for r in rows], None, None) for i, h in enumerate(header)]


def read_inputs(files, params, outputs=None):
    """files: [(path, input_name)] -> [(name, data, datatype, shape)] (None where
    not given); a JSON file's "parameters" fill params where a flag has not,
    and the names in its "outputs" are appended to outputs (a list)."""
    staged = []
    for path, input_name in files:
        if path.lower().endswith(".csv"):
            staged += read_csv(path, input_name)
            continue
        try:
            with open(path) as f:
                j = json.load(f)
        except (OSError, ValueError) as e:
            raise UsageError("%s: %s" % (path, e))
        if not isinstance(j, dict):
            raise UsageError("%s: expected a JSON object" % path)
        if isinstance(j.get("inputs"), list):
            for t in j["inputs"]:
                staged.append((t["name"], t["data"], t.get("datatype"), t.get("shape")))
            for k, v in (j.get("parameters") or {}).items():
                params.setdefault(k, v)
            outs = j.get("outputs") or []
            if not isinstance(outs, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str)
                                                     for o in outs):
                raise UsageError("%s: \"outputs\" must be a list of {\"name\": ...}" % path)
            if outputs is not None:
                outputs += [o["name"] for o in outs]
        else:
            staged += [(k, v, None, None) for k, v in j.items()]
    return staged


def typed_inputs(client, model, staged, dtypes, version=None, binary=None):
    default = dtypes.get("")
    meta_types = {}
    if any(s[2] is None for s in staged) and not dtypes:
        meta = client.model_metadata(model, version)
        meta_types = {i["name"]: i["datatype"] for i in meta.get("inputs", [])}
    out = []
    for name, data, dt, shape in staged:
        dt = dt or dtypes.get(name) or default or meta_types.get(name)
        out.append(tensor(name, data, dt, shape, binary=binary or None))
    return out


def _print_flat(v, prefix):
    """Nested objects as "a.b.c<TAB>value" lines; arrays of scalars joined by commas."""
    if isinstance(v, dict):
        for k, x in v.items():
            _print_flat(x, "%s.%s" % (prefix, k) if prefix else k)
    elif isinstance(v, list) and any(isinstance(x, (dict, list)) for x in v):
        for i, x in enumerate(v):
            _print_flat(x, "%s[%d]" % (prefix, i))
    elif isinstance(v, list):
        print("%s\t%s" % (prefix, ",".join(_fmt(x) for x in v)))
    else:
        print("%s\t%s" % (prefix, _fmt(v)))


def _print_table(ans):
    if isinstance(ans, list) and (not ans or "state" in ans[0]):
        cols = ["name", "version", "state", "reason"]
        w = [max([len(c)] + [len(str(r.get(c, ""))) for r in ans]) for c in cols]
        print("  ".join(c.upper().ljust(w[i]) for i, c in enumerate(cols)).rstrip())
        for r in ans:
            print("  ".join(str(r.get(c, "")).ljust(w[i]) for i, c in enumerate(cols)).rstrip())
        return
    if isinstance(ans, dict) and "outputs" in ans and "model_name" in ans:
        print("model_name\t%s\nmodel_version\t%s" % (ans["model_name"], ans.get("model_version")))
        for o in ans["outputs"]:
            print("# %s %s [%s]" % (o["name"], o["datatype"], ", ".join(map(str, o["shape"]))))
            flat = _flatten(o["data"], [])
            width = o["shape"][-1] if len(o["shape"]) >= 2 and o["shape"][-1] else 1
            for i in range(0, len(flat), width):
                print("\t".join(_fmt(x) for x in flat[i:i + width]))
        if ans.get("parameters"):  # a session's id and position, say
            _print_flat(ans["parameters"], "parameters")
        return
    _print_flat(ans, "")


def _fmt(x):
    if isinstance(x, bool):
        return "true" if x else "false"
    if isinstance(x, float):
        return "%.9g" % x
    return str(x)


_GLOBAL_VALUE_OPTS = ("--url", "--api-key", "--timeout", "--format", "--model-version", "--datatype",
                      "--param", "--params", "--scope", "--input", "--output")


def _common_options():
    """Options every command takes, before or after the command word."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("connection and output")
    g.add_argument("--url", help="server address (default $TALLY_URL, else %s)" % DEFAULT_URL)
    g.add_argument("--api-key", help="API key (default $TALLY_API_KEY), sent as Authorization: Bearer")
    g.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for an answer (default 60)")
    g.add_argument("--format", choices=("json", "table"), help="json (default) or a table")
    return p


def _input_options():
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("inputs")
    g.add_argument("--model-version", metavar="V", help="a version instead of the newest")
    g.add_argument("--datatype", action="append", default=[], metavar="[NAME=]TYPE",
                   help="OIP datatype of one input (NAME=INT32) or of all (FP32); default: the "
                        "JSON file's, else the model's metadata")
    g.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="a request parameter (VALUE read as JSON when it parses; repeatable)")
    g.add_argument("--params", metavar="JSON|@FILE", help="request parameters as one JSON object")
    g.add_argument("--input", action="append", default=[], metavar="NAME",
                   help="names CSV files in order: each CSV is one matrix (default: its header row "
                        "names the columns, one input each)")
    g.add_argument("--binary", action="store_true",
                   help="send the inputs as binary tensors (raw little-endian bytes after the JSON); "
                        "inputs of %d elements or more always are" % BINARY_MIN_ELEMENTS)
    return p


FILES_HELP = ("input files: JSON (an OIP request with \"inputs\", or {name: nested list}) or CSV "
              "(numbers; a first row of names names the columns)")


def _parser():
    common, inputs = _common_options(), _input_options()
    top = argparse.ArgumentParser(
        prog="tallyclient.py", parents=[common],
        description="Command-line client of tallyd. Exit codes: 0 ok, 1 usage or a bad local "
                    "file, 2 no connection, 3 HTTP 4xx, 4 HTTP 5xx or an unusable answer.",
        epilog="`tallyclient.py COMMAND --help` explains each command.")
    sub = top.add_subparsers(dest="command", metavar="COMMAND")
    cmds = {}

    def add(name, helptext, parents=(), **kw):
        sp = sub.add_parser(name, help=helptext, description=kw.pop("description", helptext),
                            parents=[common] + list(parents))
        cmds[name] = sp
        return sp

    sp = add("health", "liveness or readiness (exit 4 while not ready)")
    sp.add_argument("what", nargs="?", default="ready", choices=("live", "ready"))
    add("models", "every model and version of the repository, with its state")
    sp = add("metadata", "server metadata, or a model's inputs, outputs and versions",
             parents=[inputs])
    sp.add_argument("model", nargs="?", metavar="MODEL")
    for name, what in (("infer", "run a model on input files"),
                       ("fit", "learn a model's weights from labelled rows: a new version"),
                       ("evaluate", "metrics of a version on labelled rows"),
                       ("calibrate", "conformal calibration of a quantile model: a new version")):
        sp = add(name, what, parents=[inputs])
        sp.add_argument("model", metavar="MODEL")
        sp.add_argument("files", nargs="+", metavar="FILE", help=FILES_HELP)
        if name == "infer":
            sp.add_argument("--output", action="append", default=[], metavar="NAME",
                            help="answer only this output (repeatable)")
    for name in ("load", "unload"):
        sp = add(name, "%s a model (admin scope)" % name)
        sp.add_argument("model", metavar="MODEL")
    sp = add("session", "KV-cache sessions of a transformer",
             parents=[inputs],
             description="session create MODEL | session infer MODEL ID FILE... | "
                         "session get MODEL ID | session delete MODEL ID")
    sp.add_argument("action", choices=("create", "infer", "get", "delete"))
    sp.add_argument("args", nargs="+", metavar="ARG", help="MODEL [ID [FILE...]]")
    sp.add_argument("--output", action="append", default=[], metavar="NAME",
                    help="session infer: answer only this output (repeatable)")
    sp = add("complete", "generate text from a prompt (/v1/completions); --stream prints it "
             "as it comes")
    sp.add_argument("model", metavar="MODEL")
    sp.add_argument("prompt", metavar="PROMPT")
    sp.add_argument("--max-tokens", type=int, default=64)
    sp.add_argument("--temperature", type=float, default=None)
    sp.add_argument("--top-p", type=float, default=None)
    sp.add_argument("--seed", type=int, default=None)
    sp.add_argument("--stop", action="append", default=[], metavar="TEXT")
    sp.add_argument("--stream", action="store_true")
    sp = add("metrics", "the Prometheus metrics, or only some families")
    sp.add_argument("families", nargs="*", metavar="FAMILY")
    sp = add("keygen", "a new API key and its key-file line (tallyd --keygen's format)")
    sp.add_argument("--scope", default="infer", choices=("infer", "admin"))
    return top, cmds


def _parse_args(argv):
    """The command word may come after global options; options may follow or
    sit between the command's arguments (parse_intermixed_args per command)."""
    top, cmds = _parser()
    i, cmd = 0, None
    while i < len(argv):
        t = argv[i]
        if t in ("-h", "--help"):
            top.print_help()
            raise SystemExit(0)
        if t.startswith("--"):
            i += 1 if "=" in t or t not in _GLOBAL_VALUE_OPTS else 2
            continue
        cmd = t
        break
    if cmd is None:
        top.print_usage(sys.stderr)
        print("tallyclient.py: a command is needed (see --help)", file=sys.stderr)
        raise SystemExit(2)
    if cmd not in cmds:
        top.print_usage(sys.stderr)
        print("tallyclient.py: unknown command %r (one of %s)" % (cmd, ", ".join(cmds)), file=sys.stderr)
        raise SystemExit(2)
    a = cmds[cmd].parse_intermixed_args(argv[:i] + argv[i + 1:])
    a.command = cmd
    # one shape for _run: a.args holds the positionals in order
    if cmd == "health":
        a.args = [a.what]
    elif cmd in ("metadata",):
        a.args = [a.model] if a.model else []
    elif cmd in ("infer", "fit", "evaluate", "calibrate"):
        a.args = [a.model] + a.files
    elif cmd in ("load", "unload"):
        a.args = [a.model]
    elif cmd == "session":
        a.args = [a.action] + a.args
    elif cmd == "metrics":
        a.args = a.families
    elif cmd == "complete":
        a.args = [a.model, a.prompt]
    else:
        a.args = []
    for k, v in (("output", []), ("input", []), ("datatype", []), ("param", []), ("params", None),
                 ("model_version", None), ("scope", "infer"), ("binary", False)):
        if not hasattr(a, k):
            setattr(a, k, v)
    return a


def _params(a):
    params = {}
    if a.params:
        try:
            if a.params.startswith("@"):
                with open(a.params[1:]) as f:
                    params = json.load(f)
            else:
                params = json.loads(a.params)
        except (OSError, ValueError) as e:
            raise UsageError("--params: %s" % e)
        if not isinstance(params, dict):
            raise UsageError("--params must be a JSON object")
    for kv in a.param:
        k, eq, v = kv.partition("=")
        if not eq or not k:
            raise UsageError("--param wants KEY=VALUE, got %r" % kv)
        try:
            params[k] = json.loads(v)
        except ValueError:
            params[k] = v
    return params


def _dtypes(a):
    out = {}
    for d in a.datatype:
        name, eq, dt = d.rpartition("=")
        out[name if eq else ""] = dt
    return out


def main(argv=None):
    try:
        a = _parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as e:
        return EXIT_OK if e.code == 0 else EXIT_USAGE
    try:
        return _run(a)
    except UsageError as e:
        print("tallyclient: %s" % e, file=sys.stderr)
        return EXIT_USAGE
    except TallyError as e:
        print("tallyclient: %s" % e, file=sys.stderr)
        return e.exit_code
    except ValueError as e:
        print("tallyclient: %s" % e, file=sys.stderr)
        return EXIT_USAGE


def _run(a):
    fmt = a.format or "json"
    cmd, args = a.command, a.args
    if cmd == "keygen":
        if args:
            raise UsageError("keygen takes no arguments")
        key, line = keygen(a.scope)
        if a.format == "json":
            print(json.dumps({"key": key, "scope": a.scope, "sha256": line.split()[0],
                              "key_file_line": line}, indent=2))
        else:
            print(key)
            print(line)
        return EXIT_OK
    c = TallyClient(a.url, a.api_key, a.timeout)
    params = _params(a)
    outputs = list(a.output)
    if outputs and not (cmd == "infer" or (cmd == "session" and args[:1] == ["infer"])):
        raise UsageError("--output is for infer and session infer")

    def files(start):
        paths = args[start:]
        if not paths:
            raise UsageError("%s needs input files" % cmd)
        names = list(a.input)
        out = []
        for p in paths:
            out.append((p, names.pop(0) if p.lower().endswith(".csv") and names else None))
        return out

    if cmd == "complete":
        fields = {"max_tokens": a.max_tokens}
        for k in ("temperature", "top_p", "seed"):
            if getattr(a, k) is not None:
                fields[k] = getattr(a, k)
        if a.stop:
            fields["stop"] = a.stop
        fields.update(params)
        if a.stream:
            for ev in c.complete_stream(args[0], args[1], **fields):
                sys.stdout.write(ev["choices"][0]["text"])
                sys.stdout.flush()
            sys.stdout.write("\n")
            return EXIT_OK
        ans = c.complete(args[0], args[1], **fields)
        if a.format == "table":
            print(ans["choices"][0]["text"])
        else:
            print(json.dumps(ans, indent=2))
        return EXIT_OK
    if cmd == "health":
        what = args[0] if args else "ready"
        if len(args) > 1 or what not in ("live", "ready"):
            raise UsageError("health [live|ready]")
        ans = c.request("GET", "/v2/health/" + what)
    elif cmd == "models":
        ans = c.repository_index()
    elif cmd == "metadata":
        if len(args) > 1:
            raise UsageError("metadata [MODEL]")
        ans = c.model_metadata(args[0], a.model_version) if args else c.server_metadata()
    elif cmd in ("infer", "fit", "evaluate", "calibrate"):
        if len(args) < 2:
            raise UsageError("%s MODEL FILE..." % cmd)
        model = args[0]
        inputs = typed_inputs(c, model, read_inputs(files(1), params, outputs), _dtypes(a), a.model_version,
                              a.binary)
        if cmd == "infer":
            ans = c.infer(model, inputs, params, a.model_version, outputs)
        elif cmd == "evaluate":
            ans = c.evaluate(model, inputs, params, a.model_version)
        else:
            ans = getattr(c, cmd)(model, inputs, params)
    elif cmd in ("load", "unload"):
        if len(args) != 1:
            raise UsageError("%s MODEL" % cmd)
        getattr(c, cmd)(args[0])
        ans = {"model_name": args[0], "state": "READY" if cmd == "load" else "UNAVAILABLE"}
    elif cmd == "session":
        sub = args[0] if args else ""
        if sub == "create" and len(args) == 2:
            ans = c.session_create(args[1], params)
        elif sub == "infer" and len(args) >= 4:
            inputs = typed_inputs(c, args[1], read_inputs(files(3), params, outputs), _dtypes(a), None, a.binary)
            ans = c.session_infer(args[1], args[2], inputs, params, outputs)
        elif sub == "get" and len(args) == 3:
            ans = c.session_get(args[1], args[2])
        elif sub == "delete" and len(args) == 3:
            c.session_delete(args[1], args[2])
            ans = {"session_id": args[2], "deleted": True}
        else:
            raise UsageError("session create MODEL | infer MODEL ID FILE... | get MODEL ID | delete MODEL ID")
    elif cmd == "metrics":
        # the Prometheus text as it is: --format does not apply
        sys.stdout.write(c.metrics(args))
        return EXIT_OK
    else:
        raise UsageError("unknown command %r" % cmd)
    if fmt == "json":
        print(json.dumps(ans, indent=2))
    else:
        _print_table(ans)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
