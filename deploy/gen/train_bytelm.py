#!/usr/bin/env python3
"""Trains bytelm, the example byte-level language model that `make run` serves.

Run by hand (never by make test or make run; Debian's python3-torch):

    /usr/bin/python3 deploy/gen/train_bytelm.py --attention lssar --out deploy/bytelm
    /usr/bin/python3 deploy/gen/train_bytelm.py --attention softmax --out /tmp/bytelm_softmax

The model is the transformer kind's, exactly (docs/attention.md, docs/models.md):
byte ids (0..255), token embeddings tied to the LM head, RoPE positions, pre-LN
blocks x += c_proj(Attn(LN1(x))); x += c_proj(gelu_tanh(c_fc(LN2(x)))), a final
LayerNorm, and the attention variant given (LSSAR: softplus scores scaled by
log(d) log(N) over unit-norm q and k, normalised, then re-weighted by
ReLU(N A - O)^p). Weights are saved under Hugging Face GPT-2 names (Conv1D
[in, out]) in model.safetensors, with version.json carrying its sha256.

Training text: the Python sources of CPython's standard library that every
Debian machine has (/usr/lib/python3.X/*.py, sorted by name); the last 5% of
the bytes are held out for validation. Seeded: the same machine, torch version
and thread count give the same weights.
"""
import argparse
import glob
import hashlib
import json
import math
import os
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "tests", "reference"))
import st  # noqa: E402

EPS = 1e-8
NORM_FLOOR = 1e-12


def corpus():
    files = sorted(glob.glob("/usr/lib/python3.*/*.py"))
    if not files:
        sys.exit("no /usr/lib/python3.*/*.py found")
    ver = sorted({os.path.dirname(f) for f in files})[-1]
    files = [f for f in files if os.path.dirname(f) == ver]
    data = b"".join(open(f, "rb").read() for f in files)
    return np.frombuffer(data, dtype=np.uint8), ver


def rope(x, theta):
    """x [B, H, L, d]; pair m is (m, m + d/2), rotated by pos * theta^(-2m/d)."""
    L, d = x.shape[-2], x.shape[-1]
    half = d // 2
    m = torch.arange(half, dtype=torch.float64)
    ang = torch.arange(L, dtype=torch.float64)[:, None] * theta ** (-2.0 * m / d)
    cos, sin = torch.cos(ang).to(x.dtype), torch.sin(ang).to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def attention(q, k, v, variant, p, offset_rows):
    B, H, L, d = q.shape
    mask = torch.ones(L, L, dtype=torch.bool).tril()
    if variant == "softmax":
        s = q @ k.transpose(-1, -2) / math.sqrt(d)
        s = s.masked_fill(~mask, float("-inf"))
        return torch.softmax(s, dim=-1) @ v
    n = torch.arange(1, L + 1, dtype=q.dtype)  # keys visible to each query
    qn = q / q.norm(dim=-1, keepdim=True).clamp_min(NORM_FLOOR)
    kn = k / k.norm(dim=-1, keepdim=True).clamp_min(NORM_FLOOR)
    s = math.log(d) * torch.log(n)[:, None] * (qn @ kn.transpose(-1, -2))
    a = torch.nn.functional.softplus(s) * mask
    A = a / (a.sum(-1, keepdim=True) + EPS)
    if variant == "lssa":
        return A @ v
    O = (torch.arange(L) >= offset_rows).to(q.dtype)
    x = torch.relu(n[:, None] * A - O[:, None])
    # b / (sum b + eps) with b = x^p, rescaled by the row maximum so that x^p
    # never overflows: y = x / xmax, W = y^p / (sum y^p + eps / xmax^p)
    xmax = x.amax(-1, keepdim=True).clamp_min(1e-30)
    yp = (x / xmax) ** p
    W = yp / (yp.sum(-1, keepdim=True) + torch.exp(math.log(EPS) - p * torch.log(xmax)))
    return W @ v


