"""The HTTP transport against hostile or careless clients (issue 10 defects
2, 3, 9, 10 and the TLS versions of 11; issue 11's occupied port; issue 12's
early start failures): half-closed connections are answered and closed,
ambiguous body framing is refused and the connection closed, a path with a
NUL or control character is a 400, a client that hangs up cancels its fit,
only TLS 1.2+ is negotiated, a second daemon on a taken port fails at start,
and a start that fails early exits cleanly (also under ASan)."""
import json
import os
import random
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time

from harness import (BIN, SLOW, Daemon, SkipTest, check, check_status, collect, make_repo,
                     run_tests, write_model)

D = 4
WEIGHTS = {
    "layers.0.weight": ("F32", [3, D], [0.5, -0.25, 0.125, 1.0] * 3),
    "layers.0.bias": ("F32", [3], [0.0, 0.1, -0.1]),
}
ENSEMBLE = {"kind": "ensemble", "member_output": "logit", "classes": 1,
            "families": [{"name": "fa", "members": [{"external": "e1"}, {"external": "e2"}]},
                         {"name": "fb", "members": [{"external": "e3"}, {"external": "e4"},
                                                    {"external": "e5"}]}]}


class Ctx:
    def __init__(self):
        self.repo = make_repo()
        self.tmp = tempfile.mkdtemp(prefix="tallyd-transport-")
        write_model(self.repo, "m1", {"kind": "mlp", "activations": ["none"]}, WEIGHTS)
        write_model(self.repo, "demo", {"kind": "mlp", "activations": ["none"]}, WEIGHTS)
        write_model(self.repo, "busy", ENSEMBLE, None)
        write_model(self.repo, "slow", ENSEMBLE, None)
        # --max-connections 200: 300 connections left half-open would lock it
        self.d = Daemon(self.repo, ["--max-connections", "200", "--threads", "2",
                                    "--log-level", "warn"]).start()
        self.others = []

    def daemon_logs(self):
        return self.d.logs() + "".join(o.logs() for o in self.others)


def setup():
    return Ctx()


def teardown(c):
    for o in c.others:
        o.stop()
    c.d.stop()
    shutil.rmtree(c.repo, ignore_errors=True)
    shutil.rmtree(c.tmp, ignore_errors=True)


def complete(buf):
    head, sep, rest = buf.partition(b"\r\n\r\n")
    if not sep:
        return False
    cl = [l for l in head.split(b"\r\n") if l.lower().startswith(b"content-length:")]
    return bool(cl) and len(rest) >= int(cl[0].split(b":")[1])


