"""The documentation is run, not only read.

Every shell block of README.md and docs/*.md that talks to `make run`'s
address is run in order against a fresh tallyd serving a copy of deploy/models
on a free port (the port and the repository path substituted), and each curl
in it must answer 2xx, or the status its comment documents ("# NaN ...: 400",
"# -> 404"). The README's walk-through runs twice, with `make reset-models` in
between, so it is repeatable. Also: the flag tables equal `tallyd --help`
(docs/tools/flags.py --check), no file points outside the repository, and
every relative link of the docs resolves."""
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from harness import BIN, ROOT, Daemon, SkipTest, check, collect, run_tests

DOCS = ["README.md"] + sorted("docs/" + f for f in os.listdir(os.path.join(ROOT, "docs"))
                              if f.endswith(".md"))
ADDR = re.compile(r"(?:https?://)?(?:localhost|127\.0\.0\.1):8000")
# first words of the lines a runnable block may hold; a block with anything
# else (starting a daemon, TLS on another port, systemctl, docker) is prose
RUNNABLE = ("curl", "SID=", "printf", "python3", "cat", "echo", "sleep", "for ", "done", "do ",
            "if ", "fi", "then")
CURL_WRAPPER = r"""
curl() { command curl -w '%{stderr}__STATUS__ %{http_code}\n' "$@"; }
"""
STATUS_NOTE = re.compile(r"(?:->|:|status|answers?|gives?)\s*([2-5]\d\d)\b")
ONLINE_NOTE = re.compile(r"#\s*(?:->\s*)?([2-5]\d\d)\b")


def shell_blocks(text):
    """[(first line number, code)] of fenced (```, ```sh, ```bash) and
    4-space indented blocks."""
    lines = text.split("\n")
    blocks, i = [], 0
    while i < len(lines):
        ln = lines[i]
        m = re.match(r"^```(\w*)\s*$", ln)
        if m:
            j = i + 1
            while j < len(lines) and not lines[j].startswith("```"):
                j += 1
            if m.group(1) in ("", "sh", "bash", "shell", "console"):
                blocks.append((i + 2, "\n".join(lines[i + 1:j])))
            i = j + 1
            continue
        if ln.startswith("    ") and (i == 0 or not lines[i - 1].strip()):
            j = i
            while j < len(lines) and (lines[j].startswith("    ") or not lines[j].strip()):
                j += 1
            body = [x[4:] for x in lines[i:j]]
            while body and not body[-1].strip():
                body.pop()
            blocks.append((i + 1, "\n".join(body)))
            i = j
            continue
        i += 1
    return blocks


def commands(code):
    """[(first line, text)] of each command of a block (continuations and
    multi-line quotes joined), comments dropped."""
    out, cur, quote = [], None, False
    for ln in code.split("\n"):
        s = ln.strip()
        if cur is None:
            if not s or s.startswith("#"):
                continue
            cur = [ln]
        else:
            cur.append(ln)
        quote ^= ln.count("'") % 2 == 1
        if not quote and not ln.rstrip().endswith("\\"):
            out.append("\n".join(cur))
            cur = None
    if cur:
        out.append("\n".join(cur))
    return out


def runnable(code):
    if not ADDR.search(code):
        return False, "no request to make run's address"
    for cmd in commands(code):
        first = cmd.strip()
        if not first.startswith(RUNNABLE):
            return False, "runs %r" % first.split("\n")[0][:60]
    return True, ""


