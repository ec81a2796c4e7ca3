#!/usr/bin/python3
"""Independent NumPy reference for the transformer model kind and its attention.

Why it exists: tallyd's C transformer (float32, streaming attention kernels, KV
cache) is checked against this file, which shares no code with it and is
written to be read, not to be fast: float64 throughout, the full attention
matrix materialised, every formula as in docs/attention.md ("The math").

Public API (import with /usr/bin/python3, which has numpy):
    load_model(model_dir, version=None) -> (weights {name: float64 array}, config dict)
    resolve_config(config) -> config with every transformer key filled in
    required_weights(config) -> the tensor names forward() reads
    attention_weights(q, k, variant, causal=True, query_offset=None, p=15,
                      offset_rows=3) -> [H, Lq, Lk]
    attend(q, k, v, variant, ...same keywords...) -> [H, Lq, dv]
        q [H, Lq, d], k [Hkv, Lk, d], v [Hkv, Lk, dv]; query head h reads
        key/value head h // (H // Hkv). Query i sits at absolute position
        query_offset + i (default Lk - Lq when causal, 0 otherwise) and sees
        keys 0..that position when causal, all keys otherwise.
    rope(x, positions, theta) -> x rotated (rotate-half, pairs (t, t + d/2))
    forward(weights, config, input_ids, attention=None, p=None, offset_rows=None)
        -> {"token_logprobs" [L-1], "nll", "next_token_logits" [V], "logits" [L, V]}
        nll is the mean of -token_logprobs; 0.0 when L = 1 (nothing predicted).

CLI: gpt2_ref.py MODEL_DIR --ids 1,2,3 [--ids 4,5,6 ...] [--attention lssar]
     [--p 15] [--offset-rows 3] [--version N] [--logits]
prints JSON {"token_logprobs", "nll", "next_token_logits"[, "logits"]}; with several
--ids (all the same length) each field gains a leading batch axis, as in the
daemon's infer outputs.
"""

import argparse
import json
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import st  # noqa: E402

EPS = 1e-8          # the eps of LSSA's and LSSAR's normalisations (part of the definition)
QK_NORM_FLOOR = 1e-12
VARIANTS = ("softmax", "lssa", "lssar")


