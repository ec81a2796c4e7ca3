"""Example quantile-aggregation model `quantile_demo` and its request files.

The data follow a heteroscedastic rule over D = 4 features x ~ U(-1, 1):

    y = m(x) + s(x) * eps,   m(x) = 1.5 x0 + 0.5 x1 + relu(x1),
                             s(x) = 0.2 + 0.8 |x2|,   eps ~ N(0, 1)

and four base models predict the K = 9 quantiles 0.1, ..., 0.9, each wrong in
a different way, so that aggregation has something to learn:

    qbase_a  (mlp)     a constant spread 0.6, centre shifted by +0.5 x3
    qbase_b  (mlp)     the right spread, centre shifted by +1.0 x3
    qbase_c  (mlp)     the spread 1.3 s(x), centre shifted by -1.0 x3
    lin      (linear)  1.5 x0 + x1 + z_tau 0.6, stored in quantile_demo's own weights

qbase_b and qbase_c err in opposite directions, so a blend beats every
single base: the uniform start (no aggregator weights) by about 11 % in
pinball loss, a fitted medium aggregator by about 14 %, close to the true
quantiles (the noise leaves no more).
The bases are exact small relu networks (no training needed): hidden units
pass x0, x1, x3 through relu(x + 2) and form relu(x1), relu(x2), relu(-x2).

generate() writes the models into a repository (deploy/gen_models.py calls
it); run with --examples it writes deploy/examples/quantile_{fit,calibrate,
infer}.json, the request bodies docs/quantile.md uses. Standard library only."""
import json
import math
import os
import random
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
import gen_models  # noqa: E402

LEVELS = [round(0.1 * i, 1) for i in range(1, 10)]
D = 4
# Phi^-1(tau), tau = 0.1 .. 0.9 (standard normal quantiles)
Z = [-1.2815515655446004, -0.8416212335729143, -0.5244005127080407, -0.2533471031357997, 0.0,
     0.2533471031357997, 0.5244005127080407, 0.8416212335729143, 1.2815515655446004]

EXAMPLES = os.path.join(HERE, "..", "examples")

# hidden units of the base networks: (input weights [4], bias)
HIDDEN = [([1, 0, 0, 0], 2.0),   # h0 = x0 + 2
          ([0, 1, 0, 0], 2.0),   # h1 = x1 + 2
          ([0, 1, 0, 0], 0.0),   # h2 = relu(x1)
          ([0, 0, 1, 0], 0.0),   # h3 = relu(x2)
          ([0, 0, -1, 0], 0.0),  # h4 = relu(-x2)
          ([0, 0, 0, 1], 2.0)]   # h5 = x3 + 2


def truth(x):
    m = 1.5 * x[0] + 0.5 * x[1] + max(x[1], 0.0)
    s = 0.2 + 0.8 * abs(x[2])
    return m, s


def base_net(shift3, s0, s1):
    """Weights of a relu net whose outputs are q_k = m(x) + shift3 x3 +
    z_k (s0 + s1 |x2|)."""
    w0, b0 = [], []
    for w, b in HIDDEN:
        w0 += [float(v) for v in w]
        b0.append(b)
    w1, b1 = [], []
    for z in Z:
        # m = 1.5 (h0 - 2) + 0.5 (h1 - 2) + h2; shift3 x3 = shift3 (h5 - 2)
        w1 += [1.5, 0.5, 1.0, z * s1, z * s1, shift3]
        b1.append(-3.0 - 1.0 - 2.0 * shift3 + z * s0)
    H = len(HIDDEN)
    return {"layers.0.weight": ("F32", [H, D], w0), "layers.0.bias": ("F32", [H], b0),
            "layers.1.weight": ("F32", [len(Z), H], w1), "layers.1.bias": ("F32", [len(Z)], b1)}


BASES = {"qbase_a": (0.5, 0.6, 0.0), "qbase_b": (1.0, 0.2, 0.8), "qbase_c": (-1.0, 0.26, 1.04)}


def base_quantiles(name, x):
    """The base's K quantiles at x, in Python (what the daemon computes)."""
    m, _ = truth(x)
    if name == "lin":
        return [1.5 * x[0] + x[1] + z * 0.6 for z in Z]
    shift3, s0, s1 = BASES[name]
    return [m + shift3 * x[3] + z * (s0 + s1 * abs(x[2])) for z in Z]


def linear_base():
    w, b = [], []
    for z in Z:
        w += [1.5, 1.0, 0.0, 0.0]
        b.append(0.6 * z)
    return {"bases.lin.weight": ("F32", [len(Z), D], w), "bases.lin.bias": ("F32", [len(Z)], b)}


def rows(n, seed):
    rng = random.Random(seed)
    xs, ys = [], []
    for _ in range(n):
        x = [round(rng.uniform(-1, 1), 4) for _ in range(D)]
        m, s = truth(x)
        xs.append(x)
        ys.append(round(m + s * rng.gauss(0.0, 1.0), 4))
    return xs, ys


def config():
    return {"kind": "quantile_ensemble", "levels": LEVELS,
            "bases": [{"model": "qbase_a"}, {"model": "qbase_b"}, {"model": "qbase_c"},
                      {"linear": "lin"}],
            "features": D,
            "aggregator": {"granularity": "medium", "scope": "global", "simplex": True},
            "monotone": "isotonic"}


def request(xs, ys=None, parameters=None):
    body = {"inputs": [{"name": "features", "shape": [len(xs), D], "datatype": "FP32",
                        "data": [v for x in xs for v in x]}]}
    if ys is not None:
        body["inputs"].append({"name": "targets", "shape": [len(ys)], "datatype": "FP32",
                               "data": ys})
    if parameters:
        body["parameters"] = parameters
    return body


def write_examples(folder=EXAMPLES):
    os.makedirs(folder, exist_ok=True)
    files = {
        "quantile_fit.json": request(*rows(2000, 1), parameters={
            "epochs": 60, "learning_rate": 0.05, "batch_size": 64, "validation_fraction": 0.2,
            "patience": 10, "seed": 1}),
        "quantile_calibrate.json": request(*rows(600, 2), parameters={"method": "cqr"}),
        "quantile_infer.json": request(rows(3, 3)[0]),
    }
    for name, body in files.items():
        with open(os.path.join(folder, name), "w") as f:
            json.dump(body, f, separators=(",", ":"))
            f.write("\n")


def generate(repo):
    for name, (shift3, s0, s1) in BASES.items():
        gen_models.write_model(repo, name, {"kind": "mlp", "activations": ["relu", "none"]},
                               base_net(shift3, s0, s1))
    # no aggregator tensors: the medium global aggregator starts uniform
    gen_models.write_model(repo, "quantile_demo", config(), linear_base())


if __name__ == "__main__":
    # `python3 deploy/gen/gen_quantile.py --examples` rewrites the committed
    # request files (the same bytes each time: the data are seeded)
    import sys
    if sys.argv[1:] == ["--examples"]:
        write_examples()
    else:
        generate(sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "..", "models"))