def expected_statuses(code):
    """For each curl of the block, in order: the documented status or None (2xx)."""
    lines = code.split("\n")
    out, i = [], 0
    pending = []  # comment lines just above the command
    cmds = commands(code)
    for cmd in cmds:
        # locate the command's first line to read the comments above it
        first = cmd.split("\n")[0]
        while i < len(lines) and lines[i] != first:
            s = lines[i].strip()
            pending = pending + [s] if s.startswith("#") else ([] if not s else pending)
            i += 1
        n_curl = len(re.findall(r"(?:^|\$\(|\s)curl\s", cmd))
        want = None
        m = ONLINE_NOTE.search(cmd.split("\n")[-1]) if "#" in cmd.split("\n")[-1] else None
        if m:
            want = int(m.group(1))
        else:
            for c in pending:
                m = STATUS_NOTE.search(c)
                if m:
                    want = int(m.group(1))
        i += len(cmd.split("\n"))
        # "# -> NNN" on the line right after the command
        if i < len(lines) and lines[i].strip().startswith("# ->"):
            m = re.match(r"#\s*->\s*([2-5]\d\d)\b", lines[i].strip())
            if m:
                want = int(m.group(1))
        pending = []
        out += [want] * n_curl
    return out


class Ctx:
    def __init__(self):
        if not shutil.which("curl"):
            raise SkipTest("curl is not installed")
        self.tmp = tempfile.mkdtemp(prefix="tallyd-docs-")
        self.d = None

    def start(self):
        """A fresh daemon on a copy of the shipped example repository."""
        self.stop()
        self.repo = os.path.join(self.tmp, "models")
        shutil.rmtree(self.repo, ignore_errors=True)
        src = os.path.join(ROOT, "deploy", "models")
        if not os.path.isfile(os.path.join(src, "demo_mlp", "1", "model.safetensors")):
            raise SkipTest("deploy/models has no weights: run `make models` first")
        shutil.copytree(src, self.repo, ignore=shutil.ignore_patterns("[2-9]", "[1-9][0-9]*", ".rowlog"))
        self.d = Daemon(self.repo).start()
        return self.d

    def stop(self):
        if self.d:
            self.d.stop()
            self.d = None

    def run_doc(self, rel):
        """Runs the file's runnable blocks as one script; returns
        ([(where, command, want)], [status], output, skipped)."""
        with open(os.path.join(ROOT, rel)) as f:
            text = f.read()
        script, plan, skipped = [CURL_WRAPPER], [], []
        for line, code in shell_blocks(text):
            ok, why = runnable(code)
            if not ok:
                if ADDR.search(code):
                    skipped.append("%s:%d (%s)" % (rel, line, why))
                continue
            code = ADDR.sub("127.0.0.1:%d" % self.d.port, code)
            code = code.replace("deploy/models", self.repo)
            wants = expected_statuses(code)
            cmds = [c for c in commands(code) for _ in range(len(re.findall(r"(?:^|\$\(|\s)curl\s", c)))]
            plan += [("%s:%d" % (rel, line), c, w) for c, w in zip(cmds, wants)]
            script.append(code)
        if not plan:
            return [], [], "", skipped
        p = subprocess.run(["bash", "-c", "\n".join(script)], cwd=ROOT, capture_output=True,
                           text=True, timeout=600)
        got = [int(x) for x in re.findall(r"__STATUS__ (\d+)", p.stderr)]
        return plan, got, p.stdout[-3000:] + p.stderr[-3000:], skipped

    def check_doc(self, rel):
        plan, got, out, skipped = self.run_doc(rel)
        for s in skipped:
            print("  (not run: %s)" % s)
        check(len(got) == len(plan), "%s: %d curl commands found, %d answered:\n%s"
              % (rel, len(plan), len(got), out))
        bad = []
        for (where, cmd, want), status in zip(plan, got):
            ok = status == want if want else 200 <= status < 300
            if not ok:
                bad.append("%s: expected %s, got %d: %s" % (where, want or "2xx", status,
                                                             " ".join(cmd.split())[:160]))
        check(not bad, "\n".join(bad) + "\n" + out)
        return len(plan)

    def close(self):
        self.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def daemon_logs(self):
        return self.d.logs() if self.d else ""


def setup():
    return Ctx()


