"""Security and limits over real HTTP(S): API keys and scopes (401/403,
decided before the model is looked up, health open, key file reloaded at
SIGHUP and kept when the new one is bad), tallyd --keygen, TLS with a
throw-away certificate, CORS preflights and headers, --max-batch,
--max-sequence-length, --connection-timeout and the connection limits."""
import hashlib
import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time

from harness import (BIN, Daemon, SkipTest, check, check_status, collect, make_repo, run_tests,
                     tensor, write_model)

HAND = {
    "layers.0.weight": ("F32", [2, 3], [1, 0, -1, 0.5, 0.5, 0.5]),
    "layers.0.bias": ("F32", [2], [0, 1]),
    "layers.1.weight": ("F32", [1, 2], [1, -1]),
    "layers.1.bias": ("F32", [1], [0.5]),
}
CFG = {"kind": "mlp", "activations": ["relu", "none"]}
INFER_KEY, ADMIN_KEY = "infer-key-0123456789", "admin-key-abcdefghij"
ROW = [tensor("features", [[1, 2, 3]])]


def digest(k):
    return hashlib.sha256(k.encode()).hexdigest()


def write_keys(path, entries):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write("# tallyd test keys\n\n")
        for k, scope in entries:
            f.write("%s %s  # %s\n" % (digest(k), scope, scope))
    os.replace(tmp, path)


def wait_for(pred, timeout=10, what="condition"):
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError("timed out waiting for " + what)


class Ctx:
    def __init__(self):
        self.repo = make_repo()
        self.tmp = tempfile.mkdtemp(prefix="tallyd-auth-")
        write_model(self.repo, "hand", CFG, HAND)
        self.keys = os.path.join(self.tmp, "keys.txt")
        write_keys(self.keys, [(INFER_KEY, "infer"), (ADMIN_KEY, "admin")])
        self.d = Daemon(self.repo, ["--api-key-file", self.keys, "--cors-origin",
                                    "https://app.example, https://other.example",
                                    "--max-batch", "4", "--max-sequence-length", "16"]).start()
        self.others = []

    def daemon_logs(self):
        return self.d.logs() + "".join(o.logs() for o in self.others)


def bearer(k):
    return {"Authorization": "Bearer " + k}


def test_health_stays_open(c):
    check_status(c.d.get("/v2/health/live"), 200)
    check_status(c.d.get("/v2/health/ready"), 200)


def test_missing_and_wrong_key(c):
    for path in ("/v2", "/v2/models/hand", "/metrics", "/v2/no/such/route"):
        r = check_status(c.d.get(path), 401, "credentials required")
        check(r.headers.get("www-authenticate") == 'Bearer realm="tallyd"', r.headers)
    r = check_status(c.d.infer("hand", ROW), 401)
    check(r.headers.get("www-authenticate") == 'Bearer realm="tallyd"')
    check_status(c.d.get("/v2", headers=bearer("nope")), 401, "not valid")
    check_status(c.d.get("/v2", headers=bearer(INFER_KEY + "x")), 401, "not valid")
    check_status(c.d.get("/v2", headers={"Authorization": "Basic " + INFER_KEY}), 401)
    check_status(c.d.get("/v2", headers={"X-Api-Key": "wrong"}), 401, "not valid")


def test_infer_scope(c):
    for h in (bearer(INFER_KEY), {"X-Api-Key": INFER_KEY}, {"authorization": "bearer  " + INFER_KEY}):
        r = check_status(c.d.post("/v2/models/hand/infer", {"inputs": ROW}, headers=h), 200)
        check(r.json()["outputs"][0]["data"] == [-3.5])
    for path in ("/v2", "/v2/models/hand", "/v2/models/hand/ready", "/metrics"):
        check_status(c.d.get(path, headers=bearer(INFER_KEY)), 200)
    check_status(c.d.post("/v2/repository/index", {}, headers=bearer(INFER_KEY)), 200)


