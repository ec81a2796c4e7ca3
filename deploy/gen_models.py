#!/usr/bin/env python3
"""Writes the bundled example models into a model repository (default
deploy/models). Weights come from a seeded generator, so every run writes the
same bytes and the repository holds no opaque blobs. Standard library only.

    python3 deploy/gen_models.py [REPO_DIR]

Each model's config.json is written too (and committed); the safetensors
files are build outputs (.gitignore)."""
import json
import math
import os
import random
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "reference"))
import st  # noqa: E402  (tests/reference/st.py: the numpy-free safetensors writer)


def write_model(repo, name, config, tensors, version=1, version_info=None):
    mdir = os.path.join(repo, name)
    vdir = os.path.join(mdir, str(version))
    os.makedirs(vdir, exist_ok=True)
    with open(os.path.join(mdir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    st.save_lists(os.path.join(vdir, "model.safetensors"), tensors)
    if version_info is not None:
        with open(os.path.join(vdir, "version.json"), "w") as f:
            json.dump(version_info, f, indent=2)


def dense(rng, n_in, n_out, scale=None):
    s = scale if scale is not None else 1.0 / math.sqrt(n_in)
    w = [rng.uniform(-s, s) for _ in range(n_in * n_out)]
    b = [rng.uniform(-s, s) * 0.1 for _ in range(n_out)]
    return w, b


def mlp_tensors(rng, sizes, prefix=""):
    t = {}
    for i in range(len(sizes) - 1):
        w, b = dense(rng, sizes[i], sizes[i + 1])
        t["%slayers.%d.weight" % (prefix, i)] = ("F32", [sizes[i + 1], sizes[i]], w)
        t["%slayers.%d.bias" % (prefix, i)] = ("F32", [sizes[i + 1]], b)
    return t


def gen_mlp(repo):
    """demo_mlp: 16 features -> 32 (relu) -> 4 (softmax): a 4-class scorer."""
    rng = random.Random(16)
    write_model(repo, "demo_mlp", {"kind": "mlp", "activations": ["relu", "softmax"]},
                mlp_tensors(rng, [16, 32, 4]))


GENERATORS = [gen_mlp]


def main():
    repo = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "models")
    os.makedirs(repo, exist_ok=True)
    extra = os.path.join(HERE, "gen")
    if os.path.isdir(extra):  # one generator module per example family
        sys.path.insert(0, extra)
        for fn in sorted(os.listdir(extra)):
            if fn.startswith("gen_") and fn.endswith(".py"):
                mod = __import__(fn[:-3])
                GENERATORS.append(mod.generate)
    for g in GENERATORS:
        g(repo)
    print("example models written to %s" % repo)


if __name__ == "__main__":
    main()
