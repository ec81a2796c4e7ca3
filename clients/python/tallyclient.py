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
import base64
import csv
import hashlib
import http.client
import json
import os
import secrets
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


def tensor(name, data, datatype=None, shape=None):
    """An OIP input tensor from a nested list. datatype: given, else INT64 for
    all-integer data and FP32 otherwise."""
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
        """Any request; returns the decoded JSON answer or raises TallyError."""
        status, raw = self._exchange(method, path, body, "application/json")
        if not raw:
            return {}
        try:
            return json.loads(raw)
        except ValueError as e:
            raise TallyError(status, "the answer is not JSON: %s" % e) from None

    def _exchange(self, method, path, body, accept):
        """One request: (status, body bytes) of a 2xx/3xx answer, else TallyError."""
        headers = {"Accept": accept}
        payload = None
        if body is not None:
            payload = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
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
            except (ValueError, AttributeError):
                pass
            raise TallyError(r.status, msg or raw[:300].decode("utf-8", "replace") or r.reason)
        return r.status, raw

    @staticmethod
    def _q(s):
        if not s:
            raise ValueError("an empty model, version or session name")
        return urllib.parse.quote(str(s), safe="")

    def _model(self, model, version=None):
        p = "/v2/models/" + self._q(model)
        return p + "/versions/" + self._q(version) if version else p

    @staticmethod
    def _body(inputs, parameters):
        if isinstance(inputs, dict):
            inputs = [tensor(k, v) for k, v in inputs.items()]
        body = {"inputs": list(inputs)}
        if parameters:
            body["parameters"] = parameters
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

    def infer(self, model, inputs, parameters=None, version=None, outputs=None):
        """inputs: {name: nested list} or a list of OIP tensors (see tensor())."""
        body = self._body(inputs, parameters)
        if outputs:
            body["outputs"] = [{"name": n} for n in outputs]
        return self.request("POST", self._model(model, version) + "/infer", body)

    def fit(self, model, inputs, parameters=None):
        return self.request("POST", self._model(model) + "/fit", self._body(inputs, parameters))

    def evaluate(self, model, inputs, parameters=None, version=None):
        return self.request("POST", self._model(model, version) + "/evaluate", self._body(inputs, parameters))

    def calibrate(self, model, inputs, parameters=None):
        return self.request("POST", self._model(model) + "/calibrate", self._body(inputs, parameters))

    def session_create(self, model, parameters=None):
        return self.request("POST", self._model(model) + "/sessions",
                            {"parameters": parameters} if parameters else {})

    def session_infer(self, model, session, inputs, parameters=None, outputs=None):
        """The next tokens of a session: inputs as for infer (input_ids)."""
        body = self._body(inputs, parameters)
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
        status, raw = self._exchange("GET", "/metrics", None, "text/plain")
        text = raw.decode("utf-8", "replace")
        if not families:
            return text
        return "".join(l + "\n" for l in text.splitlines() if _metric_family(l, families))

    @staticmethod
    def output(answer, name):
        """The named output of an infer answer, as a nested list of its shape."""
        for o in answer.get("outputs", []):
            if o.get("name") == name:
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


def typed_inputs(client, model, staged, dtypes, version=None):
    default = dtypes.get("")
    meta_types = {}
    if any(s[2] is None for s in staged) and not dtypes:
        meta = client.model_metadata(model, version)
        meta_types = {i["name"]: i["datatype"] for i in meta.get("inputs", [])}
    out = []
    for name, data, dt, shape in staged:
        dt = dt or dtypes.get(name) or default or meta_types.get(name)
        out.append(tensor(name, data, dt, shape))
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


def _parse_args(argv):
    p = argparse.ArgumentParser(prog="tallyclient.py", description="command-line client of tallyd")
    p.add_argument("--url")
    p.add_argument("--api-key")
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--format", choices=("json", "table"))
    p.add_argument("--model-version")
    p.add_argument("--datatype", action="append", default=[])
    p.add_argument("--param", action="append", default=[])
    p.add_argument("--params")
    p.add_argument("--scope", default="infer", choices=("infer", "admin"))
    p.add_argument("--input", action="append", default=[],
                   help="NAME: CSV files are one matrix each, named in order")
    p.add_argument("--output", action="append", default=[],
                   help="NAME: infer answers only this output (repeatable)")
    p.add_argument("command")
    p.add_argument("args", nargs="*")
    return p.parse_intermixed_args(argv)


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
        inputs = typed_inputs(c, model, read_inputs(files(1), params, outputs), _dtypes(a), a.model_version)
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
            inputs = typed_inputs(c, args[1], read_inputs(files(3), params, outputs), _dtypes(a))
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