def test_parser_finds_commands(c):
    """The extractor itself: continuations, multi-line quotes, notes."""
    code = ("# a comment: 413 before it is read\n"
            "curl -s -X POST localhost:8000/x \\\n  -d @f\n"
            "curl -s localhost:8000/y -d '{\n  \"a\": 1}'   # -> 404\n"
            "SID=$(curl -s -X POST localhost:8000/s)\n"
            "curl -s localhost:8000/v2/health/ready   # 200 {\"ready\":true} (503 while starting)\n")
    cmds = commands(code)
    check(len(cmds) == 4, cmds)
    check(expected_statuses(code) == [413, 404, None, 200], expected_statuses(code))
    blocks = shell_blocks("text\n\n    curl a\n    curl b\n\nmore\n```sh\ncurl c\n```\n")
    check([b for _, b in blocks] == ["curl a\ncurl b", "curl c"], blocks)


def test_readme_walkthrough_twice_with_reset(c):
    c.start()
    n = c.check_doc("README.md")
    check(n >= 20, "only %d curl commands in README.md" % n)
    # back to the shipped versions, then the same walk-through again
    p = subprocess.run(["make", "-s", "reset-models", "MODELS=" + c.repo], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    check(p.returncode == 0, p.stdout + p.stderr)
    check(not os.path.exists(os.path.join(c.repo, "aware_ensemble", "2")), "version 2 survived the reset")
    c.d.proc.send_signal(signal.SIGHUP)
    deadline = time.time() + 30
    while time.time() < deadline:
        idx = c.d.post("/v2/repository/index").json()
        if not any(e["name"] == "aware_ensemble" and e.get("version") == "2" for e in idx):
            break
        time.sleep(0.2)
    c.check_doc("README.md")


def make_doc_test(rel):
    def t(c):
        c.start()
        c.check_doc(rel)
    return t


for _rel in DOCS[1:]:
    globals()["test_walkthrough_" + os.path.basename(_rel)[:-3]] = make_doc_test(_rel)


def test_python_examples(c):
    """The ```python blocks that use tallyclient run against `make run`'s models."""
    d = c.start()
    ran = 0
    for rel in DOCS:
        with open(os.path.join(ROOT, rel)) as f:
            text = f.read()
        for code in re.findall(r"```python\n(.*?)```", text, re.S):
            if "from tallyclient import" not in code or "torch" in code:
                continue
            env = dict(os.environ, TALLY_URL="http://127.0.0.1:%d" % d.port,
                       PYTHONPATH=os.path.join(ROOT, "clients", "python"))
            p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                               text=True, timeout=300)
            check(p.returncode == 0, "%s: a python example fails:\n%s" % (rel, p.stderr[-2000:]))
            ran += 1
    check(ran >= 1, "no python example found")


def test_flag_tables_match_help(c):
    p = subprocess.run(["python3", os.path.join(ROOT, "docs", "tools", "flags.py"), "--check",
                        "--tallyd", BIN], capture_output=True, text=True, timeout=60)
    check(p.returncode == 0, p.stdout + p.stderr)


def test_nothing_points_outside_the_repository(c):
    if not os.path.isdir(os.path.join(ROOT, ".git")) and not os.path.isfile(os.path.join(ROOT, ".git")):
        raise SkipTest("not a git checkout")
    # the pattern is assembled so that this file does not match it itself
    pattern = "|".join(("shared" + "/spec", r"[^a-z_]spec/[a-z]", "/" + "work/"))
    p = subprocess.run(["git", "grep", "-n", "-I", "-E", pattern, "--", "."],
                       cwd=ROOT, capture_output=True, text=True)
    check(p.stdout == "", "references to files outside the repository:\n" + p.stdout)


def test_relative_links_resolve(c):
    bad = []
    for rel in DOCS:
        with open(os.path.join(ROOT, rel)) as f:
            text = f.read()
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if re.match(r"^[a-z]+:", target):
                continue
            path = os.path.normpath(os.path.join(ROOT, os.path.dirname(rel), target))
            if not os.path.exists(path):
                bad.append("%s -> %s" % (rel, target))
    check(not bad, "broken links: %s" % bad)


if __name__ == "__main__":
    run_tests(collect(globals()), setup=setup, teardown=lambda c: c.close())