def gelu_tanh(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


class Model(torch.nn.Module):
    def __init__(self, n_layer, n_embd, n_head, variant, p, offset_rows, theta):
        super().__init__()
        E = n_embd
        self.H, self.E, self.variant, self.p, self.off, self.theta = n_head, E, variant, p, offset_rows, theta
        self.wte = torch.nn.Parameter(torch.randn(256, E) * 0.02)
        self.layers = torch.nn.ModuleList()
        for _ in range(n_layer):
            m = torch.nn.Module()
            m.ln_1 = torch.nn.LayerNorm(E, eps=1e-5)
            m.c_attn = torch.nn.Linear(E, 3 * E)
            m.attn_proj = torch.nn.Linear(E, E)
            m.ln_2 = torch.nn.LayerNorm(E, eps=1e-5)
            m.c_fc = torch.nn.Linear(E, 4 * E)
            m.mlp_proj = torch.nn.Linear(4 * E, E)
            for lin in (m.c_attn, m.attn_proj, m.c_fc, m.mlp_proj):
                torch.nn.init.normal_(lin.weight, std=0.02)
                torch.nn.init.zeros_(lin.bias)
            self.layers.append(m)
        self.ln_f = torch.nn.LayerNorm(E, eps=1e-5)

    def forward(self, ids):
        B, L = ids.shape
        E, H = self.E, self.H
        d = E // H
        x = self.wte[ids]
        for m in self.layers:
            a = m.ln_1(x)
            q, k, v = m.c_attn(a).split(E, dim=-1)
            q, k, v = (t.view(B, L, H, d).transpose(1, 2) for t in (q, k, v))
            q, k = rope(q, self.theta), rope(k, self.theta)
            o = attention(q, k, v, self.variant, self.p, self.off).transpose(1, 2).reshape(B, L, E)
            x = x + m.attn_proj(o)
            x = x + m.mlp_proj(gelu_tanh(m.c_fc(m.ln_2(x))))
        return self.ln_f(x) @ self.wte.T

    def load_hf(self, path):
        """Loads weights saved by hf_tensors (to continue training)."""
        hdr, raw = st.load_raw(path)
        w = {k: torch.from_numpy(np.frombuffer(v[2], dtype=np.float32).reshape(v[1]).copy())
             for k, v in raw.items()}
        with torch.no_grad():
            self.wte.copy_(w["wte.weight"])
            self.ln_f.weight.copy_(w["ln_f.weight"])
            self.ln_f.bias.copy_(w["ln_f.bias"])
            for i, m in enumerate(self.layers):
                pre = "h.%d." % i
                for mod, name in ((m.ln_1, "ln_1"), (m.ln_2, "ln_2")):
                    mod.weight.copy_(w[pre + name + ".weight"])
                    mod.bias.copy_(w[pre + name + ".bias"])
                for mod, name in ((m.c_attn, "attn.c_attn"), (m.attn_proj, "attn.c_proj"),
                                  (m.c_fc, "mlp.c_fc"), (m.mlp_proj, "mlp.c_proj")):
                    mod.weight.copy_(w[pre + name + ".weight"].T)
                    mod.bias.copy_(w[pre + name + ".bias"])

    def hf_tensors(self):
        """HF GPT-2 names; Conv1D weights are [in, out] (nn.Linear's transposed)."""
        t = {"wte.weight": self.wte, "ln_f.weight": self.ln_f.weight, "ln_f.bias": self.ln_f.bias}
        for i, m in enumerate(self.layers):
            pre = "h.%d." % i
            t[pre + "ln_1.weight"], t[pre + "ln_1.bias"] = m.ln_1.weight, m.ln_1.bias
            t[pre + "ln_2.weight"], t[pre + "ln_2.bias"] = m.ln_2.weight, m.ln_2.bias
            t[pre + "attn.c_attn.weight"], t[pre + "attn.c_attn.bias"] = m.c_attn.weight.T, m.c_attn.bias
            t[pre + "attn.c_proj.weight"], t[pre + "attn.c_proj.bias"] = m.attn_proj.weight.T, m.attn_proj.bias
            t[pre + "mlp.c_fc.weight"], t[pre + "mlp.c_fc.bias"] = m.c_fc.weight.T, m.c_fc.bias
            t[pre + "mlp.c_proj.weight"], t[pre + "mlp.c_proj.bias"] = m.mlp_proj.weight.T, m.mlp_proj.bias
        return {k: np.ascontiguousarray(v.detach().numpy().astype(np.float32)) for k, v in t.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--attention", default="lssar", choices=("softmax", "lssa", "lssar"))
    ap.add_argument("--out", required=True, help="directory for config.json and 1/")
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--ctx", type=int, default=128, help="training length in bytes")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--p", type=int, default=15)
    ap.add_argument("--offset-rows", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--init", help="continue from this model.safetensors (same shape)")
    a = ap.parse_args()
    torch.manual_seed(a.seed)
    torch.set_num_threads(a.threads)
    data, src = corpus()
    split = int(len(data) * 0.95)
    train, val = data[:split], data[split:]
    rng = np.random.RandomState(a.seed)
    model = Model(a.layers, a.width, a.heads, a.attention, a.p, a.offset_rows, 10000.0)
    init_sha = None
    if a.init:
        model.load_hf(a.init)
        init_sha = hashlib.sha256(open(a.init, "rb").read()).hexdigest()
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.01, betas=(0.9, 0.95))
    t0 = time.time()
    for step in range(a.steps):
        lr = a.lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / a.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        starts = rng.randint(0, len(train) - a.ctx - 1, size=a.batch)
        x = torch.from_numpy(np.stack([train[s:s + a.ctx + 1] for s in starts]).astype(np.int64))
        logits = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == a.steps - 1:
            print("step %d loss %.4f (%.0f s)" % (step, loss.item(), time.time() - t0), flush=True)
    with torch.no_grad():
        vs = np.random.RandomState(7).randint(0, len(val) - a.ctx - 1, size=64)
        x = torch.from_numpy(np.stack([val[s:s + a.ctx + 1] for s in vs]).astype(np.int64))
        vloss = torch.nn.functional.cross_entropy(model(x[:, :-1]).reshape(-1, 256), x[:, 1:].reshape(-1)).item()
    print("validation loss at the training length: %.4f nats/byte" % vloss)
    os.makedirs(os.path.join(a.out, "1"), exist_ok=True)
    cfg = {"kind": "transformer", "n_layer": a.layers, "n_head": a.heads, "n_embd": a.width,
           "vocab_size": 256, "n_positions": 1 << 20, "layer_norm_epsilon": 1e-5,
           "positions": "rope", "rope_theta": 10000, "attention": a.attention, "p": a.p,
           "offset_rows": a.offset_rows, "tokenizer": "bytes"}
    with open(os.path.join(a.out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")
    wpath = os.path.join(a.out, "1", "model.safetensors")
    st.save(wpath, model.hf_tensors(), {"format": "pt", "generator": "deploy/gen/train_bytelm.py",
                                        "seed": str(a.seed)})
    digest = hashlib.sha256(open(wpath, "rb").read()).hexdigest()
    info = {"sha256": digest, "trained_by": "deploy/gen/train_bytelm.py",
            "training": {"text": src + "/*.py (first 95% of the bytes)", "steps": a.steps,
                         "batch": a.batch, "context": a.ctx, "lr": a.lr, "seed": a.seed,
                         "threads": a.threads, "torch": torch.__version__},
            "validation_loss_at_training_length": round(vloss, 4)}
    if init_sha:
        info["training"]["continued_from_sha256"] = init_sha
    with open(os.path.join(a.out, "1", "version.json"), "w") as f:
        json.dump(info, f, indent=2)
        f.write("\n")
    print("wrote %s (sha256 %s)" % (wpath, digest))


if __name__ == "__main__":
    main()
