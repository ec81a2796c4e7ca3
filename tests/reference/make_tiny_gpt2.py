#!/usr/bin/env python3
"""Writes a tiny random GPT-2-layout model directory for tallyd's transformer kind.

Why it exists: the C unit tests, the integration tests and the example models
need small transformer models (learned positions or RoPE, each attention
variant) whose outputs gpt2_ref.py can recompute. Runs on the standard library
alone (random.Random, no numpy), so it works wherever deploy/gen_models.py does.

    make(dir, n_layer=2, n_head=2, n_embd=32, vocab_size=50, n_positions=64,
         positions="learned"|"rope", attention="softmax"|"lssa"|"lssar",
         p=15, offset_rows=3, seed=0, version=1, rope_theta=10000) -> config dict

writes <dir>/config.json (docs/models.md's transformer form: the HF GPT-2 keys plus
kind, positions, rope_theta, attention, p, offset_rows) and
<dir>/<version>/model.safetensors with the HF GPT-2 tensor names, float32,
Conv1D weights stored [in, out]; wpe.weight only with learned positions.

Scales are chosen so the model is not degenerate: token embeddings large
enough that next-token distributions are far from uniform (entropy around half
of ln V) yet not one-hot, attention projections large enough that softmax rows
are neither flat nor hard, residual branches of the same order as the stream.

CLI: make_tiny_gpt2.py OUTDIR [--positions rope] [--attention lssar] [--n-layer N]
     [--n-head N] [--n-embd N] [--vocab-size N] [--n-positions N] [--p P]
     [--offset-rows N] [--seed S] [--version V] [--rope-theta T]
"""

import argparse
import json
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import st  # noqa: E402

# Standard deviations of the random weights (see the module comment).
STD_WTE = 0.3
STD_WPE = 0.2
STD_ATTN = 0.25       # c_attn: q and k entries of order 1 after LN
STD_ATTN_PROJ = 0.15
STD_FC = 0.2
STD_FC_PROJ = 0.1
STD_BIAS = 0.05
STD_LN = 0.1          # LN weights 1 + N(0, STD_LN), biases N(0, STD_LN / 2)


def _gauss(rng, n, std, mean=0.0):
    return [mean + std * rng.gauss(0.0, 1.0) for _ in range(n)]


def make_tensors(n_layer=2, n_head=2, n_embd=32, vocab_size=50, n_positions=64,
                 positions="learned", seed=0):
    """-> {name: ("F32", shape, flat list)}; deterministic in its arguments."""
    if n_embd % n_head:
        raise ValueError("n_embd %d is not a multiple of n_head %d" % (n_embd, n_head))
    if positions == "rope" and (n_embd // n_head) % 2:
        raise ValueError("RoPE needs an even head dimension, got %d" % (n_embd // n_head))
    if positions not in ("learned", "rope"):
        raise ValueError("positions %r: expected learned or rope" % positions)
    rng = random.Random(seed)
    E, V, P = n_embd, vocab_size, n_positions
    t = {}

    def put(name, shape, std, mean=0.0):
        n = 1
        for s in shape:
            n *= s
        t[name] = ("F32", list(shape), _gauss(rng, n, std, mean))

    put("wte.weight", [V, E], STD_WTE)
    if positions == "learned":
        put("wpe.weight", [P, E], STD_WPE)
    for i in range(n_layer):
        h = "h.%d." % i
        put(h + "ln_1.weight", [E], STD_LN, 1.0)
        put(h + "ln_1.bias", [E], STD_LN / 2)
        put(h + "attn.c_attn.weight", [E, 3 * E], STD_ATTN)
        put(h + "attn.c_attn.bias", [3 * E], STD_BIAS)
        put(h + "attn.c_proj.weight", [E, E], STD_ATTN_PROJ)
        put(h + "attn.c_proj.bias", [E], STD_BIAS)
        put(h + "ln_2.weight", [E], STD_LN, 1.0)
        put(h + "ln_2.bias", [E], STD_LN / 2)
        put(h + "mlp.c_fc.weight", [E, 4 * E], STD_FC)
        put(h + "mlp.c_fc.bias", [4 * E], STD_BIAS)
        put(h + "mlp.c_proj.weight", [4 * E, E], STD_FC_PROJ)
        put(h + "mlp.c_proj.bias", [E], STD_BIAS)
    put("ln_f.weight", [E], STD_LN, 1.0)
    put("ln_f.bias", [E], STD_LN / 2)
    return t


def make_config(n_layer=2, n_head=2, n_embd=32, vocab_size=50, n_positions=64,
                positions="learned", attention="softmax", p=15, offset_rows=3,
                rope_theta=10000):
    if attention not in ("softmax", "lssa", "lssar"):
        raise ValueError("attention %r: expected softmax, lssa or lssar" % attention)
    return {"kind": "transformer", "n_layer": n_layer, "n_head": n_head, "n_embd": n_embd,
            "vocab_size": vocab_size, "n_positions": n_positions,
            "layer_norm_epsilon": 1e-5, "positions": positions, "rope_theta": rope_theta,
            "attention": attention, "p": p, "offset_rows": offset_rows}


def make(dir, n_layer=2, n_head=2, n_embd=32, vocab_size=50, n_positions=64,
         positions="learned", attention="softmax", p=15, offset_rows=3, seed=0,
         version=1, rope_theta=10000):
    config = make_config(n_layer, n_head, n_embd, vocab_size, n_positions, positions,
                         attention, p, offset_rows, rope_theta)
    tensors = make_tensors(n_layer, n_head, n_embd, vocab_size, n_positions, positions, seed)
    vdir = os.path.join(dir, str(version))
    os.makedirs(vdir, exist_ok=True)
    st.save_lists(os.path.join(vdir, "model.safetensors"), tensors,
                  {"format": "pt", "generator": "tests/reference/make_tiny_gpt2.py",
                   "seed": str(seed)})
    with open(os.path.join(dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    return config


def main(argv=None):
    ap = argparse.ArgumentParser(description="Write a tiny random GPT-2 model directory.")
    ap.add_argument("outdir")
    ap.add_argument("--n-layer", type=int, default=2)
    ap.add_argument("--n-head", type=int, default=2)
    ap.add_argument("--n-embd", type=int, default=32)
    ap.add_argument("--vocab-size", type=int, default=50)
    ap.add_argument("--n-positions", type=int, default=64)
    ap.add_argument("--positions", choices=("learned", "rope"), default="learned")
    ap.add_argument("--attention", choices=("softmax", "lssa", "lssar"), default="softmax")
    ap.add_argument("--p", type=float, default=15.0)
    ap.add_argument("--offset-rows", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--version", type=int, default=1)
    ap.add_argument("--rope-theta", type=float, default=10000.0)
    a = ap.parse_args(argv)
    p = int(a.p) if a.p.is_integer() else a.p
    theta = int(a.rope_theta) if a.rope_theta.is_integer() else a.rope_theta
    try:
        make(a.outdir, a.n_layer, a.n_head, a.n_embd, a.vocab_size, a.n_positions,
             a.positions, a.attention, p, a.offset_rows, a.seed, a.version, theta)
    except ValueError as e:
        ap.error(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
