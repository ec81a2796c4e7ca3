"""The deployment files checked against the daemon they deploy: every tallyd
flag they name is one `tallyd --help` lists, every config file they ship is
one tallyd starts with, every probe and health check path answers 200 on a
running daemon, and ports agree between --listen, containerPort, probes and
Services. The systemd unit goes through `systemd-analyze verify` where that
exists. There is no container engine here: the Dockerfile is parsed, not
built (docs/deployment.md says so)."""
import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile

from harness import BIN, ROOT, Daemon, SkipTest, check, collect, free_port, run_tests

try:
    import yaml
except ImportError:  # python3-yaml is in deploy/deps.sh; /usr/bin/python3 has it
    yaml = None

BUILD = os.environ.get("TALLYD_BUILD", os.path.dirname(BIN))
KINDS = ["mlp", "ensemble", "quantile_ensemble", "attention", "transformer"]
EXAMPLES = {"demo_mlp": "mlp", "aware_ensemble": "ensemble", "quantile_demo": "quantile_ensemble",
            "attention_demo": "attention", "tiny_gpt2": "transformer"}


def tallyd_flags():
    out = subprocess.run([BIN, "--help"], capture_output=True, text=True, check=True).stdout
    flags = set(re.findall(r"^\s+--([a-z0-9][a-z0-9-]*)", out, re.M))
    check("model-repository" in flags and "listen" in flags, "cannot read flags from --help:\n" + out)
    return flags


def flag_args(args):
    """{flag: value} of a tallyd argument list ("--x v" and "--x=v")."""
    out, i = {}, 0
    while i < len(args):
        a = args[i]
        check(a.startswith("--"), "a tallyd argument that is not a flag: %r in %r" % (a, args))
        if "=" in a:
            k, v = a[2:].split("=", 1)
        elif a[2:] in ("help", "version"):
            k, v = a[2:], None
        else:
            check(i + 1 < len(args), "flag %s without a value in %r" % (a, args))
            k, v = a[2:], args[i + 1]
            i += 1
        out[k] = v
        i += 1
    return out


def check_flags(ctx, args, where):
    fa = flag_args(args)
    for k in fa:
        check(k in ctx.flags, "%s: --%s is not a tallyd flag (tallyd --help lists: %s)"
              % (where, k, ", ".join(sorted(ctx.flags))))
    return fa


def check_config_keys(ctx, cfg, where):
    for k in cfg:
        check(k.replace("_", "-") in ctx.flags and k not in ("config", "help", "version"),
              "%s: key %r is not a tallyd flag" % (where, k))


def port_of(listen):
    return int(listen.rsplit(":", 1)[1])