def exchange(port, data, half_close=False, timeout=5, until_close=False):
    """Sends data; reads one answer (or, with until_close, until the server
    closes). Returns (bytes received, whether the server closed)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout * SLOW)
    buf, closed = b"", False
    try:
        s.sendall(data)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        while until_close or not complete(buf):
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                break
            except ConnectionResetError:
                closed = True
                break
            if not chunk:
                closed = True
                break
            buf += chunk
    finally:
        s.close()
    return buf, closed


def status_of(buf):
    return int(buf.split()[1]) if buf.startswith(b"HTTP/1.") else None


def close_wait(port):
    out = subprocess.run(["ss", "-tan", "state", "close-wait", "sport", "= :%d" % port],
                         capture_output=True, text=True).stdout
    return max(0, len([l for l in out.splitlines() if l.strip()]) - 1)


def infer_request(model="m1"):
    body = json.dumps({"inputs": [{"name": "features", "shape": [1, D], "datatype": "FP32",
                                   "data": [1.0] * D}]}).encode()
    return (b"POST /v2/models/%s/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % (model.encode(), len(body))) + body


# ---- defect 2: half-closed connections ------------------------------------

def test_half_closed_answered_and_closed(c):
    if not shutil.which("ss"):
        raise SkipTest("the ss command (iproute2) is not installed")
    fds0 = len(os.listdir("/proc/%d/fd" % c.d.proc.pid))
    answered = 0
    for _ in range(300):
        buf, _ = exchange(c.d.port, b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n",
                          half_close=True, timeout=2)
        answered += status_of(buf) == 200
    check(answered == 300, "%d of 300 half-closed health checks answered" % answered)
    deadline = time.time() + 2 * SLOW
    while close_wait(c.d.port) and time.time() < deadline:
        time.sleep(0.05)
    cw = close_wait(c.d.port)
    fds = len(os.listdir("/proc/%d/fd" % c.d.proc.pid))
    check(cw == 0, "%d sockets still in CLOSE-WAIT after 300 half-closes" % cw)
    check(fds <= fds0 + 2, "daemon descriptors %d -> %d" % (fds0, fds))
    # the server closes at once after the answer
    buf, closed = exchange(c.d.port, b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n",
                           half_close=True, timeout=2, until_close=True)
    check(status_of(buf) == 200 and closed, "not closed: %r" % buf[:200])
    check_status(c.d.get("/v2/health/live", timeout=3), 200)


def test_half_closed_infer_gets_its_answer(c):
    got = 0
    for _ in range(20):
        buf, _ = exchange(c.d.port, infer_request(), half_close=True, timeout=3)
        got += status_of(buf) == 200
    check(got == 20, "%d of 20 half-closed infers answered" % got)


def test_keep_alive_still_kept(c):
    # a client that did not half-close keeps its connection for a second request
    s = socket.create_connection(("127.0.0.1", c.d.port), timeout=5)
    try:
        for _ in range(3):
            s.sendall(infer_request())
            buf = b""
            while not complete(buf):
                chunk = s.recv(65536)
                check(chunk, "closed after %r" % buf[:100])
                buf += chunk
            check(status_of(buf) == 200 and b"connection: close" not in buf.lower(), buf[:300])
    finally:
        s.close()


def test_connection_timeout_default(c):
    out = subprocess.run([BIN, "--help"], capture_output=True, text=True).stdout
    line = [l for l in out.splitlines() if "--connection-timeout" in l]
    check(line and "default 60" in line[0], line)
    # the default applies: an idle connection is closed by a daemon started
    # without the flag (probed with a short timeout through the config file)
    cfgf = os.path.join(c.tmp, "cfg.json")
    with open(cfgf, "w") as f:
        json.dump({"connection_timeout": 1}, f)
    d = Daemon(c.repo, ["--config", cfgf, "--log-level", "warn"])
    c.others.append(d)
    d.start()
    s = socket.create_connection(("127.0.0.1", d.port), timeout=5 * SLOW)
    t0 = time.time()
    try:
        check(s.recv(1) == b"", "idle connection got data")
    except ConnectionResetError:
        pass
    finally:
        s.close()
    check(time.time() - t0 < 4 * SLOW, "idle connection kept %.1fs" % (time.time() - t0))
    d.stop()
    c.others.remove(d)


# ---- defect 3: request smuggling -------------------------------------------

SMUGGLED = b"POST /v2/repository/models/demo/unload HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"


def smuggle_cases():
    n = len(SMUGGLED)
    return [
        ("two Content-Length", b"Content-Length: 0\r\nContent-Length: %d\r\n" % n, SMUGGLED),
        ("Transfer-Encoding and Content-Length",
         b"Transfer-Encoding: chunked\r\nContent-Length: %d\r\n" % (n + 5),
         b"0\r\n\r\n" + SMUGGLED),
        ("space before the colon", b"Content-Length : %d\r\n" % n, SMUGGLED),
        ("tab before the colon", b"Content-Length\t: %d\r\n" % n, SMUGGLED),
        ("Content-Length folded (obs-fold)", b"Content-Length: 0\r\n %d\r\n" % n, SMUGGLED),
        ("Content-Length not a number", b"Content-Length: 0x%x\r\n" % n, SMUGGLED),
        ("Transfer-Encoding gzip", b"Transfer-Encoding: gzip\r\n", SMUGGLED),
        ("Transfer-Encoding chunked twice",
         b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
         b"0\r\n\r\n" + SMUGGLED),
    ]


def test_smuggling_refused(c):
    for name, headers, body in smuggle_cases():
        req = b"POST /v2/health/live HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n" + body
        buf, closed = exchange(c.d.port, req, timeout=3, until_close=True)
        check(status_of(buf) == 400, "%s: %r" % (name, buf[:300]))
        check(b"HTTP/1.1 2" not in buf and b"HTTP/1.1 4" not in buf[12:].replace(
            b"HTTP/1.1 400 Bad Request", b""), "%s: a second answer: %r" % (name, buf[:600]))
        check(closed, "%s: connection left open" % name)
        head, _, rest = buf.partition(b"\r\n\r\n")
        check(b"connection: close" in head.lower(), "%s: %r" % (name, head))
        if b"application/json" in head.lower():  # ours (libmicrohttpd answers some itself)
            n = int([l for l in head.split(b"\r\n") if l.lower().startswith(b"content-length:")][0]
                    .split(b":")[1])
            check(isinstance(json.loads(rest[:n])["error"], str), name)
    # the smuggled unload never ran
    r = check_status(c.d.get("/v2/models/demo/ready"), 200)
    check(r.status == 200, r)
    # a plain chunked body still works
    body = json.loads(infer_request().split(b"\r\n\r\n", 1)[1])
    raw = json.dumps(body).encode()
    req = (b"POST /v2/models/m1/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"%x\r\n%s\r\n0\r\n\r\n" % (len(raw), raw))
    buf, _ = exchange(c.d.port, req, timeout=3)
    check(status_of(buf) == 200, buf[:300])


# ---- defect 10: NUL and control characters in the path ---------------------

def test_path_controls_refused(c):
    for path in (b"/v2/models/m1%00", b"/v2/models/m1%00/ready", b"/v2/models/m1%0a",
                 b"/v2/models/m1%1F", b"/v2/models/m1%7f", b"/v2/models/m%001/infer",
                 b"/v2/models/m1\x01"):
        buf, _ = exchange(c.d.port, b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n", timeout=3,
                          until_close=path.endswith(b"\x01"))
        st = status_of(buf)
        check(st == 400, "%r: %r" % (path, buf[:300]))
    # ordinary %-escapes still reach the model
    buf, _ = exchange(c.d.port, b"GET /v2/models/m%31 HTTP/1.1\r\nHost: x\r\n\r\n", timeout=3)
    check(status_of(buf) == 200, buf[:300])


# ---- defect 9: a client that hangs up cancels its job ----------------------

def fit_request(model, epochs):
    rng = random.Random(5)
    N = 20000
    Z = [rng.gauss(0, 2) for _ in range(N * 5)]
    labels = [rng.randrange(2) for _ in range(N)]
    blobs = [struct.pack("<%df" % len(Z), *Z), struct.pack("<%di" % N, *labels)]
    head = {"inputs": [
        {"name": "member_outputs", "datatype": "FP32", "shape": [N, 5],
         "parameters": {"binary_data_size": len(blobs[0])}},
        {"name": "labels", "datatype": "INT32", "shape": [N],
         "parameters": {"binary_data_size": len(blobs[1])}}],
        "parameters": {"epochs": epochs, "patience": 0, "batch_size": 64}}
    js = json.dumps(head).encode()
    body = js + b"".join(blobs)
    return (b"POST /v2/models/%s/fit HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream"
            b"\r\nInference-Header-Content-Length: %d\r\nContent-Length: %d\r\n\r\n"
            % (model.encode(), len(js), len(body))) + body


def test_hangup_cancels_fit(c):
    req = fit_request("busy", 1000000)
    s = socket.create_connection(("127.0.0.1", c.d.port), timeout=10)
    s.sendall(req)
    time.sleep(1.0)
    s.close()  # the client hangs up
    # the fit stops: the model takes a new fit (no 409) within a few seconds
    small = {"inputs": [{"name": "member_outputs", "shape": [2, 5], "datatype": "FP32",
                         "data": [0.0] * 10},
                        {"name": "labels", "shape": [2], "datatype": "INT32", "data": [0, 2]}]}
    deadline = time.time() + 5 * SLOW
    r = c.d.post("/v2/models/busy/fit", small)
    while r.status == 409 and time.time() < deadline:
        time.sleep(0.05)
        r = c.d.post("/v2/models/busy/fit", small)
    check(r.status != 409, "the fit still runs %.1fs after its client left" % (time.time() - deadline + 5 * SLOW))
    check_status(r, 400)  # the poll's bad label: it got the claim, and failed without a version
    time.sleep(0.3)
    check(check_status(c.d.get("/v2/models/busy"), 200).json()["versions"] == ["1"])
    check(not os.path.exists(os.path.join(c.repo, "busy", "2")), "a version was published")


def test_half_closed_slow_fit_answered(c):
    # a client that only half-closed still reads: past the hang-up grace it
    # gets the "102 Processing" probe, then its answer, and the fit publishes
    t0 = time.time()
    buf, closed = exchange(c.d.port, fit_request("slow", 3000), half_close=True, timeout=120,
                           until_close=True)
    took = time.time() - t0
    final = buf
    while final.startswith(b"HTTP/1.1 1"):
        final = final.partition(b"\r\n\r\n")[2]
    check(status_of(final) == 200 and closed, "%.1fs: %r" % (took, buf[:300]))
    check(took < 0.3 or buf.startswith(b"HTTP/1.1 102 Processing\r\n\r\n"), buf[:200])
    vs = check_status(c.d.get("/v2/models/slow"), 200).json()["versions"]
    check("2" in vs, vs)


# ---- TLS versions ------------------------------------------------------------

def make_cert(tmp):
    if not shutil.which("openssl"):
        raise SkipTest("the openssl command is not installed")
    cert, key = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
    p = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                        "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                        "-keyout", key, "-out", cert], capture_output=True, timeout=60)
    check(p.returncode == 0, p.stderr)
    return cert, key


def s_client(port, version):
    # SECLEVEL=0: OpenSSL 3 would not offer TLS 1.0/1.1 itself otherwise
    p = subprocess.run(["openssl", "s_client", "-connect", "127.0.0.1:%d" % port, version,
                        "-cipher", "DEFAULT@SECLEVEL=0", "-brief"], input=b"",
                       capture_output=True, timeout=20)
    return p.returncode, (p.stdout + p.stderr).decode("utf-8", "replace")


def test_tls_12_and_up_only(c):
    cert, key = make_cert(c.tmp)
    d = Daemon(c.repo)  # started by hand: the harness's readiness check speaks plain HTTP
    c.others.append(d)
    d.proc = subprocess.Popen([BIN, "--model-repository", c.repo, "--listen",
                               "127.0.0.1:0", "--tls-cert", cert, "--tls-key", key,
                               "--log-level", "warn"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.STDOUT)
    d.port_from_log()
    deadline = time.time() + 20 * SLOW
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", d.port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.05)
    for ok in ("1.2", "1.3"):
        rc, out = s_client(d.port, "-tls" + ok.replace(".", "_"))
        check(rc == 0 and "Protocol version: TLSv" + ok in out,
              "TLS %s refused: %s" % (ok, out[-600:]))
    for old, name in (("-tls1_1", "TLSv1.1"), ("-tls1", "TLSv1\n")):
        rc, out = s_client(d.port, old)
        check(rc != 0 and "Protocol version: " + name not in out,
              "%s negotiated: %s" % (old, out[-600:]))
    d.stop()
    c.others.remove(d)


# ---- starting: an occupied port, early failures ---------------------------

def run_daemon(args, timeout=20):
    p = subprocess.run([BIN] + args, capture_output=True, timeout=timeout * SLOW)
    return p.returncode, (p.stdout + p.stderr).decode("utf-8", "replace")


def test_second_daemon_same_port_fails(c):
    rc, out = run_daemon(["--model-repository", c.repo, "--listen", "127.0.0.1:%d" % c.d.port])
    check(rc != 0, "a second daemon on the same port started (rc %d): %s" % (rc, out[-400:]))
    check("address" in out.lower() and "in use" in out.lower(), out[-400:])
    check("AddressSanitizer" not in out and "runtime error" not in out, out[-2000:])
    check_status(c.d.get("/v2/health/live"), 200)


def test_early_start_failures_clean(c):
    bad = os.path.join(c.tmp, "not-a-cert.pem")
    with open(bad, "w") as f:
        f.write("not a certificate\n")
    cases = [
        ("missing --tls-cert file", ["--tls-cert", os.path.join(c.tmp, "nope.pem"),
                                     "--tls-key", bad]),
        ("unparseable certificate", ["--tls-cert", bad, "--tls-key", bad]),
        ("bad --api-key-file", ["--api-key-file", os.path.join(c.tmp, "nope.keys")]),
        ("missing repository", ["--model-repository", os.path.join(c.tmp, "nope")]),
    ]
    for name, extra in cases:
        args = ["--model-repository", c.repo, "--listen", "127.0.0.1:0"] + extra
        rc, out = run_daemon(args)
        check(rc == 1 or rc == 2, "%s: exit %d: %s" % (name, rc, out[-600:]))
        check("AddressSanitizer" not in out and "runtime error" not in out and
              "LeakSanitizer" not in out, "%s: %s" % (name, out[-3000:]))


def test_clean_stop(c):
    # last: everything above left no trace a sanitizer or the drain objects to
    rc = c.d.stop()
    logs = c.d.logs()
    check(rc == 0, "exit %s:\n%s" % (rc, logs[-2000:]))
    check("Sanitizer" not in logs and "runtime error" not in logs, logs[-4000:])


if __name__ == "__main__":
    run_tests(collect(globals()), setup, teardown)
