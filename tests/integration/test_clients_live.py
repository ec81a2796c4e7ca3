"""The client tools doing real work against a real tallyd: build/tallyctl,
clients/python/tallyclient.py (CLI and library) and the curl scripts fit,
evaluate and calibrate the example models (aware_ensemble, quantile_demo),
run KV-cache sessions on tiny_gpt2, authenticate with keys of both scopes and
read /metrics. test_clients.py covers their error paths and what goes over the
wire; this file checks that the answers are right.

The daemon serves a repository generated into a temporary directory (fits
write new versions there, never into deploy/models) and requires API keys:
an admin key (from `tallyctl keygen --scope admin`) and an infer key (from
`tallyclient.py keygen`), so every call below also proves the key reached it."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile

from harness import BIN, ROOT, Daemon, check, close, collect, run_tests, tensor

BUILD = os.environ.get("TALLYD_BUILD", os.path.dirname(BIN))
TALLYCTL = os.path.join(BUILD, "tallyctl")
PYCLIENT = os.path.join(ROOT, "clients", "python", "tallyclient.py")
CURL_DIR = os.path.join(ROOT, "clients", "curl")
EXAMPLES = os.path.join(ROOT, "deploy", "examples")
AWARE = os.path.join(EXAMPLES, "aware_labelled.json")
QCAL = os.path.join(EXAMPLES, "quantile_calibrate.json")
sys.path.insert(0, os.path.dirname(PYCLIENT))
import tallyclient  # noqa: E402

# The six tokens of docs/attention.md; a session fed them in two chunks must
# score them exactly as one request does.
TOKENS = [72, 101, 108, 108, 111, 33]


class Ctx:
    def __init__(self):
        if not os.access(TALLYCTL, os.X_OK):
            raise RuntimeError("%s is missing: run `make %s`" % (TALLYCTL, TALLYCTL))
        self.tmp = tempfile.mkdtemp(prefix="tally-clients-live-")
        self.repo = os.path.join(self.tmp, "models")
        subprocess.run([sys.executable, os.path.join(ROOT, "deploy", "gen_models.py"), self.repo],
                       check=True, stdout=subprocess.DEVNULL)
        # the two keys come from the two tools' keygen: their lines go in the
        # key file as printed
        rc, out, err = run([TALLYCTL, "keygen", "--scope", "admin"])
        check(rc == 0, err)
        self.admin, admin_line = out.splitlines()
        rc, out, err = run([sys.executable, PYCLIENT, "keygen"])
        check(rc == 0, err)
        self.infer_key, infer_line = out.splitlines()
        check(infer_line.endswith(" infer") and admin_line.endswith(" admin"), out)
        self.keys = self.file("keys", "# test keys\n%s\n%s  # web front end\n" % (admin_line, infer_line))
        self.d = Daemon(self.repo, ["--api-key-file", self.keys]).start()
        self.url = "http://127.0.0.1:%d" % self.d.port
        self.auth = {"Authorization": "Bearer " + self.admin}

    def file(self, name, content):
        p = os.path.join(self.tmp, name)
        with open(p, "w") as f:
            f.write(content if isinstance(content, str) else json.dumps(content))
        return p

    def http(self, method, path, body=None):
        return self.d.request(method, path, body, headers=self.auth)

    def served(self, model):
        """The versions of model the daemon serves now, as integers."""
        r = self.http("GET", "/v2/models/" + model)
        check(r.status == 200, repr(r))
        return sorted(int(v) for v in r.json()["versions"])

    def daemon_logs(self):
        return self.d.logs()


def setup():
    return Ctx()


def teardown(c):
    c.d.stop()
    shutil.rmtree(c.tmp, ignore_errors=True)


def run(cmd, env=None, url=None):
    e = dict(os.environ)
    e.pop("TALLY_API_KEY", None)
    if url:
        e["TALLY_URL"] = url
    e.update(env or {})
    p = subprocess.run(cmd, capture_output=True, text=True, env=e, timeout=60)
    return p.returncode, p.stdout, p.stderr


def ctl(c, *args, key="admin", env=None):
    """tallyctl with the admin key in TALLY_API_KEY (key=None: no key)."""
    e = dict(env or {})
    if key:
        e["TALLY_API_KEY"] = c.admin if key == "admin" else key
    return run([TALLYCTL] + list(args), e, c.url)


def py(c, *args, key="admin", env=None):
    e = dict(env or {})
    if key:
        e["TALLY_API_KEY"] = c.admin if key == "admin" else key
    return run([sys.executable, PYCLIENT] + list(args), e, c.url)


def sh(c, script, *args, key="admin"):
    e = {"TALLY_API_KEY": c.admin if key == "admin" else key} if key else {}
    return run(["bash", os.path.join(CURL_DIR, script)] + list(args), e, c.url)


def expect(res, code, stderr_has=None):
    rc, out, err = res
    check(rc == code, "exit %d, expected %d\nstdout: %s\nstderr: %s" % (rc, code, out[:500], err[:500]))
    if stderr_has:
        check(stderr_has.lower() in err.lower(), "stderr %r lacks %r" % (err[:400], stderr_has))
    return out


def ok_json(res):
    return json.loads(expect(res, 0))


TOOLS = (("tallyctl", ctl), ("tallyclient.py", py))


def load_example(path):
    with open(path) as f:
        return json.load(f)


def rows_of(t):
    """An example tensor's data as a list of rows (the files hold them flat or nested)."""
    flat = tallyclient._flatten(t["data"], [])
    if len(t["shape"]) == 1:
        return flat
    w = t["shape"][1]
    return [flat[i:i + w] for i in range(0, len(flat), w)]


