#!/usr/bin/env python3
"""Figures for issue 10's decode defects (4, 5, 6), for one tallyd binary or
two side by side (before, after):

  python3 tests/tools/decode_figures.py BUILD/tallyd [OTHER/tallyd]

4: infer bodies of n = 10k/40k/100k inputs {"name":"iK","shape":[0],
   "datatype":"BOOL","data":[]} to demo_mlp: the request's time (the worker's,
   --threads 1), and how a small infer sent 0.2 s later is answered
   with "timeout_ms": 2000. Count limits are lifted (--max-inputs 0)
   where the binary has them, so the decode itself is measured.
5: a [1000, 16] binary input with "outputs": [{"name": "output"}] * 10000
   (644 KB): the answer's status and size, and the daemon's peak RSS.
6: a 34 MB JSON body ([1e6, 16] zeros): status and peak RSS.
Each case gets a fresh daemon (peak RSS is VmHWM of /proc/PID/status)."""
import json
import os
import struct
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "integration"))
from harness import ROOT, Daemon  # noqa: E402


def vm_kb(pid, key):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def flags_of(binary):
    out = subprocess.run([binary, "--help"], capture_output=True, text=True).stdout
    return out


def daemon(binary, extra):
    os.environ["TALLYD_BIN"] = binary
    import harness
    harness.BIN = binary
    lifted = [f for f in ("--max-inputs", "--max-outputs") if f in flags_of(binary)]
    args = ["--model", "demo_mlp", "--log-level", "error"] + extra
    for f in lifted:
        args += [f, "0"]
    d = Daemon(os.path.join(ROOT, "deploy", "models"), args)
    d.start()
    return d


def inputs_case(binary, n):
    d = daemon(binary, ["--threads", "1", "--request-timeout-ms", "600000"])
    try:
        items = ",".join('{"name":"i%d","shape":[0],"datatype":"BOOL","data":[]}' % i
                         for i in range(n))
        body = ('{"inputs":[%s]}' % items).encode()
        out = {}

        def big():
            t0 = time.time()
            out["r"] = d.post("/v2/models/demo_mlp/infer", body, timeout=600)
            out["t"] = time.time() - t0

        th = threading.Thread(target=big)
        th.start()
        time.sleep(0.2)
        x = [[0.25] * 16] * 2
        t1 = time.time()
        small = d.post("/v2/models/demo_mlp/infer", {"parameters": {"timeout_ms": 2000}, "inputs": [
            {"name": "features", "shape": [2, 16], "datatype": "FP32", "data": x}]}, timeout=600)
        t_small = time.time() - t1
        th.join()
        return "n=%6d: %6.2f s, status %d; small infer sent 0.2 s later: %d after %.2f s" % (
            n, out["t"], out["r"].status, small.status, t_small)
    finally:
        d.stop()


def outputs_case(binary):
    d = daemon(binary, [])
    try:
        raw = struct.pack("<16000f", *[0.5] * 16000)
        head = json.dumps({"inputs": [{"name": "features", "shape": [1000, 16], "datatype": "FP32",
                                       "parameters": {"binary_data_size": len(raw)}}],
                           "outputs": [{"name": "output"}] * 10000}).encode()
        r = d.post("/v2/models/demo_mlp/infer", head + raw,
                   headers={"Inference-Header-Content-Length": str(len(head))}, timeout=600)
        return "k=10000 outputs, %d KB request: status %d, answer %.1f MB, peak RSS %.0f MB" % (
            (len(head) + len(raw)) // 1024, r.status, len(r.body) / 1e6,
            vm_kb(d.proc.pid, "VmHWM") / 1024)
    finally:
        d.stop()


def parse_case(binary):
    d = daemon(binary, [])
    try:
        idle = vm_kb(d.proc.pid, "VmHWM")
        data = "[" + ",".join(["0"] * 16000000) + "]"
        body = ('{"inputs":[{"name":"features","shape":[1000000,16],"datatype":"FP32",'
                '"data":%s}]}' % data).encode()
        t0 = time.time()
        r = d.post("/v2/models/demo_mlp/infer", body, timeout=600)
        return "%.0f MB JSON body: status %d in %.2f s, peak RSS %.0f MB (idle %.0f MB)" % (
            len(body) / 1e6, r.status, time.time() - t0, vm_kb(d.proc.pid, "VmHWM") / 1024,
            idle / 1024)
    finally:
        d.stop()


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    for binary in sys.argv[1:]:
        print("== %s" % binary)
        for n in (10000, 40000, 100000):
            print("  defect 4:", inputs_case(binary, n), flush=True)
        print("  defect 5:", outputs_case(binary), flush=True)
        print("  defect 6:", parse_case(binary), flush=True)


if __name__ == "__main__":
    main()
