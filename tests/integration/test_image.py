"""The container image, built and run: `make image` (buildah on a Debian 12
base made with debootstrap, deploy/base_image.sh), then the image itself
started as its USER with its ENTRYPOINT and CMD (`buildah run --isolation
chroot --network host`; podman run needs cgroups this machine class lacks),
every example model READY, the image's HEALTHCHECK command run inside it,
and a fit that writes a new version into the image's repository.

Runs where buildah is installed and the tests run as root (debootstrap and
chroot isolation need root); skipped, saying why, elsewhere. .ci/run installs
buildah and debootstrap (deploy/deps.sh image). The debootstrap root is kept
in build/image and buildah caches layers, so a second run is quick.
TALLYD_IMAGE names the image (default localhost/tallyd:<VERSION>)."""
import json
import os
import re
import shutil
import signal
import subprocess
import time

from harness import ROOT, SkipTest, check, collect, free_port, run_tests

with open(os.path.join(ROOT, "VERSION")) as f:
    VERSION = f.read().strip()
IMAGE = os.environ.get("TALLYD_IMAGE", "localhost/tallyd:%s" % VERSION)
RUN = ["buildah", "run", "--isolation", "chroot", "--network", "host"]
EXAMPLES = sorted(e for e in os.listdir(os.path.join(ROOT, "deploy", "models"))
                  if os.path.exists(os.path.join(ROOT, "deploy", "models", e, "config.json")))


def unavailable():
    if shutil.which("buildah") is None:
        return "buildah is not installed (deploy/deps.sh image; .ci/run installs it)"
    if os.geteuid() != 0:
        return ("needs root: debootstrap and buildah's chroot isolation (tests run as uid %d)"
                % os.geteuid())
    have_base = subprocess.run(["buildah", "inspect", "--type", "image", "localhost/debian:bookworm"],
                               capture_output=True).returncode == 0
    if not have_base and shutil.which("debootstrap") is None:
        return "debootstrap is not installed and there is no base image (deploy/deps.sh image)"
    return None


def sh(argv, timeout=60, **kw):
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)


def descendants(pid):
    """Every process below pid (buildah run forks the container's process)."""
    children = {}
    for e in os.listdir("/proc"):
        if e.isdigit():
            try:
                with open("/proc/%s/stat" % e) as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(e))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def exe_name(pid):
    try:
        with open("/proc/%d/comm" % pid) as f:
            return f.read().strip()
    except OSError:
        return ""