def csv_matrix(rows):
    return "\n".join(",".join(repr(x) for x in r) for r in rows) + "\n"


def check_metric_set(m, where):
    for k in ("log_loss", "auc", "accuracy", "f1"):
        check(isinstance(m.get(k), float), "%s: %s is %r" % (where, k, m.get(k)))
    check(0 < m["log_loss"] < 5 and 0 <= m["auc"] <= 1, "%s: %r" % (where, m))


def check_new_version(ans, model, before, where):
    """A fit or calibrate answer: the version after the newest served one,
    built on it, and served at once."""
    want = max(before) + 1
    check(ans["model_name"] == model and ans["model_version"] == str(want), "%s: %r" % (where, ans))
    check(int(ans["parent_version"]) == max(before), "%s: parent %r" % (where, ans.get("parent_version")))
    return want


# ---- 1. ensemble fit and evaluate ----

def test_ensemble_fit_and_evaluate_from_the_json_example(c):
    # version 1 (uniform alpha) first: after two fits it is no longer served
    # (version_policy latest 2)
    ev1 = ok_json(ctl(c, "evaluate", "aware_ensemble", AWARE, "--model-version", "1"))
    check(ev1["model_version"] == "1" and ev1["rows"] == 200, repr(ev1))
    check_metric_set(ev1["metrics"], "v1")
    before = c.served("aware_ensemble")
    ans = ok_json(ctl(c, "fit", "aware_ensemble", AWARE))
    v = check_new_version(ans, "aware_ensemble", before, "tallyctl fit")
    check(ans["epochs_run"] > 0 and ans["rows"] == {"train": 160, "validation": 40}, repr(ans["rows"]))
    # the file's parameters went along: 300 epochs at 0.05 learn the rule
    # that only the xception family knows
    alpha = ans["weights"]["alpha"]
    check(alpha[0] > 0.9 and ans["weights"]["families"][0] == "xception", repr(ans["weights"]))
    check(v in c.served("aware_ensemble"), "the new version is not served")
    c.fit_theta = ans["weights"]["theta"]
    ev = ok_json(ctl(c, "evaluate", "aware_ensemble", AWARE))
    check(ev["model_version"] == str(v), repr(ev))
    check_metric_set(ev["metrics"], "fitted")
    check(ev["metrics"]["log_loss"] < ev1["metrics"]["log_loss"] - 0.1,
          "fit did not lower the log loss: %r -> %r" % (ev1["metrics"], ev["metrics"]))
    # the table form of the same answer
    table = expect(ctl(c, "evaluate", "aware_ensemble", AWARE, "--format", "table"), 0).splitlines()
    got = dict(l.split("\t", 1) for l in table)
    check(close(float(got["metrics.log_loss"]), ev["metrics"]["log_loss"], rel=1e-6), repr(got))
    check(got["model_version"] == str(v), repr(got))