def load_yaml(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def need_yaml():
    if yaml is None:
        raise SkipTest("PyYAML is not installed (python3-yaml; run deploy/deps.sh)")


class Ctx:
    def __init__(self):
        self.flags = tallyd_flags()
        self.tmp = tempfile.mkdtemp(prefix="tally-deploy-")
        self.repo = os.path.join(self.tmp, "models")
        subprocess.run([sys.executable, os.path.join(ROOT, "deploy", "gen_models.py"), self.repo],
                       check=True, stdout=subprocess.DEVNULL)
        self.d = Daemon(self.repo).start()
        self.probed = set()

    def probe(self, path, where):
        """GET path on the running daemon: 200 or a failure naming the file."""
        r = self.d.get(path)
        check(r.status == 200, "%s: probe path %s answers %d: %s" % (where, path, r.status, r.body[:200]))
        self.probed.add(path)

    def start_with(self, args, config=None, keep=False):
        """Starts tallyd with these arguments (plus --config FILE); the
        harness adds --model-repository and --listen (a free loopback port),
        which win over the file's, as flags do in tallyd. Returns once ready."""
        extra = list(args)
        if config is not None:
            p = os.path.join(self.tmp, "cfg-%d.json" % len(os.listdir(self.tmp)))
            with open(p, "w") as f:
                json.dump(config, f)
            extra = ["--config", p] + extra
        d = Daemon(self.repo, extra)
        d.start(timeout=20)
        check(d.get("/v2/health/ready").status == 200, "not ready")
        if not keep:
            d.stop()
        return d

    def daemon_logs(self):
        return self.d.logs()


def setup():
    return Ctx()


def teardown(c):
    c.d.stop()
    shutil.rmtree(c.tmp, ignore_errors=True)


# ---- systemd ----

def parse_unit(path):
    entries, section = [], None
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line or line[0] in "#;":
                continue
            if line.startswith("["):
                section = line.strip("[]")
                continue
            k, _, v = line.partition("=")
            entries.append((section, k.strip(), v.strip()))
    return entries


UNIT = os.path.join(ROOT, "systemd", "tallyd.service")


def test_systemd_unit_settings(c):
    e = parse_unit(UNIT)
    svc = {}
    for s, k, v in e:
        if s == "Service":
            svc.setdefault(k, []).append(v)
    want = {"Type": "notify", "WatchdogSec": "30", "DynamicUser": "yes", "StateDirectory": "tallyd",
            "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
            "PrivateDevices": "yes", "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
            "MemoryDenyWriteExecute": "yes", "Restart": "on-failure", "ExecReload": "/bin/kill -HUP $MAINPID"}
    for k, v in want.items():
        check(svc.get(k) == [v], "[Service] %s=%r, want %r" % (k, svc.get(k), v))
    check("@system-service" in svc.get("SystemCallFilter", []), "SystemCallFilter lacks @system-service")
    check(int(svc["LimitNOFILE"][0]) >= 4096, "LimitNOFILE too low")
    argv = shlex.split(svc["ExecStart"][0])
    check(argv[0] == "/usr/local/bin/tallyd", argv[0])
    fa = check_flags(c, argv[1:], "tallyd.service ExecStart")
    check(fa.get("config") == "/etc/tallyd/tallyd.json", repr(fa))
    # the drain must fit in the stop timeout
    with open(os.path.join(ROOT, "systemd", "tallyd.json")) as f:
        cfg = json.load(f)
    check(int(svc["TimeoutStopSec"][0]) * 1000 > cfg["drain_timeout"],
          "TimeoutStopSec shorter than the drain timeout")


def test_systemd_example_config_starts(c):
    with open(os.path.join(ROOT, "systemd", "tallyd.json")) as f:
        cfg = json.load(f)
    check_config_keys(c, cfg, "systemd/tallyd.json")
    check(cfg["model_repository"] == "/var/lib/tallyd/models", "repository outside StateDirectory")
    # the file as shipped; the harness points repository and address at the test's
    c.start_with([], config=cfg)


def test_systemd_analyze_verify(c):
    exe = shutil.which("systemd-analyze")
    if not exe:
        raise SkipTest("systemd-analyze is not installed")
    # verify insists that ExecStart's binary exists: give it a real copy
    d = tempfile.mkdtemp(dir=c.tmp)
    binary = os.path.join(d, "tallyd")
    shutil.copy(BIN, binary)
    with open(UNIT) as f:
        text = f.read()
    check(text.count("/usr/local/bin/tallyd") >= 1, "ExecStart path changed")
    unit = os.path.join(d, "tallyd.service")
    with open(unit, "w") as f:
        f.write(text.replace("ExecStart=/usr/local/bin/tallyd", "ExecStart=" + binary))
    p = subprocess.run([exe, "verify", unit], capture_output=True, text=True, timeout=60)
    # verify exits 0 even for unknown keys: any message is a failure
    msgs = [l for l in (p.stdout + p.stderr).splitlines() if l.strip()]
    check(p.returncode == 0 and not msgs, "systemd-analyze verify (exit %d):\n%s"
          % (p.returncode, "\n".join(msgs)))


# ---- Dockerfile ----

def parse_dockerfile(path):
    """[(INSTRUCTION, args)] with continuations joined and comments dropped."""
    out, cur = [], ""
    with open(path) as f:
        for line in f:
            s = line.rstrip("\n")
            if not cur and (not s.strip() or s.lstrip().startswith("#")):
                continue
            if cur and s.lstrip().startswith("#"):
                continue
            if s.endswith("\\"):
                cur += s[:-1] + " "
                continue
            cur += s
            ins, _, rest = cur.strip().partition(" ")
            out.append((ins.upper(), rest.strip()))
            cur = ""
    return out


def stages(instructions):
    """Stages with FROM's ${ARG} replaced by the global ARG defaults."""
    st, args = [], {}
    for ins, rest in instructions:
        if ins == "FROM":
            for k, v in args.items():
                rest = rest.replace("${%s}" % k, v).replace("$%s" % k, v)
            st.append({"from": rest, "ins": []})
        elif ins == "ARG" and not st:
            k, _, v = rest.partition("=")
            args[k.strip()] = v.strip()
        else:
            check(st, "an instruction before FROM")
            st[-1]["ins"].append((ins, rest))
    return st


def exec_form(rest, where):
    try:
        v = json.loads(rest)
    except ValueError:
        v = None
    check(isinstance(v, list) and all(isinstance(x, str) for x in v), "%s is not in exec form: %r" % (where, rest))
    return v


def health_path(argv, where):
    """The HTTP path a health-check command checks: curl URL or tallyctl health."""
    if os.path.basename(argv[0]) == "tallyctl":
        words = [a for i, a in enumerate(argv[1:], 1)
                 if not a.startswith("--") and not argv[i - 1] in ("--url", "--timeout", "--api-key")]
        check(words[:1] == ["health"], "%s: not `tallyctl health`: %r" % (where, argv))
        return "/v2/health/" + (words[1] if len(words) > 1 else "ready")
    urls = [a for a in argv if a.startswith("http")]
    check(urls, "%s: no URL in %r" % (where, argv))
    return "/" + urls[0].split("/", 3)[3]


def test_dockerfile(c):
    ins = parse_dockerfile(os.path.join(ROOT, "Dockerfile"))
    st = stages(ins)
    check(len(st) >= 2, "not multi-stage")
    for s in st:
        check(s["from"].split()[0] == "debian:bookworm-slim", "FROM %s" % s["from"])
    build = [s for s in st if s["from"].lower().endswith(" as build")]
    check(build, "no stage named build")
    runs = " ".join(r for i, r in build[0]["ins"] if i == "RUN")
    check("deploy/deps.sh" in runs and re.search(r"\bmake\b[^&;]*\ball\b", runs), "build stage: %s" % runs)
    rt = st[-1]
    rti = rt["ins"]
    runs = " ".join(r for i, r in rti if i == "RUN")
    # the runtime stage gets the libraries the binaries link (ldd in the
    # build stage), not whole packages; tests/integration/test_image.py runs it
    check(not re.search(r"apt-get|-dev\b|build-essential", runs), "runtime stage installs packages: %s" % runs)
    build_runs = " ".join(r for i, r in build[0]["ins"] if i == "RUN")
    check(re.search(r"\bldd\b[^|]*build/tallyd[^|]*build/tallyctl", build_runs),
          "build stage does not list the binaries' libraries with ldd")
    check(any(i == "COPY" and "--from=build" in r and "runtime-libs" in r for i, r in rti),
          "runtime stage does not copy the libraries from the build stage")
    users = [r for i, r in rti if i == "USER"]
    check(users and users[-1].split(":")[0] not in ("root", "0"), "runs as root: %r" % users)
    check(any(i == "EXPOSE" and r.split("/")[0] == "8000" for i, r in rti), "no EXPOSE 8000")
    vols = [exec_form(r, "VOLUME") for i, r in rti if i == "VOLUME"]
    check(vols, "no VOLUME")
    copies = [r for i, r in rti if i == "COPY"]
    check(all("--from=build" in r for r in copies), "runtime copies from outside the build stage")
    for art in ("build/tallyd", "build/tallyctl", "deploy/models"):
        check(any(art in r for r in copies), "runtime stage lacks %s" % art)
        check(os.path.exists(os.path.join(ROOT, art)), "%s is not a build output here" % art)
    # the health check checks a route that answers 200
    hc = [r for i, r in rti if i == "HEALTHCHECK"]
    check(len(hc) == 1 and " CMD " in " " + hc[0], repr(hc))
    hc_argv = exec_form(hc[0].split("CMD", 1)[1].strip(), "HEALTHCHECK")
    c.probe(health_path(hc_argv, "HEALTHCHECK"), "Dockerfile HEALTHCHECK")
    # ENTRYPOINT + CMD: real flags, the volume is the repository, every interface
    ep = [exec_form(r, "ENTRYPOINT") for i, r in rti if i == "ENTRYPOINT"][-1]
    cmd = [exec_form(r, "CMD") for i, r in rti if i == "CMD"][-1]
    check(os.path.basename(ep[0]) == "tallyd", repr(ep))
    fa = check_flags(c, ep[1:] + cmd, "Dockerfile ENTRYPOINT/CMD")
    check(fa.get("model-repository") in vols[-1], "--model-repository %r is not the VOLUME %r"
          % (fa.get("model-repository"), vols[-1]))
    check(fa.get("listen") == "0.0.0.0:8000", "listen %r" % fa.get("listen"))
    # the same arguments start a daemon (repository and address: the test's)
    args = {k: v for k, v in fa.items() if k not in ("model-repository", "listen")}
    d = c.start_with(sum([["--" + k, v] for k, v in args.items()], []), keep=True)
    # and the health-check command itself reports success against it
    try:
        argv = [os.path.join(BUILD, "tallyctl") if a == "tallyctl" else
                a.replace("127.0.0.1:8000", "127.0.0.1:%d" % d.port) for a in hc_argv]
        p = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        check(p.returncode == 0, "HEALTHCHECK command failed: %s %s" % (p.stdout, p.stderr))
    finally:
        d.stop()


def test_dockerignore_keeps_the_sources(c):
    import fnmatch
    with open(os.path.join(ROOT, ".dockerignore")) as f:
        pats = [l.strip() for l in f if l.strip() and not l.startswith("#")]
    check(any(p in ("build", "build/", "/build") for p in pats), "build/ is not ignored")
    needed = ["Makefile", "VERSION", "deploy/deps.sh", "deploy/gen_models.py", "daemon/server/main.c",
              "clients/c/tally.c", "clients/c/tallyctl.c", "mk/clients.mk", "tests/run.sh",
              "deploy/models/demo_mlp/config.json"]
    for n in needed:
        check(os.path.exists(os.path.join(ROOT, n)), "%s missing from the tree" % n)
        for p in pats:
            pp = p.lstrip("/").replace("**/", "")
            hit = fnmatch.fnmatch(n, pp) or n.startswith(pp.rstrip("/") + "/") or \
                fnmatch.fnmatch(os.path.basename(n), pp)
            check(not hit, ".dockerignore pattern %r drops %s, which the build needs" % (p, n))


# ---- compose and Prometheus ----

def test_compose_and_prometheus(c):
    need_yaml()
    dep = os.path.join(ROOT, "deploy")
    comp = load_yaml(os.path.join(dep, "docker-compose.yml"))[0]
    svcs = comp["services"]
    check({"tallyd", "prometheus"} <= set(svcs), repr(list(svcs)))
    t = svcs["tallyd"]
    check(os.path.exists(os.path.join(dep, t["build"]["context"], t["build"]["dockerfile"])), "no Dockerfile")
    fa = check_flags(c, t["command"], "docker-compose tallyd command")
    port = port_of(fa["listen"])
    check(any(str(p).split(":")[-1] == str(port) for p in t["ports"]), "ports %r vs listen %s" % (t["ports"], port))
    check(any(v.split(":")[1] == fa["model-repository"] for v in t["volumes"]), "repository not on a volume")
    test = t["healthcheck"]["test"]
    check(test[0] == "CMD", repr(test))
    c.probe(health_path(test[1:], "compose healthcheck"), "docker-compose healthcheck")
    p = svcs["prometheus"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in p["volumes"]}
    src = mounts.get("/etc/prometheus/prometheus.yml")
    check(src and os.path.exists(os.path.join(dep, src)), "prometheus.yml not mounted: %r" % mounts)
    prom = load_yaml(os.path.join(dep, src))[0]
    jobs = [j for j in prom["scrape_configs"] if j["job_name"] == "tallyd"]
    check(jobs, "no tallyd job")
    targets = [t for sc in jobs[0]["static_configs"] for t in sc["targets"]]
    check(targets == ["tallyd:%d" % port], "targets %r" % targets)
    check(jobs[0].get("metrics_path", "/metrics") == "/metrics", "metrics path")
    # /metrics is a route of the daemon (404 "not served by this build" until
    # the metrics module is in; never "unknown route")
    r = c.d.get("/metrics")
    check(r.status == 200 or "unknown route" not in r.body.decode(), "/metrics: %r" % r)
    promtool = shutil.which("promtool")
    if promtool:
        q = subprocess.run([promtool, "check", "config", os.path.join(dep, src)], capture_output=True,
                           text=True, timeout=60)
        check(q.returncode == 0, "promtool: %s %s" % (q.stdout, q.stderr))


# ---- Kubernetes ----

def containers_of(doc):
    spec = doc["spec"]
    if doc["kind"] == "Deployment":
        return spec["template"]["spec"].get("containers", [])
    return spec.get("containers", [])


def check_probes(c, container, ports, where):
    named = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
    n = 0
    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        pr = container.get(kind)
        if not pr:
            continue
        hg = pr["httpGet"]
        port = named.get(hg["port"], hg["port"])
        check(port in ports, "%s %s: port %r is not where tallyd listens (%r)" % (where, kind, hg["port"], ports))
        c.probe(hg["path"], "%s %s" % (where, kind))
        n += 1
    return n


def check_fleet(c, docs, dep, ctr, cfg, hpa):
    """Scale-out (docs/deployment.md, Scaling): several replicas, each with a
    replica id that the headless Service resolves, the router's nginx
    routing sessions by it, the fit lock and the repository watch on, and
    the autoscaler on tallyd's own queue metric."""
    check(dep["spec"]["replicas"] >= 2, "one replica")
    cmd = ctr.get("command", [])
    check(cmd[:2] == ["/bin/sh", "-c"] and "--replica-id" in cmd[2] and 'exec tallyd "$@"' in cmd[2],
          "the container must exec tallyd with its args and a --replica-id: %r" % cmd)
    check({"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}} in ctr["env"], ctr["env"])
    # the shell line run here: a pod IP becomes a valid replica id
    p = subprocess.run(["/bin/sh", "-c", cmd[2].replace("exec tallyd", "echo"), "tallyd", "--config", "x"],
                       env={"POD_IP": "10.244.1.17", "PATH": "/usr/bin:/bin"}, capture_output=True, text=True)
    check(p.stdout.split() == ["--config", "x", "--replica-id", "10-244-1-17"], p.stdout)
    svcs = {d["metadata"]["name"]: d for f, d in docs if d["kind"] == "Service"}
    head = svcs["tallyd-replicas"]
    check(head["spec"].get("clusterIP") == "None", "tallyd-replicas must be headless")
    check(head["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"], "headless selector")
    (rcm,) = [d for f, d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "tallyd-router"]
    conf = rcm["data"]["tallyd.conf"]
    check(".tallyd-replicas." in conf and "$tallyd_session_replica" in conf, "router config")
    check("tallyd-router" in svcs, "router Service")
    check(cfg.get("repository_watch") == "inotify" and cfg.get("repository_poll_secs", 0) > 0,
          "replicas on a network volume need polling beside inotify")
    check(cfg.get("fit_lock_lease_seconds", 30) > 0, "the fit lock is off")
    names = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    check(names == ["tallyd_queued_requests"], names)
    with open(os.path.join(ROOT, "deploy", "k8s", "hpa.yaml")) as f:
        check("tallyd_model_queued_requests" in f.read(), "the adapter rule names tallyd's metric")
    keda = load_yaml(os.path.join(ROOT, "deploy", "k8s", "keda", "scaledobject.yaml"))[0]
    check(keda["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"], "KEDA target")
    check("tallyd_model_queued_requests" in keda["spec"]["triggers"][0]["metadata"]["query"], "KEDA query")
    # tallyd serves the metric the autoscalers read
    m = c.d.get("/metrics").body.decode() if hasattr(c, "d") else None
    if m is not None:
        check("tallyd_model_queued_requests" in m, "no tallyd_model_queued_requests in /metrics")


def test_k8s_manifests(c):
    need_yaml()
    docs = []
    for p in sorted(glob.glob(os.path.join(ROOT, "deploy", "k8s", "*.yaml"))):
        docs += [(os.path.basename(p), d) for d in load_yaml(p)]
    by_kind = {}
    for f, d in docs:
        check("apiVersion" in d and "kind" in d and d.get("metadata", {}).get("name"), "%s: not a k8s object" % f)
        by_kind.setdefault(d["kind"], []).append(d)
    for k in ("Deployment", "Service", "ConfigMap", "PersistentVolumeClaim", "HorizontalPodAutoscaler"):
        check(by_kind.get(k), "%s: none" % k)

    def named(kind, name):
        (o,) = [d for d in by_kind[kind] if d["metadata"]["name"] == name]
        return o
    dep, svc = named("Deployment", "tallyd"), named("Service", "tallyd")
    cm, pvc, hpa = named("ConfigMap", "tallyd-config"), by_kind["PersistentVolumeClaim"][0], by_kind["HorizontalPodAutoscaler"][0]
    pod = dep["spec"]["template"]["spec"]
    (ctr,) = [x for x in pod["containers"] if x["name"] == "tallyd"]
    fa = check_flags(c, ctr.get("args", []), "deployment.yaml args")
    vols = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in ctr["volumeMounts"]}
    # the config file: a ConfigMap key mounted where --config points
    cdir, cfile = os.path.split(fa["config"])
    check(vols[mounts[cdir]]["configMap"]["name"] == cm["metadata"]["name"], "config volume")
    cfg = json.loads(cm["data"][cfile])
    check_config_keys(c, cfg, "configmap.yaml")
    # the repository: the PVC, mounted where the config says
    check(vols[mounts[cfg["model_repository"]]]["persistentVolumeClaim"]["claimName"]
          == pvc["metadata"]["name"], "repository volume is not the PVC")
    check("ReadWriteMany" in pvc["spec"]["accessModes"], "replicas need a shared repository")
    port = port_of(cfg["listen"])
    check(cfg["listen"].startswith("0.0.0.0:"), "tallyd must listen beyond loopback in a pod")
    check(check_probes(c, ctr, [port], "deployment.yaml") == 3, "startup/liveness/readiness probes")
    lp = ctr["livenessProbe"]["httpGet"]["path"]
    rp = ctr["readinessProbe"]["httpGet"]["path"]
    check((lp, rp) == ("/v2/health/live", "/v2/health/ready"), repr((lp, rp)))
    res = ctr["resources"]
    check(res["requests"]["cpu"] and res["limits"]["cpu"] and res["requests"]["memory"] and
          res["limits"]["memory"], "resources")
    check(pod["terminationGracePeriodSeconds"] * 1000 > cfg["drain_timeout"], "grace period < drain")
    sel = dep["spec"]["selector"]["matchLabels"]
    check(svc["spec"]["selector"] == sel, "Service selects other pods")
    named = {p.get("name"): p["containerPort"] for p in ctr["ports"]}
    for sp in svc["spec"]["ports"]:
        check(named.get(sp["targetPort"], sp["targetPort"]) == port, "Service targetPort %r" % sp["targetPort"])
    check(svc["spec"].get("sessionAffinity") == "ClientIP", "no session affinity")
    check(hpa["apiVersion"] == "autoscaling/v2", hpa["apiVersion"])
    check(hpa["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"], "HPA target")
    check(any(m["type"] == "Resource" and m["resource"]["name"] == "cpu" for m in hpa["spec"]["metrics"]), "cpu")
    check_fleet(c, docs, dep, ctr, cfg, hpa)
    # the ConfigMap's file starts a daemon (address and repository swapped for the test's)
    c.start_with([], config=cfg)


# ---- KServe ----

def test_kserve(c):
    need_yaml()
    files = sorted(glob.glob(os.path.join(ROOT, "deploy", "kserve", "*.yaml")))
    docs = [(os.path.basename(p), d) for p in files for d in load_yaml(p)]
    rts = [d for f, d in docs if d["kind"] == "ClusterServingRuntime"]
    check(len(rts) == 1, "one ClusterServingRuntime")
    rt = rts[0]
    check(rt["spec"]["protocolVersions"] == ["v2"], repr(rt["spec"]["protocolVersions"]))
    formats = [m["name"] for m in rt["spec"]["supportedModelFormats"]]
    check(sorted(formats) == sorted(KINDS), repr(formats))
    # every kind this build of tallyd knows is declared
    out = subprocess.run([BIN, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"kinds: ([^)]*)\)", out)
    check(m, "tallyd --version names no kinds: %r" % out)
    for k in re.split(r"[,\s]+", m.group(1).strip()):
        check(not k or k in formats, "kind %s is missing from the runtime" % k)
    (ctr,) = rt["spec"]["containers"]
    fa = check_flags(c, ctr["args"], "servingruntime.yaml args")
    port = port_of(fa["listen"])
    check([p["containerPort"] for p in ctr["ports"]] == [port], "containerPort vs --listen")
    check(check_probes(c, ctr, [port], "servingruntime.yaml") == 2, "liveness/readiness")
    # one InferenceService per example model, of the right format
    isvcs = {}
    for f, d in docs:
        if d["kind"] != "InferenceService":
            continue
        pm = d["spec"]["predictor"]["model"]
        check(pm["runtime"] == rt["metadata"]["name"], "%s: runtime %r" % (f, pm["runtime"]))
        check(pm["modelFormat"]["name"] in formats, "%s: format %r" % (f, pm["modelFormat"]["name"]))
        check(pm.get("protocolVersion", "v2") == "v2", f)
        mfa = check_flags(c, pm.get("args", []), f)
        isvcs[mfa["model"]] = pm["modelFormat"]["name"]
        check(re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", d["metadata"]["name"]), "%s: bad name" % f)
    check(isvcs == EXAMPLES, repr(isvcs))
    # where the example model exists already, its config.json kind is the format
    present = 0
    for name, fmt in EXAMPLES.items():
        cfgp = os.path.join(c.repo, name, "config.json")
        if os.path.exists(cfgp):
            with open(cfgp) as f:
                check(json.load(f)["kind"] == fmt, "%s is not a %s" % (name, fmt))
            present += 1
    check(present >= 1, "no example model generated")
    print("     %d of %d example models generated here" % (present, len(EXAMPLES)))


def test_every_health_path_was_probed(c):
    need_yaml()
    check({"/v2/health/live", "/v2/health/ready"} <= c.probed, "probed only %r" % c.probed)


if __name__ == "__main__":
    run_tests(collect(globals()), setup, teardown)
