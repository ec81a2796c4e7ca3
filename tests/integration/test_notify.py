"""The systemd notify protocol, with a Python AF_UNIX datagram socket
standing in for systemd: READY=1 once serving, WATCHDOG=1 at half of
WATCHDOG_USEC, RELOADING=1 + MONOTONIC_USEC at SIGHUP then READY=1,
STOPPING=1 at drain; socket paths and abstract names (@...) both work."""
import os
import shutil
import signal
import socket
import tempfile
import time

from harness import Daemon, check, collect, make_repo, run_tests, write_model

HAND = {
    "layers.0.weight": ("F32", [1, 1], [1]),
    "layers.0.bias": ("F32", [1], [0]),
}


class Listener:
    def __init__(self, abstract):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = "tallyd-test-%d-%d" % (os.getpid(), time.monotonic_ns())
            self.sock.bind("\0" + name)
            self.env = "@" + name
            self.dir = None
        else:
            self.dir = tempfile.mkdtemp(prefix="tallyd-notify-")
            path = os.path.join(self.dir, "notify.sock")
            self.sock.bind(path)
            self.env = path
        self.messages = []

    def wait(self, pred, timeout=10, what="message"):
        """Reads datagrams until one satisfies pred; returns its fields."""
        end = time.time() + timeout
        for m in self.messages:
            if pred(m):
                return m
        while time.time() < end:
            self.sock.settimeout(max(0.01, end - time.time()))
            try:
                data = self.sock.recv(4096).decode()
            except socket.timeout:
                break
            fields = dict(line.split("=", 1) for line in data.split("\n") if "=" in line)
            self.messages.append(fields)
            if pred(fields):
                return fields
        raise AssertionError("no %s among %r" % (what, self.messages))

    def close(self):
        self.sock.close()
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)


class Ctx:
    def __init__(self):
        self.repo = make_repo()
        write_model(self.repo, "one", {"kind": "mlp", "activations": ["none"]}, HAND)
        self.daemons = []

    def daemon_logs(self):
        return "".join(d.logs() for d in self.daemons)


def lifecycle(c, abstract):
    lis = Listener(abstract)
    d = Daemon(c.repo, [], env={"NOTIFY_SOCKET": lis.env, "WATCHDOG_USEC": "200000"})
    c.daemons.append(d)
    try:
        d.start(wait_ready=False)
        ready = lis.wait(lambda m: m.get("READY") == "1", what="READY=1")
        check(ready.get("MAINPID") == str(d.proc.pid), ready)
        check("serving 1 of 1 models" in ready.get("STATUS", ""), ready)
        # watchdog every 100 ms (half of 200 ms): several within half a second
        t0 = time.time()
        n0 = sum(1 for m in lis.messages if m.get("WATCHDOG") == "1")
        while time.time() - t0 < 0.6:
            try:
                lis.wait(lambda m: False, timeout=0.6 - (time.time() - t0))
            except AssertionError:
                pass
        n = sum(1 for m in lis.messages if m.get("WATCHDOG") == "1") - n0
        check(3 <= n <= 9, "%d watchdog pings in 0.6 s" % n)
        # reload
        before = time.clock_gettime(time.CLOCK_MONOTONIC) * 1e6
        d.proc.send_signal(signal.SIGHUP)
        rel = lis.wait(lambda m: m.get("RELOADING") == "1", what="RELOADING=1")
        usec = int(rel["MONOTONIC_USEC"])
        after = time.clock_gettime(time.CLOCK_MONOTONIC) * 1e6
        check(before - 1e3 <= usec <= after + 1e3, (before, usec, after))
        k = lis.messages.index(rel)
        lis.wait(lambda m: m.get("READY") == "1" and lis.messages.index(m) > k,
                 what="READY=1 after the reload")
        # drain
        d.proc.send_signal(signal.SIGTERM)
        stop = lis.wait(lambda m: m.get("STOPPING") == "1", what="STOPPING=1")
        check("draining" in stop.get("STATUS", ""))
        d.proc.wait(30)
        check(d.proc.returncode == 0)
    finally:
        d.stop()
        lis.close()


def test_socket_path(c):
    lifecycle(c, abstract=False)


def test_abstract_socket(c):
    lifecycle(c, abstract=True)


def test_watchdog_for_another_pid_is_ignored(c):
    lis = Listener(True)
    d = Daemon(c.repo, [], env={"NOTIFY_SOCKET": lis.env, "WATCHDOG_USEC": "100000",
                                "WATCHDOG_PID": "1"})
    c.daemons.append(d)
    try:
        d.start(wait_ready=False)
        lis.wait(lambda m: m.get("READY") == "1", what="READY=1")
        time.sleep(0.4)
        try:
            lis.wait(lambda m: m.get("WATCHDOG") == "1", timeout=0.1)
            check(False, "watchdog pings meant for pid 1 were sent")
        except AssertionError as e:
            check("no message" in str(e), str(e))
    finally:
        d.stop()
        lis.close()


def test_no_socket_no_noise(c):
    # without NOTIFY_SOCKET the daemon runs as before
    env = {"NOTIFY_SOCKET": ""}
    d = Daemon(c.repo, [], env=env)
    c.daemons.append(d)
    try:
        d.start()
        check(d.get("/v2/health/ready").status == 200)
    finally:
        check(d.stop() == 0)


def setup():
    return Ctx()


def teardown(c):
    for d in c.daemons:
        d.stop()
    shutil.rmtree(c.repo, ignore_errors=True)


if __name__ == "__main__":
    run_tests(collect(globals()), setup, teardown)