def uid_of(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("Uid:"):
                return int(line.split()[1])
    return -1


class Ctx:
    def __init__(self):
        self.ctr = None
        self.proc = None
        self.port = None
        self.config = None
        self.log = None

    def request(self, method, path, body=None, timeout=60):
        import http.client
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            c.request(method, path, body=body, headers={"Content-Type": "application/json"} if body else {})
            r = c.getresponse()
            return r.status, r.read()
        finally:
            c.close()

    def daemon_logs(self):
        if self.log:
            with open(self.log, "rb") as f:
                return f.read().decode("utf-8", "replace")[-4000:]
        return ""


def setup():
    c = Ctx()
    c.why = unavailable()
    return c


def teardown(c):
    if c.proc is not None and c.proc.poll() is None:
        stop(c)
    if c.ctr:
        sh(["buildah", "rm", c.ctr])
    if c.log:
        try:
            os.unlink(c.log)
        except OSError:
            pass


def need(c, *attrs):
    if c.why:
        raise SkipTest(c.why)
    for a in attrs:
        if getattr(c, a) is None:
            raise SkipTest("an earlier step of this file failed (no %s)" % a)


def test_build(c):
    """make image: base from debootstrap (cached), then buildah bud."""
    need(c)
    t0 = time.time()
    p = sh(["make", "-s", "image", "IMAGE=" + IMAGE], timeout=1800, cwd=ROOT)
    took = time.time() - t0
    check(p.returncode == 0, "make image failed:\n%s\n%s" % (p.stdout[-3000:], p.stderr[-3000:]))
    info = json.loads(sh(["buildah", "inspect", "--type", "image", IMAGE]).stdout)
    c.config = info["Docker"]["config"]
    size = sh(["buildah", "images", "--format", "{{.Size}}", IMAGE]).stdout.strip()
    libs = sorted(set(re.findall(r"runtime library: (lib[\w.+-]*\.so[\w.]*)", p.stdout + p.stderr)))
    print("  make image: %.0f s; %s is %s%s" % (took, IMAGE, size,
          "; libraries copied: " + " ".join(libs) if libs else ""))
    check(c.config.get("User", "").split(":")[0] not in ("", "root", "0"), "runs as root: %r" % c.config)
    check(c.config.get("Entrypoint") and c.config.get("Cmd"), "no ENTRYPOINT/CMD: %r" % c.config)
    check(c.config.get("Healthcheck", {}).get("Test"), "no HEALTHCHECK (built as OCI?)")


def with_port(argv, port):
    """The image's CMD, its listening port replaced by a free one: the test
    shares the host's network with everything else on it."""
    return [re.sub(r":8000$", ":%d" % port, a) if re.search(r":8000$", a) else a for a in argv]


def test_serves_every_example(c):
    """ENTRYPOINT + CMD as the image's USER; every example model READY."""
    need(c, "config")
    c.ctr = sh(["buildah", "from", "--pull-never", IMAGE]).stdout.strip()
    check(c.ctr, "buildah from %s failed" % IMAGE)
    c.port = free_port()
    argv = with_port(c.config["Entrypoint"] + c.config["Cmd"], c.port)
    check(any(a.endswith(":%d" % c.port) for a in argv), "CMD has no --listen ...:8000: %r" % argv)
    c.log = "/tmp/tallyd-image-%d.log" % os.getpid()
    with open(c.log, "wb") as log:
        c.proc = subprocess.Popen(RUN + [c.ctr, "--"] + argv, stdout=log, stderr=subprocess.STDOUT)
    t0 = time.time()
    index = []
    while time.time() - t0 < 120:
        check(c.proc.poll() is None, "the container exited %s:\n%s" % (c.proc.returncode, c.daemon_logs()))
        try:
            st, _ = c.request("GET", "/v2/health/ready", timeout=2)
            if st == 200:
                st, b = c.request("POST", "/v2/repository/index", b"{}")
                index = json.loads(b)
                if all(e.get("state") == "READY" for e in index) and \
                        {e["name"] for e in index} >= set(EXAMPLES):
                    break
        except OSError:
            pass
        time.sleep(0.2)
    states = {e["name"]: e.get("state") for e in index}
    missing = [m for m in EXAMPLES if states.get(m) != "READY"]
    check(not missing, "not READY after %.0f s: %r\n%s" % (time.time() - t0, missing, c.daemon_logs()))
    daemons = [p for p in descendants(c.proc.pid) if exe_name(p) == "tallyd"]
    check(len(daemons) == 1, "tallyd process not found under buildah run: %r" % daemons)
    uid = uid_of(daemons[0])
    want = int(c.config["User"].split(":")[0])
    check(uid == want, "tallyd runs as uid %d, the image's USER is %r" % (uid, c.config["User"]))
    print("  %d example models READY %.1f s after start; tallyd runs as uid %d"
          % (len(EXAMPLES), time.time() - t0, uid))


def healthcheck(c):
    test = c.config["Healthcheck"]["Test"]
    check(test[0] == "CMD", "HEALTHCHECK is not exec form: %r" % test)
    argv = [a.replace("127.0.0.1:8000", "127.0.0.1:%d" % c.port) for a in test[1:]]
    return sh(RUN + [c.ctr, "--"] + argv, timeout=60)


def test_healthcheck_inside(c):
    need(c, "proc")
    p = healthcheck(c)
    check(p.returncode == 0, "HEALTHCHECK failed (%d): %s %s" % (p.returncode, p.stdout, p.stderr))
    print("  HEALTHCHECK inside the image: exit 0 (%s)" % " ".join(p.stdout.split())[:80])


def test_fit_writes_a_version(c):
    """aware_ensemble/fit saves version 2 in the image's /models."""
    need(c, "proc")
    with open(os.path.join(ROOT, "deploy", "examples", "aware_labelled.json"), "rb") as f:
        body = f.read()
    st, b = c.request("POST", "/v2/models/aware_ensemble/fit", body, timeout=300)
    check(st == 200, "fit: %d %s" % (st, b[:300]))
    st, b = c.request("GET", "/v2/models/aware_ensemble")
    versions = [str(v) for v in json.loads(b)["versions"]]
    check("2" in versions, "versions after the fit: %r" % versions)
    # seen from inside the container: /models is the image's VOLUME, which
    # buildah keeps with the container, as docker keeps an anonymous volume
    repo = c.config["Cmd"][c.config["Cmd"].index("--model-repository") + 1]
    vdir = repo.rstrip("/") + "/aware_ensemble/2"
    p = sh(RUN + [c.ctr, "--", "stat", "-c", "%n %u %s", vdir + "/model.safetensors",
                  vdir + "/version.json"])
    check(p.returncode == 0, "no version 2 in the image's repository: %s %s" % (p.stdout, p.stderr))
    owners = {int(l.split()[1]) for l in p.stdout.splitlines()}
    check(owners == {int(c.config["User"].split(":")[0])}, "version 2 owned by %r" % owners)
    print("  fit: version 2 in the image's repository, owned by the USER:\n    %s"
          % "\n    ".join(p.stdout.splitlines()))


def stop(c):
    daemons = [p for p in descendants(c.proc.pid) if exe_name(p) == "tallyd"]
    for p in daemons:
        os.kill(p, signal.SIGTERM)
    try:
        return c.proc.wait(30)
    except subprocess.TimeoutExpired:
        for p in descendants(c.proc.pid):
            os.kill(p, signal.SIGKILL)
        c.proc.kill()
        c.proc.wait()
        return None


def test_stops_and_health_fails(c):
    """SIGTERM stops the container's daemon cleanly; the HEALTHCHECK then
    fails (it checks something)."""
    need(c, "proc")
    rc = stop(c)
    check(rc == 0, "buildah run exited %r after SIGTERM to tallyd:\n%s" % (rc, c.daemon_logs()))
    p = healthcheck(c)
    check(p.returncode != 0, "HEALTHCHECK passes with no daemon: %s" % p.stdout)
    print("  SIGTERM: exit 0; HEALTHCHECK then exits %d" % p.returncode)


if __name__ == "__main__":
    why = unavailable()
    if why:  # the whole file needs buildah and root: one skip, one reason
        print("skip: %s" % why)
        print("tally: 0 passed, 0 failed, 1 skipped")
    else:
        run_tests(collect(globals()), setup=setup, teardown=teardown)