def test_ensemble_fit_from_csv_files(c):
    """The features as one CSV matrix (--input features) and the labels as a
    CSV column: the same rows and parameters as the JSON example give the same
    weights (a fit is deterministic in data and seed)."""
    ex = load_example(AWARE)
    by = {t["name"]: t for t in ex["inputs"]}
    feats = c.file("aware_features.csv", csv_matrix(rows_of(by["features"])))
    labels = c.file("aware_labels.csv", "labels\n" + "\n".join(str(int(y)) for y in rows_of(by["labels"])) + "\n")
    params = json.dumps(ex["parameters"])
    for name, tool in TOOLS:
        before = c.served("aware_ensemble")
        ans = ok_json(tool(c, "fit", "aware_ensemble", "--input", "features", feats, labels, "--params", params))
        check_new_version(ans, "aware_ensemble", before, name)
        theta = ans["weights"]["theta"]
        check(all(close(a, b, rel=1e-5) for a, b in zip(theta, c.fit_theta)),
              "%s: CSV fit %r != JSON fit %r" % (name, theta, c.fit_theta))
        ev = ok_json(tool(c, "evaluate", "aware_ensemble", "--input", "features", feats, labels))
        check_metric_set(ev["metrics"], name)
        check(ev["model_version"] == ans["model_version"], repr(ev))


