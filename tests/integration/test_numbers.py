"""Numbers as text: every double tallyd writes, in answers and in the
version.json of a fitted version, is the shortest text that reads back to the
same double (0.845, not 0.84499999999999997), as Python's repr() writes it.

The check reads each number token of the raw text (not the parsed JSON) and
compares its significant digits with repr() of its value: never more."""
import json
import os
import re
import shutil
import tempfile

from harness import ROOT, Daemon, SkipTest, check, collect, run_tests

NUMBER = re.compile(rb'(?<![\w."])-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?(?![\w"])')


def digits(text):
    mant = re.split(r"[eE]", text)[0].lstrip("-").replace(".", "").lstrip("0").rstrip("0")
    return len(mant)


def check_shortest(raw, where):
    bad, n = [], 0
    for m in NUMBER.finditer(raw):
        tok = m.group().decode()
        if not re.search(r"[.eE]", tok):
            continue  # integers are exact
        n += 1
        v = float(tok)
        if digits(tok) > digits(repr(v)):
            bad.append("%s (shortest: %s)" % (tok, repr(v)))
    check(not bad, "%s: numbers longer than needed: %s" % (where, ", ".join(bad[:8])))
    return n


class Ctx:
    def __init__(self):
        src = os.path.join(ROOT, "deploy", "models")
        if not os.path.isfile(os.path.join(src, "aware_ensemble", "config.json")):
            raise SkipTest("deploy/models is missing")
        self.tmp = tempfile.mkdtemp(prefix="tallyd-numbers-")
        self.repo = os.path.join(self.tmp, "models")
        shutil.copytree(src, self.repo, ignore=shutil.ignore_patterns("[2-9]", "[1-9][0-9]*"))
        self.d = Daemon(self.repo).start()

    def close(self):
        self.d.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def daemon_logs(self):
        return self.d.logs()


def setup():
    return Ctx()


def body(name):
    with open(os.path.join(ROOT, "deploy", "examples", name), "rb") as f:
        return f.read()


def test_evaluate_answer_is_shortest(c):
    r = c.d.request("POST", "/v2/models/aware_ensemble/evaluate", body("aware_labelled.json"))
    check(r.status == 200, r)
    n = check_shortest(r.body, "evaluate")
    check(n > 10, "only %d reals in the answer" % n)
    acc = r.json()["metrics"]["accuracy"]
    check(('"accuracy":%s' % repr(acc)).encode() in r.body, r.body[:300])


def test_fit_answer_and_version_json_are_shortest(c):
    r = c.d.request("POST", "/v2/models/aware_ensemble/fit", body("aware_labelled.json"))
    check(r.status == 200, r)
    check_shortest(r.body, "fit answer")
    v = r.json()["model_version"]
    with open(os.path.join(c.repo, "aware_ensemble", v, "version.json"), "rb") as f:
        text = f.read()
    n = check_shortest(text, "version.json")
    check(n > 10, "only %d reals in version.json" % n)
    info = json.loads(text)
    check(info["sha256"] and info["version"] == int(v), info)
    # and it reads back the same as the answer said
    check(info["metrics"]["after"]["log_loss"] == r.json()["metrics"]["after"]["log_loss"])


def test_quantile_answers_are_shortest(c):
    for route in ("evaluate", "fit"):
        name = "quantile_calibrate.json" if route == "evaluate" else "quantile_fit.json"
        r = c.d.request("POST", "/v2/models/quantile_demo/" + route, body(name))
        check(r.status == 200, r)
        check_shortest(r.body, "quantile " + route)


def test_the_check_can_fail(c):
    try:
        check_shortest(b'{"a":0.84499999999999997}', "self-test")
    except AssertionError:
        return
    raise AssertionError("a 17-digit 0.845 passed")


if __name__ == "__main__":
    run_tests(collect(globals()), setup=setup, teardown=lambda c: c.close())
