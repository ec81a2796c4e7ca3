#!/usr/bin/python3
"""Self-check of the reference implementation that tallyd's transformer is held to.

Why it exists: gpt2_ref.py is what the C code is compared against, so it must
itself be checked by something other than the C code: explicit-loop versions
of each attention variant (scalar math, docs/attention.md's overflow guard used always),
invariants (RoPE at position 0 is the identity, uniform LSSAR rows past the
offset are zero, distributions sum to one, a prefix's outputs are a prefix of
the whole's) and a safetensors round trip. Runs in a few seconds and prints
"tally: N passed, N failed, 0 skipped" last.

Run: /usr/bin/python3 tests/reference/test_reference_selfcheck.py
"""

import json
import math
import os
import random
import shutil
import struct
import subprocess
import sys
import tempfile
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

try:
    import numpy as np
except ImportError:  # the python3 on PATH may lack numpy; Debian's has it
    if os.path.exists("/usr/bin/python3") and os.path.realpath(sys.executable) != \
            os.path.realpath("/usr/bin/python3"):
        os.execv("/usr/bin/python3", ["/usr/bin/python3"] + sys.argv)
    raise

import gpt2_ref as ref  # noqa: E402
import make_tiny_gpt2  # noqa: E402
import st  # noqa: E402

TESTS = []


def test(fn):
    TESTS.append(fn)
    return fn


def close(a, b, tol=1e-12, what=""):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, "%s: shapes %s vs %s" % (what, a.shape, b.shape)
    err = np.max(np.abs(a - b) / np.maximum(1.0, np.abs(b))) if a.size else 0.0
    assert err <= tol, "%s: max relative difference %.3g > %.3g" % (what, err, tol)


# ---------------------------------------------------------------- explicit loops

def loop_attend(q, k, v, variant, causal=True, query_offset=None, p=15, offset_rows=3):
    """Scalar, one (head, query) at a time, docs/attention.md's formulas read off literally;
    LSSAR always through the max-rescaled guard form of section 3."""
    H, Lq, d = len(q), len(q[0]), len(q[0][0])
    Hkv, Lk, dv = len(k), len(k[0]), len(v[0][0])
    if query_offset is None:
        query_offset = Lk - Lq if causal else 0
    out = np.zeros((H, Lq, dv))
    for h in range(H):
        g = h // (H // Hkv)
        for i in range(Lq):
            pos = query_offset + i
            keys = range(pos + 1) if causal else range(Lk)
            qi = [float(x) for x in q[h][i]]
            if variant == "softmax":
                s = {j: sum(qi[t] * k[g][j][t] for t in range(d)) / math.sqrt(d) for j in keys}
                m = max(s.values())
                e = {j: math.exp(s[j] - m) for j in keys}
                z = sum(e.values())
                w = {j: e[j] / z for j in keys}
            else:
                n = len(keys)
                qn = max(math.sqrt(sum(x * x for x in qi)), 1e-12)
                a = {}
                for j in keys:
                    kj = [float(x) for x in k[g][j]]
                    kn = max(math.sqrt(sum(x * x for x in kj)), 1e-12)
                    cos = sum(qi[t] * kj[t] for t in range(d)) / (qn * kn)
                    x = math.log(d) * math.log(n) * cos
                    a[j] = max(x, 0.0) + math.log1p(math.exp(-abs(x)))
                z = sum(a.values())
                w = {j: a[j] / (z + 1e-8) for j in keys}
                if variant == "lssar":
                    o = 0.0 if pos < offset_rows else 1.0
                    xs = {j: max(n * w[j] - o, 0.0) for j in keys}
                    xmax = max(xs.values())
                    if xmax == 0.0:
                        w = {j: 0.0 for j in keys}
                    else:
                        yp = {j: (xs[j] / xmax) ** p for j in keys}
                        lg = math.log(1e-8) - p * math.log(xmax)
                        extra = math.exp(lg) if lg < 700 else math.inf
                        w = {j: yp[j] / (sum(yp.values()) + extra) for j in keys}
            for j in keys:
                out[h, i] += w[j] * np.asarray(v[g][j], dtype=np.float64)
    return out


