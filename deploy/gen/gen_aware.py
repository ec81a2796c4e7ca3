#!/usr/bin/env python3
"""AWARE-NET example: an `ensemble` of three families of three hosted `mlp`
members each, and labelled rows on which one family is clearly the one to
trust, so that a fit visibly moves the learned family weights alpha.

    generate(repo_dir)                 (called by deploy/gen_models.py)
        aware_{xception,res2net,efficientnet}_{1,2,3}: mlp 8 -> 16 (relu) -> 1
            (none: one logit per row)
        aware_ensemble: {"kind": "ensemble", "member_output": "logit", "classes": 1}
            with tier2.logits = 0 (uniform alpha = 1/3)
    python3 deploy/gen/gen_aware.py [EXAMPLES_DIR]
        rewrites deploy/examples/aware_labelled.json (200 labelled rows: an OIP
        fit/evaluate body) and deploy/examples/aware_infer.json (4 rows)

How the data is made: labels follow a fixed direction u in feature space,
label = [u.x + noise > 0]. Each xception member computes roughly k * u.x
(its hidden layer holds +u and -u so that relu(u.x) - relu(-u.x) = u.x,
each member with its own perturbation), so its logit predicts the label;
res2net and efficientnet members are random networks that know nothing of u.
Standard library only, seeded: every run writes the same bytes."""
import json
import math
import os
import random
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, os.path.join(HERE, "..", "..", "tests", "reference"))

D, H = 8, 16
FAMILIES = ["xception", "res2net", "efficientnet"]
INFORMATIVE = "xception"
N_LABELLED = 200


def direction():
    rng = random.Random(2505)  # arXiv 2505.00312
    u = [rng.gauss(0, 1) for _ in range(D)]
    norm = math.sqrt(sum(v * v for v in u))
    return [v / norm for v in u]


def informative_member(rng, u, k=1.6, jitter=0.25):
    """8 -> 16 -> 1 whose logit is about k * u.x: units 0..7 carry +u, 8..15 -u."""
    w0, b0 = [], []
    for j in range(H):
        sign = 1.0 if j < H // 2 else -1.0
        w0 += [sign * (uv + rng.gauss(0, jitter)) for uv in u]
        b0.append(rng.gauss(0, 0.05))
    w1 = [(k if j < H // 2 else -k) / (H // 2) * (1 + rng.gauss(0, jitter)) for j in range(H)]
    return {"layers.0.weight": ("F32", [H, D], w0), "layers.0.bias": ("F32", [H], b0),
            "layers.1.weight": ("F32", [1, H], w1), "layers.1.bias": ("F32", [1], [rng.gauss(0, 0.1)])}


def random_member(rng):
    import gen_models
    return gen_models.mlp_tensors(rng, [D, H, 1])


def member_name(fam, i):
    return "aware_%s_%d" % (fam, i)


def ensemble_config():
    return {"kind": "ensemble", "member_output": "logit", "classes": 1,
            "description": "AWARE-NET two-tier ensemble of 3 families x 3 hosted mlp members",
            "version_policy": {"latest": {"num_versions": 2}},
            "families": [{"name": f, "members": [{"model": member_name(f, i)} for i in (1, 2, 3)]}
                         for f in FAMILIES]}


def generate(repo):
    import gen_models
    u = direction()
    for fi, fam in enumerate(FAMILIES):
        for i in (1, 2, 3):
            rng = random.Random(1000 + 10 * fi + i)
            t = informative_member(rng, u) if fam == INFORMATIVE else random_member(rng)
            gen_models.write_model(repo, member_name(fam, i),
                                   {"kind": "mlp", "activations": ["relu", "none"]}, t)
    gen_models.write_model(repo, "aware_ensemble", ensemble_config(),
                           {"tier2.logits": ("F32", [len(FAMILIES)], [0.0] * len(FAMILIES))})


def rows(n, seed, noise=0.3):
    rng = random.Random(seed)
    u = direction()
    feats, labels = [], []
    for _ in range(n):
        x = [round(rng.gauss(0, 1), 4) for _ in range(D)]
        s = sum(a * b for a, b in zip(u, x)) + rng.gauss(0, noise)
        feats.append(x)
        labels.append(1 if s > 0 else 0)
    return feats, labels


def write_examples(out_dir):
    os.makedirs(out_dir, exist_ok=True)
    feats, labels = rows(N_LABELLED, 7)
    body = {"parameters": {"epochs": 300, "learning_rate": 0.05, "seed": 1},
            "inputs": [{"name": "features", "shape": [N_LABELLED, D], "datatype": "FP32",
                        "data": feats},
                       {"name": "labels", "shape": [N_LABELLED], "datatype": "INT32",
                        "data": labels}]}
    with open(os.path.join(out_dir, "aware_labelled.json"), "w") as f:
        json.dump(body, f, separators=(",", ":"))
        f.write("\n")
    feats, _ = rows(4, 11)
    body = {"inputs": [{"name": "features", "shape": [4, D], "datatype": "FP32", "data": feats}]}
    with open(os.path.join(out_dir, "aware_infer.json"), "w") as f:
        json.dump(body, f)
        f.write("\n")


if __name__ == "__main__":
    write_examples(sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "..", "examples"))
