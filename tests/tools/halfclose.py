#!/usr/bin/env python3
"""Half-closed connections against a real tallyd (issue 10, defect 2).

Starts a tallyd (TALLYD_BIN or build/tallyd) on a free loopback port with a
one-model repository and measures:
  1. 300 times: connect, send GET /v2/health/live, shutdown(SHUT_WR), read
     the answer, close. Then the daemon's sockets in CLOSE-WAIT (ss -tan) and
     its open descriptors, one second later.
  2. 20 infers whose client half-closes right after sending: how many got
     their answer.
  3. With --max-connections 200 (a second daemon): after the 300 half-closes,
     does a new client still get an answer?
Usage: tests/tools/halfclose.py [extra tallyd flags...]
Prints one line per figure; exits 0 (it measures, it does not judge)."""
import json
import os
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "integration"))
from harness import Daemon, make_repo, write_model  # noqa: E402

D = 4
WEIGHTS = {
    "layers.0.weight": ("F32", [3, D], [0.5, -0.25, 0.125, 1.0] * 3),
    "layers.0.bias": ("F32", [3], [0.0, 0.1, -0.1]),
}


def complete(buf):
    head, sep, rest = buf.partition(b"\r\n\r\n")
    if not sep:
        return False
    cl = [l for l in head.split(b"\r\n") if l.lower().startswith(b"content-length:")]
    return bool(cl) and len(rest) >= int(cl[0].split(b":")[1])


def half_close_exchange(port, data, timeout=5.0):
    """Sends data, half-closes, reads one answer (or until the server closes
    or the timeout), closes. Returns the bytes received."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    buf = b""
    try:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        while not complete(buf):
            try:
                chunk = s.recv(65536)
            except (socket.timeout, ConnectionResetError):
                break
            if not chunk:
                break
            buf += chunk
    finally:
        s.close()
    return buf


def close_wait(port):
    out = subprocess.run(["ss", "-tan", "state", "close-wait", "sport", "= :%d" % port],
                         capture_output=True, text=True).stdout
    return max(0, len([l for l in out.splitlines() if l.strip()]) - 1)


def open_fds(pid):
    try:
        return len(os.listdir("/proc/%d/fd" % pid))
    except OSError:
        return -1


def live_request():
    return b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n"


def infer_request():
    body = json.dumps({"inputs": [{"name": "features", "shape": [1, D], "datatype": "FP32",
                                   "data": [1.0] * D}]}).encode()
    return (b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body)) + body


def measure(extra, label):
    repo = make_repo()
    write_model(repo, "m", {"kind": "mlp", "activations": ["none"]}, WEIGHTS)
    d = Daemon(repo, ["--log-level", "error"] + extra).start()
    try:
        fds0 = open_fds(d.proc.pid)
        answered = 0
        for _ in range(300):
            if half_close_exchange(d.port, live_request(), timeout=2).startswith(b"HTTP/1.1 200"):
                answered += 1
        time.sleep(1)
        cw, fds = close_wait(d.port), open_fds(d.proc.pid)
        print("%s: 300 half-closed health checks: %d answered; 1 s later %d sockets in "
              "CLOSE-WAIT, daemon descriptors %d -> %d" % (label, answered, cw, fds0, fds))
        got = 0
        for _ in range(20):
            if half_close_exchange(d.port, infer_request(), timeout=2).startswith(b"HTTP/1.1 200"):
                got += 1
        print("%s: 20 infers half-closed right after sending: %d answered" % (label, got))
        try:
            r = d.get("/v2/health/live", timeout=3)
            print("%s: a new client afterwards: %d" % (label, r.status))
        except OSError as e:
            print("%s: a new client afterwards: no answer (%s)" % (label, type(e).__name__))
    finally:
        d.stop()


def main():
    extra = sys.argv[1:]
    measure(extra, "default flags")
    measure(extra + ["--max-connections", "200"], "--max-connections 200")


if __name__ == "__main__":
    main()