def resolve_config(config):
    """Fill in the transformer keys a config.json may leave out (docs/api.md's defaults)."""
    c = dict(config)
    for key in ("n_layer", "n_head", "n_embd", "vocab_size", "n_positions"):
        if key not in c:
            raise ValueError("config.json: missing %r" % key)
    c.setdefault("layer_norm_epsilon", 1e-5)
    c.setdefault("positions", "learned")
    c.setdefault("rope_theta", 10000.0)
    c.setdefault("attention", "softmax")
    c.setdefault("p", 15)
    c.setdefault("offset_rows", 3)
    if c["positions"] not in ("learned", "rope"):
        raise ValueError("config.json: positions %r: expected learned or rope" % c["positions"])
    if c["attention"] not in VARIANTS:
        raise ValueError("config.json: attention %r: expected one of %s"
                         % (c["attention"], ", ".join(VARIANTS)))
    if c["n_embd"] % c["n_head"]:
        raise ValueError("config.json: n_embd %d is not a multiple of n_head %d"
                         % (c["n_embd"], c["n_head"]))
    if c["positions"] == "rope" and (c["n_embd"] // c["n_head"]) % 2:
        raise ValueError("config.json: RoPE needs an even head dimension")
    return c


def load_model(model_dir, version=None):
    """Read <dir>/config.json and <dir>/<version>/model.safetensors (newest
    version when none is named; a dir holding model.safetensors itself, the HF
    layout, also works). Weights come back as float64; an HF 'transformer.'
    prefix is dropped."""
    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    if version is None:
        versions = [int(n) for n in os.listdir(model_dir)
                    if n.isdigit() and not n.startswith("0")
                    and os.path.isfile(os.path.join(model_dir, n, "model.safetensors"))]
        if versions:
            path = os.path.join(model_dir, str(max(versions)), "model.safetensors")
        else:
            path = os.path.join(model_dir, "model.safetensors")
    else:
        path = os.path.join(model_dir, str(version), "model.safetensors")
    weights = {}
    for name, arr in st.load(path).items():
        if name.startswith("transformer."):
            name = name[len("transformer."):]
        weights[name] = arr.astype(np.float64)
    return weights, config


# ---------------------------------------------------------------- pieces

def layer_norm(x, w, b, eps):
    mu = x.mean(axis=-1, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)  # biased, as torch
    return (x - mu) / np.sqrt(var + eps) * w + b


def gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def softplus(x):
    return np.maximum(x, 0.0) + np.log1p(np.exp(-np.abs(x)))


def rope(x, positions, theta):
    """x [..., L, d]; positions [L] absolute. Pair m is (m, m + d/2), rotated by
    positions * theta^(-2m/d)."""
    d = x.shape[-1]
    half = d // 2
    m = np.arange(half, dtype=np.float64)
    ang = np.asarray(positions, dtype=np.float64)[:, None] * theta ** (-2.0 * m / d)
    cos, sin = np.cos(ang), np.sin(ang)
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _positions_and_mask(Lq, Lk, causal, query_offset):
    if query_offset is None:
        query_offset = Lk - Lq if causal else 0
    if query_offset < 0 or (causal and query_offset + Lq > Lk):
        raise ValueError("query_offset %d with %d queries and %d keys: causal queries "
                         "must sit at positions 0..Lk-1" % (query_offset, Lq, Lk))
    qpos = query_offset + np.arange(Lq)
    if causal:
        visible = np.arange(Lk)[None, :] <= qpos[:, None]
        n_vis = (qpos + 1).astype(np.float64)
    else:
        visible = np.ones((Lq, Lk), dtype=bool)
        n_vis = np.full(Lq, float(Lk))
    return qpos, visible, n_vis


def _expand_kv(k, H):
    Hkv = k.shape[0]
    if H % Hkv:
        raise ValueError("%d query heads do not share %d key/value heads evenly" % (H, Hkv))
    return np.repeat(k, H // Hkv, axis=0)


def _lssar_weights(A, n_vis, qpos, p, offset_rows):
    """b = ReLU(N*A - O)^p, W = b / (sum b + eps); direct in float64, with the
    docs/attention.md's exact rescaling by the row maximum only where x^p would overflow."""
    O = np.where(qpos < offset_rows, 0.0, 1.0)
    x = np.maximum(n_vis[:, None] * A - O[:, None], 0.0)   # masked keys: A = 0 -> x = 0
    W = np.zeros_like(x)
    for idx in np.ndindex(*x.shape[:-1]):
        row = x[idx]
        with np.errstate(over="ignore", under="ignore"):
            b = row ** p
            total = b.sum()
        if np.isfinite(total):
            W[idx] = b / (total + EPS)
            continue
        xmax = row.max()
        y = row / xmax
        with np.errstate(under="ignore"):
            yp = y ** p
        W[idx] = yp / (yp.sum() + math.exp(math.log(EPS) - p * math.log(xmax)))
    return W


def attention_weights(q, k, variant, causal=True, query_offset=None, p=15, offset_rows=3):
    """The [H, Lq, Lk] matrix that multiplies the values."""
    if variant not in VARIANTS:
        raise ValueError("attention %r: expected one of %s" % (variant, ", ".join(VARIANTS)))
    q = np.asarray(q, dtype=np.float64)
    k = _expand_kv(np.asarray(k, dtype=np.float64), q.shape[0])
    H, Lq, d = q.shape
    Lk = k.shape[1]
    qpos, visible, n_vis = _positions_and_mask(Lq, Lk, causal, query_offset)
    if variant == "softmax":
        s = q @ k.transpose(0, 2, 1) / math.sqrt(d)
        s = np.where(visible, s, -np.inf)
        s = s - s.max(axis=-1, keepdims=True)
        e = np.exp(s)
        return e / e.sum(axis=-1, keepdims=True)
    qn = q / np.maximum(np.linalg.norm(q, axis=-1, keepdims=True), QK_NORM_FLOOR)
    kn = k / np.maximum(np.linalg.norm(k, axis=-1, keepdims=True), QK_NORM_FLOOR)
    s = math.log(d) * np.log(n_vis)[:, None] * (qn @ kn.transpose(0, 2, 1))
    a = np.where(visible, softplus(s), 0.0)
    A = a / (a.sum(axis=-1, keepdims=True) + EPS)
    if variant == "lssa":
        return A
    return _lssar_weights(A, n_vis, qpos, p, offset_rows)


def attend(q, k, v, variant, causal=True, query_offset=None, p=15, offset_rows=3):
    W = attention_weights(q, k, variant, causal, query_offset, p, offset_rows)
    v = _expand_kv(np.asarray(v, dtype=np.float64), W.shape[0])
    return W @ v


# ---------------------------------------------------------------- the model

def required_weights(config):
    c = resolve_config(config)
    names = ["wte.weight", "ln_f.weight", "ln_f.bias"]
    if c["positions"] == "learned":
        names.append("wpe.weight")
    for i in range(c["n_layer"]):
        names += ["h.%d.%s.%s" % (i, part, kind) for part in
                  ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj")
                  for kind in ("weight", "bias")]
    return names


def forward(weights, config, input_ids, attention=None, p=None, offset_rows=None):
    c = resolve_config(config)
    variant = attention if attention is not None else c["attention"]
    p = p if p is not None else c["p"]
    offset_rows = offset_rows if offset_rows is not None else c["offset_rows"]
    E, H, V = c["n_embd"], c["n_head"], c["vocab_size"]
    d = E // H
    eps = float(c["layer_norm_epsilon"])
    ids = [int(t) for t in input_ids]
    L = len(ids)
    if L < 1:
        raise ValueError("input_ids: at least one token is needed")
    bad = [t for t in ids if not 0 <= t < V]
    if bad:
        raise ValueError("input_ids: token %d outside the vocabulary [0, %d)" % (bad[0], V))
    missing = [n for n in required_weights(c) if n not in weights]
    if missing:
        raise ValueError("weights: %d tensor(s) missing, first %r" % (len(missing), missing[0]))
    w = {n: np.asarray(a, dtype=np.float64) for n, a in weights.items()}
    pos = np.arange(L)

    x = w["wte.weight"][ids]
    if c["positions"] == "learned":
        if L > c["n_positions"]:
            raise ValueError("input_ids: %d tokens, learned positions stop at n_positions %d"
                             % (L, c["n_positions"]))
        x = x + w["wpe.weight"][:L]
    for i in range(c["n_layer"]):
        pre = "h.%d." % i
        a = layer_norm(x, w[pre + "ln_1.weight"], w[pre + "ln_1.bias"], eps)
        qkv = a @ w[pre + "attn.c_attn.weight"] + w[pre + "attn.c_attn.bias"]
        q, k, v = (qkv[:, j * E:(j + 1) * E].reshape(L, H, d).transpose(1, 0, 2)
                   for j in range(3))
        if c["positions"] == "rope":
            q = rope(q, pos, float(c["rope_theta"]))
            k = rope(k, pos, float(c["rope_theta"]))
        o = attend(q, k, v, variant, causal=True, query_offset=0, p=p, offset_rows=offset_rows)
        o = o.transpose(1, 0, 2).reshape(L, E)
        x = x + o @ w[pre + "attn.c_proj.weight"] + w[pre + "attn.c_proj.bias"]
        m = layer_norm(x, w[pre + "ln_2.weight"], w[pre + "ln_2.bias"], eps)
        hdn = gelu_tanh(m @ w[pre + "mlp.c_fc.weight"] + w[pre + "mlp.c_fc.bias"])
        x = x + hdn @ w[pre + "mlp.c_proj.weight"] + w[pre + "mlp.c_proj.bias"]
    x = layer_norm(x, w["ln_f.weight"], w["ln_f.bias"], eps)
    logits = x @ w["wte.weight"].T

    mx = logits.max(axis=-1, keepdims=True)
    logprobs = logits - (mx + np.log(np.exp(logits - mx).sum(axis=-1, keepdims=True)))
    token_logprobs = np.array([logprobs[t, ids[t + 1]] for t in range(L - 1)])
    nll = float(-token_logprobs.mean()) if L > 1 else 0.0
    return {"token_logprobs": token_logprobs, "nll": nll,
            "next_token_logits": logits[-1].copy(), "logits": logits}


# ---------------------------------------------------------------- CLI

def _number(s):
    v = float(s)
    return int(v) if v.is_integer() else v


def main(argv=None):
    ap = argparse.ArgumentParser(description="NumPy reference forward pass of a tallyd "
                                 "transformer model directory; prints JSON.")
    ap.add_argument("model_dir")
    ap.add_argument("--ids", action="append", required=True,
                    help="comma-separated token ids; repeat for a batch")
    ap.add_argument("--attention", choices=VARIANTS)
    ap.add_argument("--p", type=_number)
    ap.add_argument("--offset-rows", type=int)
    ap.add_argument("--version", type=int)
    ap.add_argument("--logits", action="store_true", help="also print logits [L, V]")
    args = ap.parse_args(argv)
    weights, config = load_model(args.model_dir, args.version)
    results = []
    for s in args.ids:
        ids = [int(t) for t in s.split(",") if t.strip()]
        r = forward(weights, config, ids, args.attention, args.p, args.offset_rows)
        out = {"token_logprobs": r["token_logprobs"].tolist(), "nll": r["nll"],
               "next_token_logits": r["next_token_logits"].tolist()}
        if args.logits:
            out["logits"] = r["logits"].tolist()
        results.append(out)
    if len(results) == 1:
        print(json.dumps(results[0]))
    else:
        if len({len(r["token_logprobs"]) for r in results}) != 1:
            ap.error("a batch needs every --ids of the same length")
        print(json.dumps({key: [r[key] for r in results] for key in results[0]}))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, OSError, KeyError) as e:
        print("gpt2_ref: %s" % (e,), file=sys.stderr)
        sys.exit(2)