def test_admin_decided_before_lookup(c):
    h = bearer(INFER_KEY)
    # 403 whether or not the model exists: nothing is learnt about the repository
    for m in ("hand", "no_such_model"):
        for op in ("load", "unload"):
            check_status(c.d.post("/v2/repository/models/%s/%s" % (m, op), {}, headers=h), 403,
                         "needs admin")
        check_status(c.d.post("/v2/models/%s/fit" % m, {"inputs": []}, headers=h), 403)
        check_status(c.d.post("/v2/models/%s/calibrate" % m, {"inputs": []}, headers=h), 403)
    # with admin, the model is looked up: 404 for the unknown one
    check_status(c.d.post("/v2/repository/models/no_such_model/unload", {},
                          headers=bearer(ADMIN_KEY)), 404)
    check_status(c.d.post("/v2/repository/models/hand/load", {}, headers=bearer(ADMIN_KEY)), 200)
    # admin may do what infer may
    check_status(c.d.infer("hand", ROW) if False else
                 c.d.post("/v2/models/hand/infer", {"inputs": ROW}, headers=bearer(ADMIN_KEY)), 200)


def test_refusal_before_body(c):
    # a refused upload is answered without reading a large body
    s = socket.create_connection(("127.0.0.1", c.d.port), timeout=10)
    s.sendall(b"POST /v2/models/hand/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 50000000\r\n"
              b"Content-Type: application/json\r\n\r\n")
    data = s.recv(4096).decode("latin-1")
    s.close()
    check(data.startswith("HTTP/1.1 401"), data[:200])


def test_keygen(c):
    p = subprocess.run([BIN, "--keygen", "--scope", "admin"], capture_output=True, timeout=10)
    check(p.returncode == 0, p.stderr)
    key, line = p.stdout.decode().splitlines()
    check(len(key) == 43 and line == digest(key) + " admin", (key, line))
    p2 = subprocess.run([BIN, "--keygen"], capture_output=True, timeout=10)
    key2, line2 = p2.stdout.decode().splitlines()
    check(key2 != key and line2 == digest(key2) + " infer")
    check(subprocess.run([BIN, "--keygen", "--scope", "root"], capture_output=True).returncode == 2)


def test_sighup_reloads_keys(c):
    new_key = "rotated-key-zyxwvut"
    write_keys(c.keys, [(new_key, "admin")])
    c.d.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: c.d.get("/v2", headers=bearer(new_key)).status == 200, what="new key")
    check_status(c.d.get("/v2", headers=bearer(INFER_KEY)), 401)
    # a bad file keeps the keys in force, and the log says why
    with open(c.keys, "w") as f:
        f.write("%s superuser\n" % digest(INFER_KEY))
    c.d.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "keeping the 1 keys in force" in c.d.logs(), what="log line")
    check("unknown scope 'superuser'" in c.d.logs())
    check_status(c.d.get("/v2", headers=bearer(new_key)), 200)
    check_status(c.d.get("/v2", headers=bearer(INFER_KEY)), 401)
    write_keys(c.keys, [(INFER_KEY, "infer"), (ADMIN_KEY, "admin")])
    c.d.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: c.d.get("/v2", headers=bearer(INFER_KEY)).status == 200, what="restored keys")


def test_bad_key_file_refuses_start(c):
    bad = os.path.join(c.tmp, "bad.txt")
    with open(bad, "w") as f:
        f.write("# nothing\n")
    p = subprocess.run([BIN, "--model-repository", c.repo, "--listen", "127.0.0.1:0",
                        "--api-key-file", bad], capture_output=True, timeout=20)
    check(p.returncode != 0 and b"holds no key" in p.stderr, p.stderr)


