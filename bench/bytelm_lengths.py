#!/usr/bin/env python3
"""Validation loss of byte-level models at 1x, 4x and 16x their training
length, measured through tallyd (the transformer kind's token_logprobs).

    bench/bytelm_lengths.py URL MODEL [MODEL ...] [--ctx 64] [--windows 16]

Text: the held-out last 5% of the bytes of /usr/lib/python3.X/*.py, the part
deploy/gen/train_bytelm.py did not train on. Each length L scores the same
number of windows of L bytes, evenly spaced through the held-out text; the
figure is the mean negative log-likelihood per predicted byte (nats), over
the whole window. Models are scored side by side in one run."""
import argparse
import glob
import json
import os
import sys
import urllib.request


def heldout():
    files = sorted(glob.glob("/usr/lib/python3.*/*.py"))
    ver = sorted({os.path.dirname(f) for f in files})[-1]
    data = b"".join(open(f, "rb").read() for f in files if os.path.dirname(f) == ver)
    return data[int(len(data) * 0.95):]


def nll(url, model, ids):
    body = {"inputs": [{"name": "input_ids", "shape": [1, len(ids)], "datatype": "INT64",
                        "data": ids}], "outputs": [{"name": "nll"}]}
    req = urllib.request.Request("%s/v2/models/%s/infer" % (url, model), json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.load(r)["outputs"][0]["data"][0]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("url")
    ap.add_argument("models", nargs="+")
    ap.add_argument("--ctx", type=int, default=64, help="the training length")
    ap.add_argument("--windows", type=int, default=16)
    a = ap.parse_args()
    text = heldout()
    lengths = [a.ctx, 4 * a.ctx, 16 * a.ctx]
    print("held-out bytes: %d; %d windows per length" % (len(text), a.windows))
    print("%-14s" % "model" + "".join("%12s" % ("L=%d (%dx)" % (L, L // a.ctx)) for L in lengths))
    for m in a.models:
        row = []
        for L in lengths:
            step = (len(text) - L) // a.windows
            vals = [nll(a.url, m, list(text[i * step:i * step + L])) for i in range(a.windows)]
            row.append(sum(vals) / len(vals))
        print("%-14s" % m + "".join("%12.4f" % v for v in row))
        sys.stdout.flush()


if __name__ == "__main__":
    main()
