"""Clients with large inputs: tallyclient.py takes numpy arrays and sends
large tensors (and, asked, every tensor) with the binary tensor extension;
tallyctl and libtally do the same (--binary, tally_client_set_binary_min).
Each binary request is checked twice: on the wire (a recording server sees
Inference-Header-Content-Length and exactly the tensor's bytes after the
JSON) and against tallyd (the same answer as the JSON form). Also: every
command of both tools has its own --help."""
import http.server
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import threading

from harness import ROOT, Daemon, SkipTest, check, collect, make_repo, run_tests, write_model

try:
    import numpy as np
except ImportError:
    np = None

sys.path.insert(0, os.path.join(ROOT, "clients", "python"))
import tallyclient  # noqa: E402

PYCLIENT = os.path.join(ROOT, "clients", "python", "tallyclient.py")
TALLYCTL = os.path.join(os.environ.get("TALLYD_BUILD", os.path.join(ROOT, "build")), "tallyctl")
COMMANDS = ("health", "models", "metadata", "infer", "fit", "evaluate", "calibrate", "load",
            "unload", "session", "metrics", "keygen")


class Recorder(http.server.BaseHTTPRequestHandler):
    seen = []

    def do_POST(self):
        n = int(self.headers.get("Content-Length", 0))
        Recorder.seen.append((dict(self.headers), self.rfile.read(n)))
        body = json.dumps({"model_name": "m", "model_version": "1", "outputs": []}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST

    def log_message(self, *a):
        pass


class Ctx:
    def __init__(self):
        self.tmp = tempfile.mkdtemp(prefix="tallyd-bin-")
        self.repo = make_repo()
        rng = __import__("random").Random(5)
        w0 = [[rng.uniform(-0.5, 0.5) for _ in range(16)] for _ in range(8)]
        w1 = [[rng.uniform(-0.5, 0.5) for _ in range(8)] for _ in range(3)]
        write_model(self.repo, "m", {"kind": "mlp", "activations": ["tanh", "none"]},
                    {"layers.0.weight": ("F32", [8, 16], [v for r in w0 for v in r]),
                     "layers.0.bias": ("F32", [8], [0.1] * 8),
                     "layers.1.weight": ("F32", [3, 8], [v for r in w1 for v in r]),
                     "layers.1.bias": ("F32", [3], [0.0, 0.2, -0.1])})
        self.d = Daemon(self.repo).start()
        self.url = "http://127.0.0.1:%d" % self.d.port
        self.rec = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
        threading.Thread(target=self.rec.serve_forever, daemon=True).start()
        self.rec_url = "http://127.0.0.1:%d" % self.rec.server_address[1]

    def close(self):
        self.rec.shutdown()
        self.d.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)
        shutil.rmtree(self.repo, ignore_errors=True)

    def daemon_logs(self):
        return self.d.logs()


def setup():
    return Ctx()


def split_binary(headers, body):
    n = int(headers["Inference-Header-Content-Length"])
    return json.loads(body[:n]), body[n:]


def rows(n):
    return [[((i * 16 + j) % 23) / 10.0 - 1.0 for j in range(16)] for i in range(n)]