def test_cors(c):
    h = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
         "Access-Control-Request-Headers": "authorization, content-type"}
    r = c.d.request("OPTIONS", "/v2/models/hand/infer", headers=h)
    check(r.status == 204, r)
    check(r.headers.get("access-control-allow-origin") == "https://app.example")
    check("POST" in r.headers.get("access-control-allow-methods", ""))
    check("authorization" in r.headers.get("access-control-allow-headers", "").lower())
    check(r.headers.get("access-control-max-age") == "600")
    check(r.headers.get("vary") == "Origin")
    r = check_status(c.d.request("OPTIONS", "/v2/models/hand/infer",
                                 headers={"Origin": "https://evil.example"}), 403, "origin")
    check("access-control-allow-origin" not in r.headers)
    # ordinary answers carry the header for allowed origins only
    r = check_status(c.d.post("/v2/models/hand/infer", {"inputs": ROW},
                              headers=dict(bearer(INFER_KEY), Origin="https://other.example")), 200)
    check(r.headers.get("access-control-allow-origin") == "https://other.example")
    check("x-request-id" in r.headers.get("access-control-expose-headers", "").lower())
    r = check_status(c.d.get("/v2", headers=dict(bearer(INFER_KEY), Origin="https://evil.example")),
                     200)
    check("access-control-allow-origin" not in r.headers and r.headers.get("vary") == "Origin")
    # even a 401 carries it, so that the browser shows the error to the page
    r = check_status(c.d.get("/v2", headers={"Origin": "https://app.example"}), 401)
    check(r.headers.get("access-control-allow-origin") == "https://app.example")


def test_options_without_cors_is_405(c):
    repo2 = make_repo()
    write_model(repo2, "hand", CFG, HAND)
    d = Daemon(repo2, ["--cors-origin", "*"]).start()
    c.others.append(d)
    try:
        r = d.request("OPTIONS", "/v2", headers={"Origin": "https://any.example"})
        check(r.status == 204 and r.headers.get("access-control-allow-origin") == "*", r)
    finally:
        d.stop()
    d = Daemon(repo2, []).start()
    c.others.append(d)
    try:
        check_status(d.request("OPTIONS", "/v2"), 405)
    finally:
        d.stop()
        shutil.rmtree(repo2, ignore_errors=True)


def test_max_batch(c):
    h = bearer(INFER_KEY)
    body = {"inputs": [tensor("features", [[1, 2, 3]] * 4)]}
    r = check_status(c.d.post("/v2/models/hand/infer", body, headers=h), 200)
    check(r.json()["outputs"][0]["shape"] == [4, 1])
    body = {"inputs": [tensor("features", [[1, 2, 3]] * 5)]}
    check_status(c.d.post("/v2/models/hand/infer", body, headers=h), 400, "--max-batch")


def test_max_sequence_length(c):
    # checked by the server before any kind sees the tensors: an input named
    # input_ids [B, L] is measured by its last dimension
    h = bearer(INFER_KEY)
    body = {"inputs": [tensor("input_ids", [list(range(17))], datatype="INT32")]}
    check_status(c.d.post("/v2/models/hand/infer", body, headers=h), 400, "--max-sequence-length")
    body = {"inputs": [tensor("input_ids", [list(range(16))], datatype="INT32")]}
    r = c.d.post("/v2/models/hand/infer", body, headers=h)
    check(r.status == 400 and "max-sequence-length" not in r.body.decode(), r)


def make_cert(tmp):
    if not shutil.which("openssl"):
        raise SkipTest("the openssl command is not installed")
    cert, key = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
    p = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                        "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                        "-keyout", key, "-out", cert], capture_output=True, timeout=60)
    check(p.returncode == 0, p.stderr)
    return cert, key