def test_ensemble_fit_from_member_outputs_csv(c):
    """docs/clients.md's form: precomputed member logits as one matrix and a
    labels column. Only the first family's logits carry the label here, so
    the fit must weight that family most."""
    preds, labels = [], []
    for i in range(120):
        y = (i * 7 + i // 3) % 2
        good = (2.0 if y else -2.0) + ((i * 13) % 7 - 3) * 0.1
        noise = [((i * (k + 3)) % 11 - 5) * 0.3 for k in range(6)]
        preds.append([good, good * 0.8, good * 1.1] + noise)
        labels.append(y)
    pf = c.file("preds.csv", csv_matrix(preds))
    lf = c.file("labels.csv", "labels\n" + "\n".join(map(str, labels)) + "\n")
    before = c.served("aware_ensemble")
    ans = ok_json(ctl(c, "fit", "aware_ensemble", "--input", "member_outputs", pf, lf,
                      "--param", "epochs=200", "--param", "learning_rate=0.1", "--param", "validation_fraction=0"))
    check_new_version(ans, "aware_ensemble", before, "member_outputs fit")
    a = ans["weights"]["alpha"]
    check(a[0] > 0.8 and a[0] == max(a), repr(ans["weights"]))
    check(ans["rows"]["train"] == 120, repr(ans["rows"]))
    ev = ok_json(ctl(c, "evaluate", "aware_ensemble", "--input", "member_outputs", pf, lf))
    check(ev["metrics"]["auc"] > 0.99, repr(ev["metrics"]))


def test_python_library_fit_and_evaluate(c):
    ex = load_example(AWARE)
    by = {t["name"]: t for t in ex["inputs"]}
    cl = tallyclient.TallyClient(c.url, api_key=c.admin)
    before = c.served("aware_ensemble")
    # {name: nested list}: features go as FP32, the integer labels as INT64
    ans = cl.fit("aware_ensemble", {"features": rows_of(by["features"]),
                                    "labels": [int(y) for y in rows_of(by["labels"])]}, ex["parameters"])
    check_new_version(ans, "aware_ensemble", before, "TallyClient.fit")
    check(all(close(a, b, rel=1e-5) for a, b in zip(ans["weights"]["theta"], c.fit_theta)), repr(ans["weights"]))
    # OIP tensors as they are in the example (labels INT32)
    ev = cl.evaluate("aware_ensemble", ex["inputs"])
    check_metric_set(ev["metrics"], "TallyClient.evaluate")
    check(ev["model_version"] == ans["model_version"], repr(ev))
    ev_old = cl.evaluate("aware_ensemble", ex["inputs"], version=str(before[-1]))
    check(ev_old["model_version"] == str(before[-1]), repr(ev_old))
    cl.close()


def test_fit_from_file_script(c):
    before = c.served("aware_ensemble")
    ans = json.loads(expect(sh(c, "fit-from-file.sh", "aware_ensemble", AWARE), 0))
    check_new_version(ans, "aware_ensemble", before, "fit-from-file.sh")
    ev = json.loads(expect(sh(c, "fit-from-file.sh", "--evaluate", "aware_ensemble", AWARE), 0))
    check_metric_set(ev["metrics"], "fit-from-file.sh --evaluate")
    check(ev["model_version"] == ans["model_version"], repr(ev))


# ---- 2. quantile calibration ----

def check_coverage(ans, where):
    after = ans["metrics"]["after"]
    cov = after["coverage"]
    check(set(cov) == {"0.8", "0.6", "0.4", "0.2"}, "%s: %r" % (where, cov))
    # split-conformal: on its own calibration rows each central interval
    # covers at least its nominal share
    for nominal, got in cov.items():
        check(got >= float(nominal) - 1e-9, "%s: coverage %s is %r" % (where, nominal, got))
    check(ans["corrections"]["method"] == "cqr" and len(ans["corrections"]["lower"]) == 9, repr(ans["corrections"]))


def test_calibrate_quantile_from_the_json_example(c):
    for name, tool in TOOLS:
        before = c.served("quantile_demo")
        ans = ok_json(tool(c, "calibrate", "quantile_demo", QCAL))
        check_new_version(ans, "quantile_demo", before, name)
        check_coverage(ans, name)
        check(ans["metrics"]["after"]["rows"] == 600, repr(ans["metrics"]["after"]))


def test_calibrate_quantile_from_csv(c):
    ex = load_example(QCAL)
    by = {t["name"]: t for t in ex["inputs"]}
    feats = c.file("q_features.csv", csv_matrix(rows_of(by["features"])))
    targets = c.file("q_targets.csv", "targets\n" + "\n".join(repr(float(y)) for y in rows_of(by["targets"])) + "\n")
    before = c.served("quantile_demo")
    ans = ok_json(ctl(c, "calibrate", "quantile_demo", "--input", "features", feats, targets,
                      "--param", "method=cqr"))
    check_new_version(ans, "quantile_demo", before, "CSV calibrate")
    check_coverage(ans, "CSV calibrate")
    # evaluate through the same files scores the calibrated version
    ev = ok_json(ctl(c, "evaluate", "quantile_demo", "--input", "features", feats, targets))
    check(ev["model_version"] == ans["model_version"] and "pinball" in ev["metrics"]["model"], repr(ev))


def test_python_library_calibrate(c):
    ex = load_example(QCAL)
    by = {t["name"]: t for t in ex["inputs"]}
    cl = tallyclient.TallyClient(c.url, api_key=c.admin)
    before = c.served("quantile_demo")
    ans = cl.calibrate("quantile_demo", {"features": rows_of(by["features"]),
                                         "targets": [float(y) for y in rows_of(by["targets"])]},
                       {"method": "cqr"})
    check_new_version(ans, "quantile_demo", before, "TallyClient.calibrate")
    check_coverage(ans, "TallyClient.calibrate")
    # the calibrated version serves: quantiles of three rows, not crossing
    q = cl.output(cl.infer("quantile_demo", {"features": rows_of(by["features"])[:3]}), "quantiles")
    check(len(q) == 3 and all(len(r) == 9 and r == sorted(r) for r in q), repr(q))
    cl.close()


# ---- 3. KV-cache sessions ----

def one_shot_logprobs(c):
    r = c.http("POST", "/v2/models/tiny_gpt2/infer",
               {"inputs": [tensor("input_ids", [TOKENS], datatype="INT64")], "outputs": [{"name": "token_logprobs"}]})
    check(r.status == 200, repr(r))
    return tallyclient._flatten(r.json()["outputs"][0]["data"], [])


def check_chunk(ans, sid, n, position):
    """A session answer: n token_logprobs (the new tokens' only) and the new position."""
    check(ans["model_name"] == "tiny_gpt2", repr(ans)[:300])
    (out,) = [o for o in ans["outputs"] if o["name"] == "token_logprobs"]
    check(out["shape"] == [1, n], "token_logprobs shape %r, expected [1, %d]" % (out["shape"], n))
    check(ans["parameters"]["session_id"] == sid and ans["parameters"]["position"] == position,
          repr(ans["parameters"]))
    return tallyclient._flatten(out["data"], [])


def test_sessions_through_tallyctl_and_tallyclient_py(c):
    want = one_shot_logprobs(c)
    first = c.file("chunk1.json", {"input_ids": [TOKENS[:4]]})
    # a curl body as it is: INT32 ids, and only token_logprobs asked for
    second = c.file("chunk2.json", {"inputs": [{"name": "input_ids", "shape": [1, 2], "datatype": "INT32",
                                                "data": TOKENS[4:]}],
                                    "outputs": [{"name": "token_logprobs"}]})
    for name, tool in TOOLS:
        s = ok_json(tool(c, "session", "create", "tiny_gpt2"))
        sid = s["session_id"]
        check(len(sid) >= 16 and s["position"] == 0 and s["model_version"] == "1", repr(s))
        # ids without a datatype take INT64 from the model's metadata
        a1 = ok_json(tool(c, "session", "infer", "tiny_gpt2", sid, first))
        got = check_chunk(a1, sid, 3, 4)
        check({o["name"] for o in a1["outputs"]} == {"token_logprobs", "nll", "next_token_logits"}, name)
        a2 = ok_json(tool(c, "session", "infer", "tiny_gpt2", sid, second))
        got += check_chunk(a2, sid, 2, 6)
        check([o["name"] for o in a2["outputs"]] == ["token_logprobs"], "%s: outputs %r" % (name, a2["outputs"]))
        check(len(got) == 5 and all(close(a, b, rel=1e-5, abs_=1e-5) for a, b in zip(got, want)),
              "%s: chunks %r != one request %r" % (name, got, want))
        g = ok_json(tool(c, "session", "get", "tiny_gpt2", sid))
        check(g["session_id"] == sid and g["position"] == 6 and g["memory_bytes"] > 0, repr(g))
        d = ok_json(tool(c, "session", "delete", "tiny_gpt2", sid))
        check(d == {"session_id": sid, "deleted": True}, repr(d))
        expect(tool(c, "session", "get", "tiny_gpt2", sid), 3, "was deleted")
        expect(tool(c, "session", "infer", "tiny_gpt2", sid, first), 3, "HTTP 404")


def test_complete_through_tallyctl_and_tallyclient_py(c):
    """Text generation: the whole answer, --format table's text, and --stream
    printing the same text piece by piece (tiny_gpt2, greedy)."""
    want = ok_json(ctl(c, "complete", "tiny_gpt2", "Hello", "--param", "max_tokens=12",
                       "--param", "temperature=0"))
    check(want["object"] == "text_completion" and want["usage"]["completion_tokens"] == 12, want)
    text = want["choices"][0]["text"]
    a = ok_json(py(c, "complete", "tiny_gpt2", "Hello", "--max-tokens", "12", "--temperature", "0"))
    check(a["choices"][0]["text"] == text, (a, want))
    t = expect(ctl(c, "complete", "tiny_gpt2", "Hello", "--param", "max_tokens=12", "--param",
                   "temperature=0", "--format", "table"), 0)
    check(t == text + "\n", (t, text))
    for name, args in (("tallyctl", ["--param", "max_tokens=12", "--param", "temperature=0"]),
                       ("tallyclient.py", ["--max-tokens", "12", "--temperature", "0"])):
        tool = ctl if name == "tallyctl" else py
        out = expect(tool(c, "complete", "tiny_gpt2", "Hello", "--stream", *args), 0)
        check(out == text + "\n", "%s --stream: %r != %r" % (name, out, text))
        expect(tool(c, "complete", "nope", "Hello", *args), 3, "unknown model")
    expect(ctl(c, "complete", "tiny_gpt2", "Hello", "--param", "temperature=-1", "--stream"), 3,
           "temperature")
    # the library: streamed pieces add up to the whole answer
    cl = tallyclient.TallyClient(c.url, c.admin)
    pieces = [ev["choices"][0]["text"] for ev in
              cl.complete_stream("tiny_gpt2", "Hello", max_tokens=12, temperature=0)]
    check("".join(pieces) == text and len(pieces) >= 2, pieces)
    check(cl.detokenize("tiny_gpt2", cl.tokenize("tiny_gpt2", "héllo")) == "héllo", "round trip")
    cl.close()


def test_session_int32_flag_and_output_flag(c):
    """--datatype INT32 on ids read without one, --output to ask for one output."""
    f = c.file("ids.json", {"input_ids": [TOKENS]})
    for name, tool in TOOLS:
        sid = ok_json(tool(c, "session", "create", "tiny_gpt2"))["session_id"]
        ans = ok_json(tool(c, "session", "infer", "tiny_gpt2", sid, f, "--datatype", "INT32",
                           "--output", "nll"))
        check([o["name"] for o in ans["outputs"]] == ["nll"] and ans["parameters"]["position"] == 6,
              "%s: %r" % (name, ans))
        table = expect(tool(c, "session", "get", "tiny_gpt2", sid, "--format", "table"), 0)
        check("position\t6" in table.splitlines(), table)
        expect(tool(c, "session", "delete", "tiny_gpt2", sid), 0)


def test_sessions_python_library(c):
    want = one_shot_logprobs(c)
    cl = tallyclient.TallyClient(c.url, api_key=c.admin)
    s = cl.session_create("tiny_gpt2")
    sid = s["session_id"]
    check(s["position"] == 0, repr(s))
    a1 = cl.session_infer("tiny_gpt2", sid, [tensor("input_ids", [TOKENS[:3]], datatype="INT64")])
    a2 = cl.session_infer("tiny_gpt2", sid, [tensor("input_ids", [TOKENS[3:]], datatype="INT32")],
                          outputs=["token_logprobs"])
    got = check_chunk(a1, sid, 2, 3) + check_chunk(a2, sid, 3, 6)
    check(all(close(a, b, rel=1e-5, abs_=1e-5) for a, b in zip(got, want)), "%r != %r" % (got, want))
    check(cl.session_get("tiny_gpt2", sid)["position"] == 6, "position")
    cl.session_delete("tiny_gpt2", sid)
    for call in (lambda: cl.session_get("tiny_gpt2", sid), lambda: cl.session_delete("tiny_gpt2", sid)):
        try:
            call()
            check(False, "a deleted session answered")
        except tallyclient.TallyError as e:
            check(e.status == 404 and e.exit_code == 3 and "deleted" in e.message, repr(e))
    cl.close()


# ---- 4. API keys and scopes ----

def test_admin_key_from_env_and_flag(c):
    one = c.file("one.json", {"features": [[0.1 * i for i in range(16)]]})
    for name, tool in TOOLS:
        for how in ("env", "flag"):
            key = "admin" if how == "env" else None
            extra = [] if how == "env" else ["--api-key", c.admin]
            check(json.loads(expect(tool(c, "health", *extra, key=key), 0)) == {"ready": True}, name)
            ans = ok_json(tool(c, "infer", "demo_mlp", one, *extra, key=key))
            check(ans["outputs"][0]["shape"] == [1, 4], "%s %s: %r" % (name, how, ans))
            ok_json(tool(c, "load", "demo_mlp", *extra, key=key))
            check(any(r["name"] == "demo_mlp" for r in ok_json(tool(c, "models", *extra, key=key))), name)


def test_infer_key_scope(c):
    one = c.file("one.json", {"features": [[0.1 * i for i in range(16)]]})
    for name, tool in TOOLS:
        ok_json(tool(c, "infer", "demo_mlp", one, key=c.infer_key))
        ok_json(tool(c, "evaluate", "aware_ensemble", AWARE, key=c.infer_key))
        # admin routes: 403, whether or not the model exists
        expect(tool(c, "unload", "demo_mlp", key=c.infer_key), 3, "HTTP 403")
        expect(tool(c, "unload", "no_such_model", key=c.infer_key), 3, "HTTP 403")
        expect(tool(c, "fit", "aware_ensemble", AWARE, key=c.infer_key), 3, "needs admin")
        # the flag wins over the environment
        expect(tool(c, "unload", "demo_mlp", "--api-key", c.infer_key), 3, "HTTP 403")
        check(c.http("GET", "/v2/models/demo_mlp/ready").status == 200, "demo_mlp was unloaded")
    expect(sh(c, "fit-from-file.sh", "aware_ensemble", AWARE, key=c.infer_key), 3, "HTTP 403")


def test_no_key_or_a_wrong_key_is_401(c):
    one = c.file("one.json", {"features": [[0.1 * i for i in range(16)]]})
    for name, tool in TOOLS:
        # the probes stay open
        expect(tool(c, "health", key=None), 0)
        expect(tool(c, "health", "live", key=None), 0)
        expect(tool(c, "models", key=None), 3, "HTTP 401")
        expect(tool(c, "infer", "demo_mlp", one, "--datatype", "FP32", key=None), 3, "HTTP 401")
        expect(tool(c, "unload", "demo_mlp", key=None), 3, "HTTP 401")
        expect(tool(c, "metrics", key=None), 3, "HTTP 401")
        expect(tool(c, "models", key="tly_" + "0" * 64), 3, "HTTP 401")
    check(c.http("GET", "/v2/models/demo_mlp/ready").status == 200, "demo_mlp was unloaded")


def test_keys_python_library(c):
    rows = {"features": [[0.1 * i for i in range(16)]]}
    admin = tallyclient.TallyClient(c.url, api_key=c.admin)
    check(admin.ready() and admin.model_ready("demo_mlp"), "admin: not ready")
    check(len(admin.output(admin.infer("demo_mlp", rows), "output")[0]) == 4, "admin infer")
    admin.load("demo_mlp")
    inf = tallyclient.TallyClient(c.url, api_key=c.infer_key)
    inf.infer("demo_mlp", rows)
    anon = tallyclient.TallyClient(c.url, api_key="")
    check(anon.live() and anon.ready(), "probes need no key")
    for cl, call, status in ((inf, lambda cl: cl.unload("demo_mlp"), 403),
                             (inf, lambda cl: cl.fit("aware_ensemble", rows), 403),
                             (anon, lambda cl: cl.infer("demo_mlp", rows), 401),
                             (anon, lambda cl: cl.unload("demo_mlp"), 401),
                             (anon, lambda cl: cl.metrics(), 401)):
        try:
            call(cl)
            check(False, "no error for a %d" % status)
        except tallyclient.TallyError as e:
            check(e.status == status and e.exit_code == 3, repr(e))
    # TALLY_API_KEY is the default key
    old = os.environ.get("TALLY_API_KEY")
    os.environ["TALLY_API_KEY"] = c.admin
    try:
        check(any(r["name"] == "demo_mlp" for r in tallyclient.TallyClient(c.url).repository_index()), "env key")
    finally:
        if old is None:
            del os.environ["TALLY_API_KEY"]
        else:
            os.environ["TALLY_API_KEY"] = old
    check(c.http("GET", "/v2/models/demo_mlp/ready").status == 200, "demo_mlp was unloaded")
    for cl in (admin, inf, anon):
        cl.close()


def test_key_file_lines_are_digests_of_the_keys(c):
    with open(c.keys) as f:
        lines = [l.split("#")[0].split() for l in f if l.split("#")[0].strip()]
    check(sorted(lines) == sorted([[hashlib.sha256(c.admin.encode()).hexdigest(), "admin"],
                                   [hashlib.sha256(c.infer_key.encode()).hexdigest(), "infer"]]), repr(lines))


# ---- 5. metrics (last: the counts include the requests above) ----

def samples(text, family):
    """{labels: value} of a family's labelled samples."""
    out = {}
    for l in text.splitlines():
        if l.startswith(family + "{"):
            labels, value = l.rsplit(" ", 1)
            out[labels] = float(value)
    return out


def counted(text, **labels):
    """The sum of tallyd_requests_total over the samples with these labels
    (fits and calibrations are counted under each new version)."""
    want = ['%s="%s"' % kv for kv in labels.items()]
    return sum(v for k, v in samples(text, "tallyd_requests_total").items() if all(w in k for w in want))


def family_of(line):
    """The metric family of an exposition line ("# HELP NAME ...", "# TYPE NAME ...", "NAME{...} v")."""
    if line.startswith("# HELP ") or line.startswith("# TYPE "):
        return line.split()[2]
    return line.split("{")[0].split()[0]


def test_metrics_grep_against_the_daemon(c):
    out = expect(sh(c, "metrics-grep.sh", "tallyd_requests_total"), 0)
    lines = out.splitlines()
    check(lines and all(l.startswith("tallyd_requests_total{") for l in lines), out[:500])
    # six fits above: JSON, two CSV, member outputs, library, script
    n = counted(out, model="aware_ensemble", endpoint="fit", code="200")
    check(n == 6, "%r fits counted: %s" % (n, out[:600]))
    # four refused: the infer key through both tools, the script and the library
    check(counted(out, endpoint="fit", code="403") == 4, "403 fits not counted")
    expect(sh(c, "metrics-grep.sh", "tallyd_requests_total", key=c.infer_key), 0)
    expect(sh(c, "metrics-grep.sh", "tallyd_requests_total", key=None), 3, "401")
    expect(sh(c, "metrics-grep.sh", "^no_such_metric"), 5)


def test_metrics_verb(c):
    # one session open while the tools read the gauge: it must say 1, then 0
    # once deleted (a gauge stuck at 0 read "no session left open" before)
    r = c.http("POST", "/v2/models/tiny_gpt2/sessions", {})
    check(r.status == 201, repr(r))
    sid = r.json()["session_id"]
    for name, tool in TOOLS:
        out = expect(tool(c, "metrics", "tallyd_requests_total", "tallyd_sessions_open", key=c.infer_key), 0)
        lines = out.splitlines()
        check("# TYPE tallyd_requests_total counter" in lines and "# TYPE tallyd_sessions_open gauge" in lines,
              "%s: %s" % (name, out[:400]))
        check({family_of(l) for l in lines} == {"tallyd_requests_total", "tallyd_sessions_open"},
              "%s: other families: %s" % (name, out[:600]))
        # four calibrations above: two from the JSON file, one from CSV, one from the library
        n = counted(out, model="quantile_demo", endpoint="calibrate", code="200")
        check(n == 4, "%s: %r calibrations counted" % (name, n))
        check(samples(out, "tallyd_sessions_open") == {} and "tallyd_sessions_open 1" in lines,
              "%s: the open session is not counted: %s" % (name, out[-300:]))
        # a histogram family brings its _bucket, _sum and _count lines
        h = expect(tool(c, "metrics", "tallyd_request_duration_seconds"), 0)
        for suffix in ("_bucket{", "_sum{", "_count{"):
            check(("tallyd_request_duration_seconds" + suffix) in h, "%s: no %s" % (name, suffix))
        everything = expect(tool(c, "metrics"), 0)
        check("process_resident_memory_bytes" in everything and "tallyd_build_info{" in everything, name)
    check(c.http("DELETE", "/v2/models/tiny_gpt2/sessions/" + sid).status == 200, "delete")
    for name, tool in TOOLS:
        out = expect(tool(c, "metrics", "tallyd_sessions_open", key=c.infer_key), 0)
        check("tallyd_sessions_open 0" in out.splitlines(), "%s: %s" % (name, out[-300:]))
    text = tallyclient.TallyClient(c.url, api_key=c.admin).metrics(["tallyd_requests_total"])
    check(text.startswith("# HELP tallyd_requests_total") and samples(text, "tallyd_requests_total"), text[:300])


if __name__ == "__main__":
    run_tests(collect(globals()), setup, teardown)
