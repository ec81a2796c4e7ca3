"""GET /metrics over real HTTP: the exposition passes `promtool check metrics`
(skipped, and reported so, only when promtool is absent), and the counters,
histograms and gauges move as requests are made."""
import os
import re
import shutil
import subprocess

from harness import (Daemon, SkipTest, check, check_status, collect, make_repo, run_tests,
                     tensor, write_model)

HAND = {
    "layers.0.weight": ("F32", [2, 3], [1, 0, -1, 0.5, 0.5, 0.5]),
    "layers.0.bias": ("F32", [2], [0, 1]),
    "layers.1.weight": ("F32", [1, 2], [1, -1]),
    "layers.1.bias": ("F32", [1], [0.5]),
}
CFG = {"kind": "mlp", "activations": ["relu", "none"], "version_policy": {"all": {}}}
LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$')


def parse(text):
    """{(name, frozenset(labels)): value} of every sample line."""
    out = {}
    for ln in text.splitlines():
        if not ln or ln.startswith("#"):
            continue
        m = LINE.match(ln)
        check(m, "not a sample line: %r" % ln)
        labels = frozenset(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(3) or ""))
        out[(m.group(1), labels)] = float(m.group(4))
    return out


def sample(samples, name, **labels):
    key = (name, frozenset(labels.items()))
    return samples.get(key, 0.0)


class Ctx:
    def __init__(self):
        self.repo = make_repo()
        write_model(self.repo, "hand", CFG, HAND)
        write_model(self.repo, "hand", CFG, HAND, version=2)
        os.makedirs(os.path.join(self.repo, "bad", "1"))
        with open(os.path.join(self.repo, "bad", "config.json"), "w") as f:
            f.write('{"kind": "mlp", "activations": ["relu"]}')
        with open(os.path.join(self.repo, "bad", "1", "model.safetensors"), "wb") as f:
            f.write(b"junk")
        self.d = Daemon(self.repo, ["--threads", "2"]).start(wait_ready=False)

    def metrics(self):
        r = check_status(self.d.get("/metrics"), 200)
        check(r.headers["content-type"].startswith("text/plain; version=0.0.4"),
              r.headers["content-type"])
        return r.body.decode()

    def daemon_logs(self):
        return self.d.logs()


def test_promtool_accepts(c):
    # traffic of every kind first, so that every family has series
    c.d.infer("hand", [tensor("features", [[1, 2, 3]])])
    c.d.get("/v2/models/nosuch")
    c.d.post("/v2/models/hand/fit", {"inputs": []})
    text = c.metrics()
    promtool = shutil.which("promtool")
    if not promtool:
        raise SkipTest("promtool is not on PATH (deploy/deps.sh promtool unpacks it into "
                       "build/tools/bin without installing the Prometheus server)")
    p = subprocess.run([promtool, "check", "metrics"], input=text.encode(), capture_output=True,
                       timeout=60)
    check(p.returncode == 0, "promtool: %s %s\n%s" % (p.stdout.decode(), p.stderr.decode(),
                                                      text[:3000]))