def test_python_numpy_and_binary(c):
    if np is None:
        raise SkipTest("numpy is not installed")
    x = np.asarray(rows(300), np.float32)          # 4800 elements: binary by default
    small = np.asarray(rows(2), np.float64)        # FP64, 32 elements: JSON
    tc = tallyclient.TallyClient(c.url)
    want = tc.output(tc.infer("m", {"features": rows(300)}, binary=False), "output")
    got = tc.output(tc.infer("m", {"features": x}), "output")
    check(np.allclose(got, want, atol=1e-6), "numpy binary input differs")
    ans = tc.infer("m", {"features": x}, binary_outputs=True)
    o = ans["outputs"][0]
    check(isinstance(o["data"], np.ndarray) and o["data"].shape == (300, 3), repr(o)[:200])
    check(np.allclose(o["data"], want, atol=1e-6), "binary output differs")
    got_small = tc.output(tc.infer("m", {"features": small}), "output")
    check(np.allclose(got_small, want[:2], atol=1e-6))
    # on the wire
    Recorder.seen.clear()
    rc = tallyclient.TallyClient(c.rec_url)
    rc.infer("m", {"features": x})
    rc.infer("m", {"features": small})
    rc.infer("m", {"features": rows(2)}, binary=True)
    (h1, b1), (h2, b2), (h3, b3) = Recorder.seen
    head, raw = split_binary(h1, b1)
    check(h1["Content-Type"] == "application/octet-stream")
    check(head["inputs"][0]["parameters"]["binary_data_size"] == 4800 * 4 and raw == x.tobytes(),
          head)
    check("Inference-Header-Content-Length" not in h2, "a small input went binary")
    j = json.loads(b2)
    check(j["inputs"][0]["datatype"] == "FP64" and j["inputs"][0]["shape"] == [2, 16], j)
    head, raw = split_binary(h3, b3)
    check(raw == struct.pack("<32f", *[v for r in rows(2) for v in r]), "list packed wrongly")


def tool(args, url, extra_env=None):
    env = dict(os.environ, TALLY_URL=url)
    env.update(extra_env or {})
    p = subprocess.run(args, capture_output=True, text=True, timeout=60, env=env)
    return p.returncode, p.stdout, p.stderr


def test_tallyctl_and_python_cli_binary(c):
    if not os.path.exists(TALLYCTL):
        raise SkipTest("build/tallyctl is not built")
    f = os.path.join(c.tmp, "big.json")
    with open(f, "w") as fh:
        json.dump({"inputs": [{"name": "features", "shape": [300, 16], "datatype": "FP32",
                               "data": rows(300)}]}, fh)
    small = os.path.join(c.tmp, "small.json")
    with open(small, "w") as fh:
        json.dump({"features": rows(3)}, fh)
    for name, cmd in (("tallyctl", [TALLYCTL]), ("tallyclient.py", [sys.executable, PYCLIENT])):
        answers = []
        for extra in ([], ["--binary"]):
            rc, out, err = tool(cmd + ["infer", "m", f] + extra, c.url)
            check(rc == 0, "%s: %s" % (name, err))
            answers.append(json.loads(out)["outputs"][0]["data"])
        check(answers[0] == answers[1], "%s: the binary answer differs" % name)
        Recorder.seen.clear()
        check(tool(cmd + ["infer", "m", f], c.rec_url)[0] == 0)
        check(tool(cmd + ["infer", "m", small, "--datatype", "FP32"], c.rec_url)[0] == 0)
        check(tool(cmd + ["infer", "m", small, "--datatype", "FP32", "--binary"], c.rec_url)[0] == 0)
        (h1, b1), (h2, b2), (h3, b3) = Recorder.seen
        head, raw = split_binary(h1, b1)
        check(len(raw) == 4800 * 4 and head["inputs"][0]["parameters"]["binary_data_size"] == 4800 * 4,
              "%s: %s" % (name, head))
        check(struct.unpack("<4f", raw[:16]) == tuple(struct.unpack("<4f", struct.pack("<4f", *rows(1)[0][:4]))))
        check("Inference-Header-Content-Length" not in h2, "%s: a small input went binary" % name)
        head, raw = split_binary(h3, b3)
        check(len(raw) == 48 * 4, "%s: --binary sent %d bytes" % (name, len(raw)))


def test_every_command_has_help(c):
    tools = [("tallyclient.py", [sys.executable, PYCLIENT])]
    if os.path.exists(TALLYCTL):
        tools.append(("tallyctl", [TALLYCTL]))
    for name, cmd in tools:
        for sub in COMMANDS:
            rc, out, err = tool(cmd + [sub, "--help"], c.url)
            check(rc == 0 and "usage:" in out and sub in out.split("\n")[0], "%s %s --help: %s%s"
                  % (name, sub, out[:300], err[:300]))
        rc, out, err = tool(cmd + ["--help"], c.url)
        check(rc == 0 and all(s in out for s in COMMANDS), "%s --help lacks a command" % name)


if __name__ == "__main__":
    run_tests(collect(globals()), setup=setup, teardown=lambda c: c.close())
