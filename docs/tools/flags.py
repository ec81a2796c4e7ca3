#!/usr/bin/env python3
"""flags.py - the flag tables of README.md, docs/operations.md and
docs/deployment.md, generated from `tallyd --help` so they cannot drift.

Each table sits between the lines <!-- flags:FORM --> and <!-- /flags -->,
where FORM is `table` (flag | meaning), `config` (flag | config key |
meaning) or `list` (the flags in one sentence).

    docs/tools/flags.py [--tallyd build/tallyd]           rewrite the tables
    docs/tools/flags.py --check [--tallyd build/tallyd]   exit 1 if one differs
(`make docs` runs the first; tests/integration/test_docs.py the second.)"""
import argparse
import os
import re
import subprocess
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
FILES = ("README.md", "docs/operations.md", "docs/deployment.md")
NO_CONFIG_KEY = ("config", "help", "version", "keygen")
BLOCK = re.compile(r"(<!-- flags:(\w+) -->\n)(.*?)(<!-- /flags -->)", re.S)


def parse_help(text):
    """[(flag, arg, meaning)] from the two-column lines of tallyd --help."""
    out = []
    for line in text.splitlines():
        m = re.match(r"^  (--[a-z0-9-]+)(?: ([A-Z:_]+))?\s{2,}(.*)$", line)
        if m:
            out.append((m.group(1), m.group(2) or "", m.group(3).strip()))
    return out


def render(form, flags):
    esc = lambda s: s.replace("|", "\\|")  # noqa: E731
    if form == "list":
        return ("The flags (`tallyd --help`; every one but --config, --help, --version and "
                "--keygen is also a config-file key): %s.\n"
                % ", ".join("`%s`" % f for f, _, _ in flags))
    rows = []
    if form == "config":
        rows += ["| flag | config key | meaning |", "|---|---|---|"]
    else:
        rows += ["| flag | meaning |", "|---|---|"]
    for f, arg, meaning in flags:
        cell = "`%s%s`" % (f, " " + arg if arg else "")
        if form == "config":
            key = "—" if f[2:] in NO_CONFIG_KEY else "`%s`" % f[2:].replace("-", "_")
            rows.append("| %s | %s | %s |" % (cell, key, esc(meaning)))
        else:
            rows.append("| %s | %s |" % (cell, esc(meaning)))
    return "\n".join(rows) + "\n"


def rewrite(text, flags):
    def sub(m):
        if m.group(2) not in ("table", "config", "list"):
            raise SystemExit("unknown flags block %r" % m.group(2))
        return m.group(1) + render(m.group(2), flags) + m.group(4)
    return BLOCK.sub(sub, text)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tallyd", default=os.path.join(ROOT, os.environ.get("BUILD", "build"), "tallyd"))
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 where a table differs")
    a = p.parse_args(argv)
    help_text = subprocess.run([a.tallyd, "--help"], capture_output=True, text=True, timeout=30).stdout
    flags = parse_help(help_text)
    if len(flags) < 5:
        raise SystemExit("could not read the flags from `%s --help`" % a.tallyd)
    stale = []
    for rel in FILES:
        path = os.path.join(ROOT, rel)
        with open(path) as f:
            old = f.read()
        if not BLOCK.search(old):
            raise SystemExit("%s: no <!-- flags:... --> block" % rel)
        new = rewrite(old, flags)
        if new != old:
            stale.append(rel)
            if not a.check:
                with open(path, "w") as f:
                    f.write(new)
    if a.check and stale:
        print("flag tables differ from tallyd --help in: %s (run `make docs`)" % ", ".join(stale))
        return 1
    if not a.check:
        print("flag tables: %s" % ("rewrote " + ", ".join(stale) if stale else "up to date"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