def loop_forward(path, config, ids):
    """The whole model in plain Python lists, from the safetensors file read without
    numpy; attention through loop_attend. Returns logits [L][V]."""
    W = {n: (shape, vals) for n, (_, shape, vals) in st.load_lists(path).items()}
    E, H, V = config["n_embd"], config["n_head"], config["vocab_size"]
    d, L, eps = E // H, len(ids), config["layer_norm_epsilon"]

    def mat(name):  # [in, out] flat -> rows
        (n_in, n_out), vals = W[name]
        return [vals[r * n_out:(r + 1) * n_out] for r in range(n_in)]

    def linear(vec, name):
        rows, bias = mat(name + ".weight"), W[name + ".bias"][1]
        return [bias[c] + sum(vec[r] * rows[r][c] for r in range(len(vec)))
                for c in range(len(bias))]

    def ln(vec, name):
        mu = sum(vec) / len(vec)
        var = sum((x - mu) ** 2 for x in vec) / len(vec)
        g, b = W[name + ".weight"][1], W[name + ".bias"][1]
        return [(x - mu) / math.sqrt(var + eps) * g[i] + b[i] for i, x in enumerate(vec)]

    def rot(vec, t):
        out = list(vec)
        for m in range(d // 2):
            ang = t * config["rope_theta"] ** (-2.0 * m / d)
            a, b = vec[m], vec[m + d // 2]
            out[m] = a * math.cos(ang) - b * math.sin(ang)
            out[m + d // 2] = b * math.cos(ang) + a * math.sin(ang)
        return out

    wte = mat("wte.weight")
    xs = [list(wte[i]) for i in ids]
    if config["positions"] == "learned":
        wpe = mat("wpe.weight")
        xs = [[x + wpe[t][e] for e, x in enumerate(xs[t])] for t in range(L)]
    for layer in range(config["n_layer"]):
        pre = "h.%d." % layer
        qkv = [linear(ln(x, pre + "ln_1"), pre + "attn.c_attn") for x in xs]
        heads = [[[row[part * E + h * d:part * E + (h + 1) * d] for row in qkv]
                  for h in range(H)] for part in range(3)]
        if config["positions"] == "rope":
            for part in (0, 1):
                heads[part] = [[rot(vec, t) for t, vec in enumerate(hd)] for hd in heads[part]]
        o = loop_attend(heads[0], heads[1], heads[2], config["attention"], True, 0,
                        config["p"], config["offset_rows"])
        merged = [[o[e // d][t][e % d] for e in range(E)] for t in range(L)]
        xs = [[x + y for x, y in zip(xs[t], linear(merged[t], pre + "attn.c_proj"))]
              for t in range(L)]
        for t in range(L):
            hid = linear(ln(xs[t], pre + "ln_2"), pre + "mlp.c_fc")
            hid = [0.5 * u * (1 + math.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u ** 3)))
                   for u in hid]
            xs[t] = [x + y for x, y in zip(xs[t], linear(hid, pre + "mlp.c_proj"))]
    xs = [ln(x, "ln_f") for x in xs]
    return [[sum(x[e] * wte[v][e] for e in range(E)) for v in range(V)] for x in xs]


def random_qkv(rng, H, Hkv, Lq, Lk, d, dv, scale=1.0):
    return (rng.normal(size=(H, Lq, d)) * scale, rng.normal(size=(Hkv, Lk, d)) * scale,
            rng.normal(size=(Hkv, Lk, dv)))


# ---------------------------------------------------------------- safetensors

@test
def st_round_trip_numpy_and_lists():
    tmp = tempfile.mkdtemp()
    try:
        rng = np.random.default_rng(0)
        t = {"z.w": rng.normal(size=(3, 5)).astype(np.float32),
             "a.d": rng.normal(size=(2,)),
             "i64": np.array([-3, 2**40], dtype=np.int64),
             "u8": np.array([1, 2, 3], dtype=np.uint8),
             "half": np.array([0.5, -2.0], dtype=np.float16)}
        path = os.path.join(tmp, "m.safetensors")
        st.save(path, t, {"k": "v"})
        back = st.load(path)
        assert sorted(back) == sorted(t)
        for name in t:
            assert back[name].dtype == t[name].dtype, name
            assert np.array_equal(back[name], t[name]), name
        assert st.read_metadata(path) == {"k": "v"}
        blob = open(path, "rb").read()
        (n,) = struct.unpack("<Q", blob[:8])
        assert n % 8 == 0 and blob[8 + n - 1:8 + n] in (b" ", b"}")
        header, raw = st.load_raw(path)
        spans = sorted(info["data_offsets"] for info in header.values())
        assert spans[0][0] == 0 and spans[-1][1] == len(blob) - 8 - n
        for (b0, e0), (b1, _) in zip(spans, spans[1:]):
            assert e0 == b1, "tensors must be contiguous"
        for info in header.values():  # each tensor aligned to its element size
            assert info["data_offsets"][0] % st.DTYPES[info["dtype"]][1] == 0
        # the numpy-free writer gives the same bytes as the numpy one
        path2 = os.path.join(tmp, "l.safetensors")
        st.save_lists(path2, {"z.w": ("F32", [3, 5], t["z.w"].reshape(-1).tolist())})
        path3 = os.path.join(tmp, "n.safetensors")
        st.save(path3, {"z.w": t["z.w"]})
        assert open(path2, "rb").read() == open(path3, "rb").read()
        lists = st.load_lists(path2)
        assert lists["z.w"][0] == "F32" and lists["z.w"][1] == [3, 5]
        assert lists["z.w"][2] == t["z.w"].reshape(-1).tolist()
    finally:
        shutil.rmtree(tmp)


@test
def st_refuses_damaged_files():
    tmp = tempfile.mkdtemp()
    try:
        path = os.path.join(tmp, "m.safetensors")
        st.save_lists(path, {"w": ("F32", [4], [1.0, 2.0, 3.0, 4.0])})
        blob = open(path, "rb").read()
        for bad in (blob[:5], blob[:-1], struct.pack("<Q", 1 << 40) + blob[8:]):
            open(path, "wb").write(bad)
            try:
                st.load(path)
            except ValueError:
                continue
            raise AssertionError("a damaged file was accepted")
        try:
            st.save_lists(path, {"w": ("F32", [2, 2], [1.0, 2.0, 3.0])})
        except ValueError:
            pass
        else:
            raise AssertionError("a shape/length mismatch was accepted")
    finally:
        shutil.rmtree(tmp)


# ---------------------------------------------------------------- attention

@test
def softmax_matches_loops():
    rng = np.random.default_rng(1)
    q, k, v = random_qkv(rng, 4, 2, 5, 7, 6, 3)
    for causal in (True, False):
        close(ref.attend(q, k, v, "softmax", causal), loop_attend(q, k, v, "softmax", causal),
              1e-12, "softmax causal=%s" % causal)
    close(ref.attend(q, k, v, "softmax", True, query_offset=1),
          loop_attend(q, k, v, "softmax", True, query_offset=1), 1e-12, "softmax offset 1")


@test
def lssa_matches_loops():
    rng = np.random.default_rng(2)
    q, k, v = random_qkv(rng, 2, 2, 9, 9, 8, 4, scale=3.0)
    for causal in (True, False):
        close(ref.attend(q, k, v, "lssa", causal), loop_attend(q, k, v, "lssa", causal),
              1e-12, "lssa causal=%s" % causal)
    q2, k2, v2 = random_qkv(rng, 6, 3, 4, 10, 4, 5)
    close(ref.attend(q2, k2, v2, "lssa"), loop_attend(q2, k2, v2, "lssa"), 1e-12, "lssa gqa")


@test
def lssar_matches_loops_and_guard():
    rng = np.random.default_rng(3)
    q, k, v = random_qkv(rng, 2, 1, 12, 12, 8, 3, scale=2.0)
    for p, offset in ((15, 3), (3, 3), (15, 0), (2.5, 1)):
        for causal in (True, False):
            close(ref.attend(q, k, v, "lssar", causal, p=p, offset_rows=offset),
                  loop_attend(q, k, v, "lssar", causal, p=p, offset_rows=offset),
                  1e-10, "lssar p=%s offset=%d causal=%s" % (p, offset, causal))
    # p so large that x^p overflows float64: the reference falls back to the guard
    with np.errstate(over="ignore"):
        assert not np.isfinite(float(np.float64(11.0) ** 400))
    close(ref.attend(q, k, v, "lssar", p=400), loop_attend(q, k, v, "lssar", p=400),
          1e-10, "lssar p=400")


@test
def lssar_uniform_rows_past_offset_are_zero():
    rng = np.random.default_rng(4)
    L, d = 8, 4
    q = rng.normal(size=(1, L, d))
    k = np.tile(rng.normal(size=(1, 1, d)), (1, L, 1))   # every key the same: uniform rows
    v = rng.normal(size=(1, L, 3))
    out = ref.attend(q, k, v, "lssar", p=15, offset_rows=3)
    assert np.all(out[0, 3:] == 0.0), "rows past the third must be exactly zero"
    assert np.all(np.abs(out[0, :3]).sum(axis=-1) > 0.1), "the first three rows are kept"
    # the first three rows: W_ij = A_ij^p / (sum + eps) with A uniform -> the mean of v
    close(out[0, 2], v[0, :3].mean(axis=0), 1e-6, "row 3 is the mean")
    out0 = ref.attend(q, k, v, "lssar", p=15, offset_rows=0)
    assert np.all(out0[0] == 0.0), "with no offset rows every uniform row is zero"


@test
def lssa_first_position_and_score_bound():
    rng = np.random.default_rng(5)
    q, k, v = random_qkv(rng, 1, 1, 6, 6, 16, 2)
    out = ref.attend(q, k, v, "lssa")
    # N = 1: s = 0, a = ln 2, A = ln2 / (ln2 + eps)
    close(out[0, 0], v[0, 0] * math.log(2) / (math.log(2) + 1e-8), 1e-14, "position 0")
    W = ref.attention_weights(q, k, "lssa")
    assert np.all(W >= 0) and np.all(W.sum(-1) <= 1.0) and np.all(W.sum(-1) > 1 - 1e-7)
    assert np.all(np.triu(W[0], 1) == 0.0), "causal mask"


@test
def chunked_attention_equals_whole():
    rng = np.random.default_rng(6)
    q, k, v = random_qkv(rng, 2, 2, 10, 10, 8, 4)
    for variant in ref.VARIANTS:
        whole = ref.attend(q, k, v, variant)
        for start, stop in ((0, 4), (4, 7), (7, 10)):
            part = ref.attend(q[:, start:stop], k[:, :stop], v[:, :stop], variant,
                              query_offset=start)
            close(part, whole[:, start:stop], 1e-13, "%s chunk %d:%d" % (variant, start, stop))


# ---------------------------------------------------------------- RoPE, pieces

@test
def rope_identity_at_zero_and_relative():
    rng = np.random.default_rng(7)
    d = 8
    x = rng.normal(size=(3, 5, d))
    y = ref.rope(x, np.arange(5), 10000.0)
    close(y[:, 0], x[:, 0], 0.0, "position 0")
    close(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), 1e-13, "norms kept")
    # rotate-half pairs: position 1, pair m = 0 turns (x0, x4) by 1 radian
    c, s = math.cos(1.0), math.sin(1.0)
    close(y[0, 1, [0, 4]], [x[0, 1, 0] * c - x[0, 1, 4] * s, x[0, 1, 4] * c + x[0, 1, 0] * s],
          1e-14, "pair (0, d/2)")
    # pair m = 1 at position 3: angle 3 * 10000^(-2/8)
    a = 3 * 10000.0 ** (-2.0 / 8)
    close(y[1, 3, [1, 5]], [x[1, 3, 1] * math.cos(a) - x[1, 3, 5] * math.sin(a),
                            x[1, 3, 5] * math.cos(a) + x[1, 3, 1] * math.sin(a)], 1e-14, "pair 1")
    # dot products depend on the position difference only
    qv, kv = rng.normal(size=d), rng.normal(size=d)
    dots = []
    for m, n in ((3, 1), (7, 5), (12, 10)):
        qr = ref.rope(qv[None, :].repeat(13, 0), np.arange(13), 10000.0)[m]
        kr = ref.rope(kv[None, :].repeat(13, 0), np.arange(13), 10000.0)[n]
        dots.append(qr @ kr)
    close(dots, [dots[0]] * 3, 1e-12, "relative positions")


@test
def gelu_and_layer_norm_values():
    xs = [0.0, 1.0, -1.0, 3.0]
    g = ref.gelu_tanh(np.array(xs))
    close(g, [0.0, 0.8411919906082768, -0.15880800939172324, 2.996362607918227], 1e-14, "gelu")
    # the tanh form stays within 1e-3 of the exact erf form
    close(g, [0.5 * x * (1 + math.erf(x / math.sqrt(2))) for x in xs], 1e-3, "gelu vs erf")
    x = np.array([[1.0, 2.0, 3.0, 6.0]])
    y = ref.layer_norm(x, np.ones(4), np.zeros(4), 0.0)
    close(y, (x - 3.0) / math.sqrt(3.5), 1e-14, "layer norm, biased variance")
    close(ref.softplus(np.array([-800.0, 0.0, 800.0, 2.0])),
          [0.0, math.log(2), 800.0, math.log1p(math.exp(2.0))], 1e-15, "softplus")


# ---------------------------------------------------------------- the model

MODELS = {}


def model(positions, attention):
    key = (positions, attention)
    if key not in MODELS:
        d = os.path.join(TMP, "%s-%s" % key)
        make_tiny_gpt2.make(d, positions=positions, attention=attention, seed=11)
        MODELS[key] = ref.load_model(d) + (d,)
    return MODELS[key]


IDS = [int(x) for x in random.Random(5).choices(range(50), k=20)]


@test
def generator_files_and_determinism():
    tmp = tempfile.mkdtemp()
    try:
        a, b, c = (os.path.join(tmp, n) for n in "abc")
        make_tiny_gpt2.make(a, positions="rope", attention="lssar", seed=3)
        make_tiny_gpt2.make(b, positions="rope", attention="lssar", seed=3)
        make_tiny_gpt2.make(c, positions="rope", attention="lssar", seed=4)
        fa = open(os.path.join(a, "1", "model.safetensors"), "rb").read()
        assert fa == open(os.path.join(b, "1", "model.safetensors"), "rb").read()
        assert fa != open(os.path.join(c, "1", "model.safetensors"), "rb").read()
        cfg = json.load(open(os.path.join(a, "config.json")))
        assert cfg == {"kind": "transformer", "n_layer": 2, "n_head": 2, "n_embd": 32,
                       "vocab_size": 50, "n_positions": 64, "layer_norm_epsilon": 1e-5,
                       "positions": "rope", "rope_theta": 10000, "attention": "lssar",
                       "p": 15, "offset_rows": 3}, cfg
        w, _ = ref.load_model(a)
        assert "wpe.weight" not in w and set(w) == set(ref.required_weights(cfg))
        shapes = {"wte.weight": (50, 32), "h.1.attn.c_attn.weight": (32, 96),
                  "h.1.attn.c_attn.bias": (96,), "h.0.mlp.c_fc.weight": (32, 128),
                  "h.0.mlp.c_proj.weight": (128, 32), "ln_f.bias": (32,)}
        for name, shape in shapes.items():
            assert w[name].shape == shape, (name, w[name].shape)
        wl, cl = model("learned", "softmax")[:2]
        assert wl["wpe.weight"].shape == (64, 32)
    finally:
        shutil.rmtree(tmp)


@test
def model_matches_loops():
    tmp = tempfile.mkdtemp()
    try:
        ids = [3, 17, 0, 9, 9, 12, 5]
        for positions in ("learned", "rope"):
            for attention in ref.VARIANTS:
                d = os.path.join(tmp, positions + attention)
                cfg = make_tiny_gpt2.make(d, n_layer=2, n_head=4, n_embd=16, vocab_size=20,
                                          n_positions=8, positions=positions,
                                          attention=attention, seed=21)
                w, c = ref.load_model(d)
                got = ref.forward(w, c, ids)
                want = loop_forward(os.path.join(d, "1", "model.safetensors"), cfg, ids)
                close(got["logits"], want, 1e-10, "%s/%s logits" % (positions, attention))
    finally:
        shutil.rmtree(tmp)


@test
def distributions_are_normalised_and_not_degenerate():
    for positions in ("learned", "rope"):
        for attention in ref.VARIANTS:
            w, c, _ = model(positions, attention)
            r = ref.forward(w, c, IDS)
            lp = r["token_logprobs"]
            assert lp.shape == (len(IDS) - 1,) and np.all(lp <= 0.0)
            logits = r["logits"]
            m = logits.max(-1, keepdims=True)
            logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
            close(np.exp(logp).sum(-1), np.ones(len(IDS)), 1e-13, "sum to one")
            close(lp, [logp[t, IDS[t + 1]] for t in range(len(IDS) - 1)], 1e-14, "gathered")
            close(r["nll"], -lp.mean(), 1e-14, "nll")
            close(r["next_token_logits"], logits[-1], 0.0, "next token logits")
            ent = -(np.exp(logp) * logp).sum(-1)
            assert 0.5 < ent.mean() < math.log(50) - 0.3, \
                "%s/%s: mean entropy %.3f is degenerate" % (positions, attention, ent.mean())


@test
def prefix_outputs_are_a_prefix():
    for positions in ("learned", "rope"):
        for attention in ref.VARIANTS:
            w, c, _ = model(positions, attention)
            whole = ref.forward(w, c, IDS)
            for n in (1, 2, 4, 9):
                part = ref.forward(w, c, IDS[:n])
                close(part["logits"], whole["logits"][:n], 1e-12, "%s/%s n=%d" %
                      (positions, attention, n))
                close(part["token_logprobs"], whole["token_logprobs"][:n - 1], 1e-12, "lp")
            assert ref.forward(w, c, IDS[:1])["nll"] == 0.0


@test
def variants_and_settings_change_the_outputs():
    w, c, _ = model("rope", "lssar")
    outs = [ref.forward(w, c, IDS, a)["token_logprobs"] for a in ref.VARIANTS]
    outs.append(ref.forward(w, c, IDS, "lssar", p=3)["token_logprobs"])
    outs.append(ref.forward(w, c, IDS, "lssar", offset_rows=0)["token_logprobs"])
    for i in range(len(outs)):
        for j in range(i):
            assert np.max(np.abs(outs[i] - outs[j])) > 1e-3, (i, j)
    close(ref.forward(w, c, IDS)["logits"], ref.forward(w, c, IDS, "lssar", 15, 3)["logits"],
          0.0, "config defaults")


@test
def forward_refuses_bad_input():
    w, c, _ = model("learned", "softmax")
    for ids in ([], [50], [-1], list(range(10)) * 7):   # the last is past n_positions 64
        try:
            ref.forward(w, c, ids)
        except ValueError:
            continue
        raise AssertionError("input %r was accepted" % (ids,))
    wr, cr, _ = model("rope", "softmax")
    assert ref.forward(wr, cr, [1] * 70)["logits"].shape == (70, 50)  # RoPE goes past it
    broken = dict(w)
    del broken["h.1.mlp.c_fc.bias"]
    try:
        ref.forward(broken, c, [1, 2])
    except ValueError as e:
        assert "h.1.mlp.c_fc.bias" in str(e)
    else:
        raise AssertionError("missing weight accepted")


@test
def cli_prints_the_forward_outputs():
    w, c, d = model("learned", "lssa")
    cmd = [sys.executable, os.path.join(HERE, "gpt2_ref.py"), d, "--ids", "1,2,3,4"]
    one = json.loads(subprocess.check_output(cmd + ["--attention", "lssar", "--p", "3"]))
    r = ref.forward(w, c, [1, 2, 3, 4], "lssar", 3)
    close(one["token_logprobs"], r["token_logprobs"], 0.0, "cli token_logprobs")
    close(one["next_token_logits"], r["next_token_logits"], 0.0, "cli logits")
    assert one["nll"] == r["nll"] and "logits" not in one
    two = json.loads(subprocess.check_output(cmd + ["--ids", "5,6,7,8", "--logits"]))
    assert np.asarray(two["token_logprobs"]).shape == (2, 3)
    assert np.asarray(two["next_token_logits"]).shape == (2, 50)
    assert np.asarray(two["logits"]).shape == (2, 4, 50) and len(two["nll"]) == 2
    close(two["nll"][1], ref.forward(w, c, [5, 6, 7, 8])["nll"], 0.0, "batch row 2")
    bad = subprocess.run(cmd[:3] + ["--ids", "1,2,77"], capture_output=True, text=True)
    assert bad.returncode == 2 and "vocabulary" in bad.stderr


def main():
    global TMP
    TMP = tempfile.mkdtemp()
    passed = failed = 0
    try:
        for fn in TESTS:
            try:
                fn()
            except Exception:
                failed += 1
                print("FAIL %s" % fn.__name__)
                traceback.print_exc(file=sys.stdout)
            else:
                passed += 1
                print("ok   %s" % fn.__name__)
    finally:
        shutil.rmtree(TMP)
    print("tally: %d passed, %d failed, 0 skipped" % (passed, failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