def test_tls(c):
    cert, key = make_cert(c.tmp)
    d = Daemon(c.repo, ["--tls-cert", cert, "--tls-key", key])
    c.others.append(d)
    # the harness's readiness probe speaks plain HTTP: start and wait by hand
    cmd = [BIN, "--model-repository", c.repo, "--listen", "127.0.0.1:0",
           "--tls-cert", cert, "--tls-key", key]
    log = open(d.log_path, "wb")
    d.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    d.log = log
    d.port_from_log()
    ctx = ssl.create_default_context(cafile=cert)

    def https(method, path, body=None):
        conn = http.client.HTTPSConnection("127.0.0.1", d.port, context=ctx, timeout=10)
        try:
            h = {"Content-Type": "application/json"} if body is not None else {}
            conn.request(method, path, body=json.dumps(body) if body is not None else None,
                         headers=h)
            r = conn.getresponse()
            return r.status, r.read()
        finally:
            conn.close()

    try:
        def ready():
            try:
                return https("GET", "/v2/health/ready")[0] == 200
            except OSError:
                return False
        wait_for(ready, 20, "the HTTPS daemon")
        st, body = https("POST", "/v2/models/hand/infer", {"inputs": ROW})
        check(st == 200 and json.loads(body)["outputs"][0]["data"] == [-3.5], body)
        # keep-alive over TLS: several requests on one connection
        conn = http.client.HTTPSConnection("127.0.0.1", d.port, context=ctx, timeout=10)
        for _ in range(3):
            conn.request("GET", "/v2/health/live")
            r = conn.getresponse()
            check(r.status == 200 and json.loads(r.read()) == {"live": True})
        conn.close()
        # a client that does not trust the certificate is refused by its TLS
        bad = ssl.create_default_context()
        try:
            conn = http.client.HTTPSConnection("127.0.0.1", d.port, context=bad, timeout=10)
            conn.request("GET", "/v2/health/live")
            conn.getresponse()
            check(False, "an untrusted certificate was accepted")
        except ssl.SSLError:
            pass
        # plain HTTP to the TLS port gets no HTTP answer
        try:
            r = http.client.HTTPConnection("127.0.0.1", d.port, timeout=5)
            r.request("GET", "/v2/health/live")
            resp = r.getresponse()
            check(resp.status != 200, "plain HTTP was served on the TLS port")
        except (OSError, http.client.HTTPException):
            pass
    finally:
        d.stop()
    p = subprocess.run([BIN, "--model-repository", c.repo, "--tls-cert", cert],
                       capture_output=True, timeout=10)
    check(p.returncode == 2 and b"--tls-key" in p.stderr, p.stderr)


def test_connection_timeout(c):
    d = Daemon(c.repo, ["--connection-timeout", "1"]).start()
    c.others.append(d)
    try:
        # one byte every 1.5 s: silent longer than the timeout each time
        s = socket.create_connection(("127.0.0.1", d.port), timeout=10)
        req = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n"
        t0 = time.time()
        cut = False
        for i in range(len(req)):
            try:
                s.sendall(req[i:i + 1])
                time.sleep(1.5)
                s.setblocking(False)
                try:
                    if s.recv(100) == b"":
                        cut = True
                        break
                except BlockingIOError:
                    pass
                finally:
                    s.setblocking(True)
            except OSError:
                cut = True
                break
            if time.time() - t0 > 8:
                break
        s.close()
        check(cut, "the slow client was not cut off")
        # a prompt client on the same daemon is served
        check_status(d.get("/v2/health/live"), 200)
    finally:
        d.stop()


def test_per_ip_and_max_connections(c):
    # Four clients at once against a limit of 2: at most two are served; the
    # rest are closed (per address) or left waiting in the listen backlog
    # (global limit) without an answer. libmicrohttpd may still count a
    # just-closed probe connection for a moment, so "at most" it is.
    for flag in ("--per-ip-connections", "--max-connections"):
        d = Daemon(c.repo, [flag, "2"]).start()
        c.others.append(d)
        try:
            socks = [socket.create_connection(("127.0.0.1", d.port), timeout=1) for _ in range(4)]
            served = 0
            for s in socks:
                try:
                    s.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
                    served += s.recv(100).startswith(b"HTTP/1.1 200")
                except OSError:
                    pass
            check(served <= 2, "%s 2: %d of 4 concurrent connections served" % (flag, served))
            for s in socks:
                s.close()
            def serves():
                try:
                    return d.get("/v2/health/live", timeout=2).status == 200
                except OSError:
                    return False
            wait_for(serves, what="service after the clients left")
        finally:
            d.stop()


def setup():
    return Ctx()


def teardown(c):
    c.d.stop()
    shutil.rmtree(c.repo, ignore_errors=True)
    shutil.rmtree(c.tmp, ignore_errors=True)


if __name__ == "__main__":
    run_tests(collect(globals()), setup, teardown)