def test_request_counters_move(c):
    before = parse(c.metrics())
    for _ in range(5):
        check_status(c.d.infer("hand", [tensor("features", [[1, 2, 3]])]), 200)
    check_status(c.d.infer("hand", [tensor("features", [[1, 2]])]), 400)
    check_status(c.d.infer("hand", [tensor("features", [[1, 2, 3]])], version=1), 200)
    check_status(c.d.get("/v2/models/nosuch"), 404)
    after = parse(c.metrics())
    d = lambda name, **kw: sample(after, name, **kw) - sample(before, name, **kw)
    check(d("tallyd_requests_total", model="hand", version="2", endpoint="infer", code="200") == 5,
          "infer 200 v2 moved by %s" % d("tallyd_requests_total", model="hand", version="2",
                                          endpoint="infer", code="200"))
    check(d("tallyd_requests_total", model="hand", version="1", endpoint="infer", code="200") == 1)
    check(d("tallyd_requests_total", model="hand", version="2", endpoint="infer", code="400") == 1)
    # an unknown model is counted without its name (bounded label values)
    check(d("tallyd_requests_total", model="", version="", endpoint="model_metadata",
            code="404") == 1)
    check(not any(k[0] == "tallyd_requests_total" and ("model", "nosuch") in k[1] for k in after))
    # histograms: 7 infer requests observed in each, buckets cumulative
    for h in ("tallyd_request_duration_seconds", "tallyd_queue_wait_seconds",
              "tallyd_compute_seconds"):
        check(d(h + "_count", model="hand", endpoint="infer") == 7, h)
        inf = sample(after, h + "_bucket", model="hand", endpoint="infer", le="+Inf")
        check(inf == sample(after, h + "_count", model="hand", endpoint="infer"), h + " +Inf")
        small = sample(after, h + "_bucket", model="hand", endpoint="infer", le="0.0001")
        check(small <= inf)
        check(sample(after, h + "_sum", model="hand", endpoint="infer") >= 0)
    # a one-row mlp answers within 30 s: everything in the last finite bucket
    check(sample(after, "tallyd_request_duration_seconds_bucket", model="hand", endpoint="infer",
                 le="30") == sample(after, "tallyd_request_duration_seconds_count", model="hand",
                                    endpoint="infer"))


def test_fit_counters(c):
    before = parse(c.metrics())
    # the mlp kind cannot fit: a fit that is attempted and fails
    check_status(c.d.post("/v2/models/hand/fit", {"inputs": []}), 400)
    after = parse(c.metrics())
    check(sample(after, "tallyd_fits_total", model="hand") -
          sample(before, "tallyd_fits_total", model="hand") == 1)
    check(sample(after, "tallyd_fits_failed_total", model="hand") -
          sample(before, "tallyd_fits_failed_total", model="hand") == 1)


def test_gauges(c):
    s = parse(c.metrics())
    check(sample(s, "tallyd_model_ready", model="hand", version="1") == 1)
    check(sample(s, "tallyd_model_ready", model="hand", version="2") == 1)
    check(("tallyd_model_ready", frozenset({("model", "bad"), ("version", "1")})) in s,
          "failed version not reported")
    check(sample(s, "tallyd_model_ready", model="bad", version="1") == 0)
    check(sample(s, "tallyd_queue_depth") == 0)
    # the /metrics request itself is in flight while it is answered
    check(sample(s, "tallyd_requests_in_flight") >= 1)
    check(("tallyd_sessions_open", frozenset()) in s and ("tallyd_kv_cache_bytes", frozenset()) in s)
    rss = sample(s, "process_resident_memory_bytes")
    check(1 << 20 < rss < 1 << 34, "rss %s" % rss)
    check(sample(s, "process_cpu_seconds_total") > 0)
    check(sample(s, "process_open_fds") > 3)
    build = [k for k in s if k[0] == "tallyd_build_info"]
    check(len(build) == 1 and s[build[0]] == 1)
    labels = dict(build[0][1])
    check(labels["cuda"] in ("yes", "no") and labels["simd"] in ("scalar", "avx2+fma", "avx512", "neon"), labels)
    check(labels["version"] == check_status(c.d.get("/v2"), 200).json()["version"])


def test_cpu_counter_grows(c):
    a = sample(parse(c.metrics()), "process_cpu_seconds_total")
    body = {"inputs": [tensor("features", [[1, 2, 3]] * 2000)]}
    for _ in range(20):
        check_status(c.d.post("/v2/models/hand/infer", body), 200)
    b = sample(parse(c.metrics()), "process_cpu_seconds_total")
    check(b > a, "cpu seconds %s -> %s" % (a, b))


def setup():
    return Ctx()


def teardown(c):
    c.d.stop()
    shutil.rmtree(c.repo, ignore_errors=True)


if __name__ == "__main__":
    run_tests(collect(globals()), setup, teardown)
