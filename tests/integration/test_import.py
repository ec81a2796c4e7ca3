"""Bringing your own model: clients/python/tallyimport.py writes model
directories from a PyTorch nn.Sequential (state_dict read without PyTorch, and
a whole module with PyTorch where it is installed), a scikit-learn MLP saved to
.npz, and a Hugging Face GPT-2 checkpoint; tallyd serves each and its answers
match a NumPy forward pass of the source's own weights. A Hugging Face GPT-2
directory with no "kind" also loads as a transformer directly, with and
without the "transformer." prefix, against tests/reference/gpt2_ref.py.

Every source is built here from seeded random numbers in the source format's
own layout ([in, out] coefficients for sklearn, Conv1D [in, out] for GPT-2,
state_dict indices with gaps for nn.Sequential)."""
import collections
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile

from harness import (ROOT, Daemon, SkipTest, check, check_status, collect, make_repo, output,
                     run_tests, tensor)

try:
    import numpy as np
    import gpt2_ref
    import make_tiny_gpt2
    import st
except ImportError as e:
    np = None
    IMPORT_ERROR = e

TOOL = os.path.join(ROOT, "clients", "python", "tallyimport.py")


def run_tool(*args):
    p = subprocess.run([sys.executable, TOOL] + [str(a) for a in args], capture_output=True,
                       text=True, timeout=120)
    return p.returncode, p.stdout, p.stderr


def tool_ok(*args):
    rc, out, err = run_tool(*args)
    check(rc == 0, "tallyimport %s: rc %d: %s%s" % (" ".join(map(str, args)), rc, out, err))
    return out


def act(name, x):
    if name == "relu":
        return np.maximum(x, 0)
    if name == "tanh":
        return np.tanh(x)
    if name == "sigmoid":
        return 1 / (1 + np.exp(-x))
    if name == "softmax":
        e = np.exp(x - x.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)
    if name == "gelu_tanh":
        return 0.5 * x * (1 + np.tanh(0.7978845608028654 * (x + 0.044715 * x ** 3)))
    if name == "elu":
        return np.where(x > 0, x, np.expm1(np.minimum(x, 0)))
    return x


def forward(layers, acts, x):
    """layers: [(W [out, in], b)] in float64."""
    for (w, b), a in zip(layers, acts):
        x = act(a, x @ np.asarray(w, np.float64).T + b)
    return x


def write_torch_zip(path, state_dict):
    """A state_dict in torch.save's zip layout, written without PyTorch: the
    pickle names torch._utils._rebuild_tensor_v2 and torch.FloatStorage, and
    each tensor's bytes are archive/data/<key> (what torch.save writes)."""
    class Storage:
        def __init__(self, key):
            self.key = key

    class Rebuild:
        def __init__(self, storage, shape):
            self.storage, self.shape = storage, shape

        def __reduce__(self):
            stride, s = [], 1
            for d in reversed(self.shape):
                stride.insert(0, s)
                s *= d
            return (REBUILD, (self.storage, 0, tuple(self.shape), tuple(stride), False,
                              collections.OrderedDict()))

    class P(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, Storage):
                return ("storage", FLOAT_STORAGE, obj.key, "cpu", 0)
            return None

    import types
    torch_mod = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*a):
        raise AssertionError("only pickled here")

    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2

    class FloatStorage:
        pass

    FloatStorage.__module__ = "torch"
    FloatStorage.__qualname__ = "FloatStorage"
    torch_mod.FloatStorage = FloatStorage
    saved = {k: sys.modules.get(k) for k in ("torch", "torch._utils")}
    sys.modules["torch"], sys.modules["torch._utils"] = torch_mod, utils
    REBUILD, FLOAT_STORAGE = _rebuild_tensor_v2, FloatStorage
    try:
        import io
        buf = io.BytesIO()
        obj = collections.OrderedDict()
        blobs = {}
        for i, (k, v) in enumerate(state_dict.items()):
            v = np.ascontiguousarray(v, dtype="<f4")
            blobs[str(i)] = v.tobytes()
            obj[k] = Rebuild(Storage(str(i)), list(v.shape))
        P(buf, protocol=2).dump(obj)
    finally:
        for k, m in saved.items():
            if m is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = m
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", buf.getvalue())
        for k, b in blobs.items():
            z.writestr("archive/data/" + k, b)
        z.writestr("archive/version", "3\n")


class Ctx:
    def __init__(self):
        if np is None:
            raise SkipTest("numpy is needed (%s)" % IMPORT_ERROR)
        self.repo = make_repo()
        self.src = tempfile.mkdtemp(prefix="tallyd-import-src-")
        self.rng = np.random.default_rng(11)
        self.d = Daemon(self.repo, ["--repository-poll-secs", "0"]).start()

    def load(self, name):
        check_status(self.d.post("/v2/repository/models/%s/load" % name), 200)

    def infer(self, name, x):
        r = self.d.infer(name, [tensor("features", x.astype(np.float32).tolist())])
        check_status(r, 200)
        o = output(r, "output")
        return np.asarray(o["data"], np.float64).reshape(o["shape"])

    def close(self):
        self.d.stop()
        shutil.rmtree(self.repo, ignore_errors=True)
        shutil.rmtree(self.src, ignore_errors=True)

    def daemon_logs(self):
        return self.d.logs()


def setup():
    return Ctx()


def random_mlp(rng, sizes):
    return [(rng.normal(0, 0.5, (o, i)), rng.normal(0, 0.2, o)) for i, o in zip(sizes, sizes[1:])]


def check_close(got, want, tol=1e-5):
    got, want = np.asarray(got), np.asarray(want)
    check(got.shape == want.shape, "shape %s != %s" % (got.shape, want.shape))
    err = np.abs(got - want).max()
    check(err <= tol, "max error %.3g > %g" % (err, tol))


def test_torch_state_dict_without_torch(c):
    layers = random_mlp(c.rng, [6, 16, 8, 3])
    # nn.Sequential(Linear, ReLU, Linear, Dropout, Tanh, Linear, Softmax): indices 0, 2, 5
    sd = collections.OrderedDict()
    for idx, (w, b) in zip((0, 2, 5), layers):
        sd["%d.weight" % idx], sd["%d.bias" % idx] = w, b
    path = os.path.join(c.src, "seq.pt")
    write_torch_zip(path, sd)
    acts = ["relu", "tanh", "softmax"]
    # without activations a state_dict is refused with the way out
    rc, out, err = run_tool("torch", path, os.path.join(c.repo, "seq"))
    check(rc == 1 and "--activations" in err, err)
    rc, out, err = run_tool("torch", path, os.path.join(c.repo, "seq"), "--activations", "relu,tanh")
    check(rc == 1 and "2 activations for 3 Linear" in err, err)
    tool_ok("torch", path, os.path.join(c.repo, "seq"), "--activations", ",".join(acts))
    with open(os.path.join(c.repo, "seq", "config.json")) as f:
        check(json.load(f) == {"kind": "mlp", "activations": acts})
    with open(os.path.join(c.repo, "seq", "1", "version.json")) as f:
        info = json.load(f)
    import hashlib
    with open(os.path.join(c.repo, "seq", "1", "model.safetensors"), "rb") as f:
        check(info["sha256"] == hashlib.sha256(f.read()).hexdigest(), info)
    c.load("seq")
    x = c.rng.normal(0, 1, (5, 6))
    check_close(c.infer("seq", x), forward(layers, acts, x))
    # a second import of the same version is refused unless forced
    rc, out, err = run_tool("torch", path, os.path.join(c.repo, "seq"), "--activations", ",".join(acts))
    check(rc == 1 and "exists" in err, err)


def test_torch_safetensors_and_npz_state_dicts(c):
    layers = random_mlp(c.rng, [4, 5, 2])
    sd = {"net.0.weight": layers[0][0], "net.0.bias": layers[0][1],
          "net.2.weight": layers[1][0], "net.2.bias": layers[1][1]}
    p1 = os.path.join(c.src, "sd.npz")
    np.savez(p1, **sd)
    p2 = os.path.join(c.src, "sd.safetensors")
    st.save(p2, {k: v.astype(np.float32) for k, v in sd.items()})
    x = c.rng.normal(0, 1, (3, 4))
    for name, path in (("sd_npz", p1), ("sd_st", p2)):
        tool_ok("torch", path, os.path.join(c.repo, name), "--activations", "gelu_tanh,sigmoid")
        c.load(name)
        check_close(c.infer(name, x), forward(layers, ["gelu_tanh", "sigmoid"], x))
    # a 4-D weight (a Conv2d) is not a Linear
    bad = os.path.join(c.src, "conv.npz")
    np.savez(bad, **{"0.weight": np.zeros((2, 3, 3, 3)), "0.bias": np.zeros(2)})
    rc, out, err = run_tool("torch", bad, os.path.join(c.repo, "conv"), "--activations", "none")
    check(rc == 1 and "only Linear" in err, err)


def test_torch_module_with_torch(c):
    try:
        import torch
    except ImportError:
        raise SkipTest("PyTorch is not installed (the state_dict tests above run without it)")
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(7, 12), torch.nn.ELU(), torch.nn.Dropout(0.1),
                                torch.nn.Linear(12, 9), torch.nn.GELU(),
                                torch.nn.Linear(9, 4), torch.nn.Softmax(dim=-1)).eval()
    path = os.path.join(c.src, "module.pt")
    torch.save(model, path)
    tool_ok("torch", path, os.path.join(c.repo, "module"))
    with open(os.path.join(c.repo, "module", "config.json")) as f:
        check(json.load(f)["activations"] == ["elu", "gelu", "softmax"])
    # the state_dict torch itself wrote, read by the torch-free loader
    sd_path = os.path.join(c.src, "module_sd.pt")
    torch.save(model.state_dict(), sd_path)
    tool_ok("torch", sd_path, os.path.join(c.repo, "module_sd"), "--activations", "elu,gelu,softmax")
    c.load("module")
    c.load("module_sd")
    x = c.rng.normal(0, 1, (6, 7)).astype(np.float32)
    with torch.no_grad():
        want = model(torch.from_numpy(x)).double().numpy()
    check_close(c.infer("module", x), want)
    check_close(c.infer("module_sd", x), want)
    # a module tallyd cannot run is refused by name
    torch.save(torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LeakyReLU()), path)
    rc, out, err = run_tool("torch", path, os.path.join(c.repo, "leaky"))
    check(rc == 1 and "LeakyReLU" in err, err)


def test_sklearn_classifier_and_regressor(c):
    # MLPClassifier(hidden_layer_sizes=(10, 6), activation="tanh"), 3 classes
    sizes = [5, 10, 6, 3]
    coefs = [c.rng.normal(0, 0.6, (i, o)) for i, o in zip(sizes, sizes[1:])]  # sklearn: [in, out]
    inters = [c.rng.normal(0, 0.2, o) for o in sizes[1:]]
    path = os.path.join(c.src, "clf.npz")
    np.savez(path, **{"coefs_%d" % i: w for i, w in enumerate(coefs)},
             **{"intercepts_%d" % i: b for i, b in enumerate(inters)},
             activation="tanh", out_activation="softmax")
    tool_ok("sklearn", path, os.path.join(c.repo, "clf"))
    c.load("clf")
    x = c.rng.normal(0, 1, (4, 5))
    want = forward([(w.T, b) for w, b in zip(coefs, inters)], ["tanh", "tanh", "softmax"], x)
    check_close(c.infer("clf", x), want)
    # MLPRegressor(activation="relu"): out_activation_ identity, given on the command line
    coefs = [c.rng.normal(0, 0.6, (3, 8)), c.rng.normal(0, 0.6, (8, 1))]
    inters = [c.rng.normal(0, 0.2, 8), c.rng.normal(0, 0.2, 1)]
    path = os.path.join(c.src, "reg.npz")
    np.savez(path, coefs_0=coefs[0], coefs_1=coefs[1], intercepts_0=inters[0], intercepts_1=inters[1])
    rc, out, err = run_tool("sklearn", path, os.path.join(c.repo, "reg"))
    check(rc == 1 and "--activation" in err, err)
    tool_ok("sklearn", path, os.path.join(c.repo, "reg"), "--activation", "relu",
            "--out-activation", "identity")
    c.load("reg")
    x = c.rng.normal(0, 1, (7, 3))
    want = forward([(w.T, b) for w, b in zip(coefs, inters)], ["relu", "none"], x)
    check_close(c.infer("reg", x), want)


def hf_checkpoint(path, prefix, seed=5, with_kind=False):
    """A tiny random GPT-2 in save_pretrained's layout: config.json with
    model_type gpt2 and no "kind", model.safetensors with HF names (Conv1D
    weights [in, out]), the causal-mask buffers, lm_head tied, tokenizer files."""
    os.makedirs(path, exist_ok=True)
    cfg = make_tiny_gpt2.make_config(n_layer=2, n_head=2, n_embd=16, vocab_size=40, n_positions=32)
    hf = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "activation_function": "gelu_new",
          "n_layer": 2, "n_head": 2, "n_embd": 16, "vocab_size": 40, "n_positions": 32, "n_ctx": 32,
          "layer_norm_epsilon": 1e-5, "attn_pdrop": 0.1, "embd_pdrop": 0.1, "resid_pdrop": 0.1,
          "bos_token_id": 0, "eos_token_id": 0, "initializer_range": 0.02,
          "scale_attn_weights": True, "use_cache": True, "torch_dtype": "float32",
          "transformers_version": "4.40.0"}
    if with_kind:
        hf["kind"] = "transformer"
    check("kind" not in cfg or cfg["kind"] == "transformer")
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f)
    t = make_tiny_gpt2.make_tensors(n_layer=2, n_head=2, n_embd=16, vocab_size=40, n_positions=32, seed=seed)
    arrays = {prefix + k: np.asarray(v[2], np.float32).reshape(v[1]) for k, v in t.items()}
    for i in range(2):
        arrays[prefix + "h.%d.attn.bias" % i] = np.tril(np.ones((32, 32), np.float32)).reshape(1, 1, 32, 32)
    if prefix:
        arrays["lm_head.weight"] = arrays[prefix + "wte.weight"]
    st.save(os.path.join(path, "model.safetensors"), arrays)
    with open(os.path.join(path, "vocab.json"), "w") as f:
        json.dump({chr(65 + i): i for i in range(40)}, f)
    with open(os.path.join(path, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    return hf


def hf_reference(srcdir, ids):
    weights, config = gpt2_ref.load_model(srcdir)
    weights = {k: v for k, v in weights.items()
               if not re.search(r"\.attn\.bias$", k) and k != "lm_head.weight"}
    return gpt2_ref.forward(weights, config, ids)


def check_gpt2(c, name, srcdir):
    ids = [3, 17, 5, 22, 9, 31, 0]
    r = c.d.infer(name, [tensor("input_ids", [ids], datatype="INT64")],
                  outputs=[{"name": "token_logprobs"}, {"name": "nll"}])
    check_status(r, 200)
    want = hf_reference(srcdir, ids)
    got = np.asarray(output(r, "token_logprobs")["data"], np.float64)
    check_close(got, want["token_logprobs"], 1e-4)
    check(abs(output(r, "nll")["data"][0] - want["nll"]) < 1e-4)


def test_hf_gpt2_loads_directly(c):
    """A checkpoint directory laid out as a version: config.json without
    "kind" beside 1/model.safetensors, with and without "transformer."."""
    for name, prefix in (("hf_plain", ""), ("hf_prefixed", "transformer.")):
        src = os.path.join(c.src, name)
        hf_checkpoint(src, prefix)
        mdir = os.path.join(c.repo, name)
        os.makedirs(os.path.join(mdir, "1"))
        shutil.copy(os.path.join(src, "config.json"), mdir)
        shutil.copy(os.path.join(src, "model.safetensors"), os.path.join(mdir, "1"))
        c.load(name)
        meta = c.d.get("/v2/models/" + name).json()
        check(meta.get("platform", "transformer") and any(i["name"] == "input_ids" for i in meta["inputs"]), meta)
        check_gpt2(c, name, src)
    # another model_type without "kind" is refused by name
    mdir = os.path.join(c.repo, "hf_bert")
    os.makedirs(os.path.join(mdir, "1"))
    with open(os.path.join(mdir, "config.json"), "w") as f:
        json.dump({"model_type": "bert", "hidden_size": 8}, f)
    r = c.d.post("/v2/repository/models/hf_bert/load")
    check(r.status >= 400 and "model_type 'bert'" in r.json()["error"], r)


def test_hf_gpt2_import(c):
    src = os.path.join(c.src, "hf_import")
    hf_checkpoint(src, "transformer.", seed=9)
    tool_ok("hf-gpt2", src, os.path.join(c.repo, "gpt2_imported"))
    vdir = os.path.join(c.repo, "gpt2_imported", "1")
    check(os.path.isfile(os.path.join(vdir, "vocab.json")) and os.path.isfile(os.path.join(vdir, "merges.txt")),
          os.listdir(vdir))
    with open(os.path.join(vdir, "version.json")) as f:
        check(json.load(f)["source"]["tokenizer_files"] == ["vocab.json", "merges.txt"])
    c.load("gpt2_imported")
    check_gpt2(c, "gpt2_imported", src)
    # pytorch_model.bin (no safetensors): converted, mask buffers dropped
    src2 = os.path.join(c.src, "hf_bin")
    hf_checkpoint(src2, "", seed=4)
    sd = st.load(os.path.join(src2, "model.safetensors"))
    os.remove(os.path.join(src2, "model.safetensors"))
    write_torch_zip(os.path.join(src2, "pytorch_model.bin"), collections.OrderedDict(sorted(sd.items())))
    tool_ok("hf-gpt2", src2, os.path.join(c.repo, "gpt2_bin"))
    c.load("gpt2_bin")
    st.save(os.path.join(src2, "model.safetensors"), sd)  # for the reference to read
    check_gpt2(c, "gpt2_bin", src2)
    # not a GPT-2
    bad = os.path.join(c.src, "hf_llama")
    os.makedirs(bad)
    with open(os.path.join(bad, "config.json"), "w") as f:
        json.dump({"model_type": "llama"}, f)
    rc, out, err = run_tool("hf-gpt2", bad, os.path.join(c.repo, "llama"))
    check(rc == 1 and "llama" in err, err)


def test_help_of_every_command(c):
    for cmd in ("torch", "sklearn", "hf-gpt2"):
        rc, out, err = run_tool(cmd, "--help")
        check(rc == 0 and "usage: tallyimport.py " + cmd in out, out + err)
    rc, out, err = run_tool("tensorflow", "x", "y")
    check(rc == 2, (rc, err))


if __name__ == "__main__":
    run_tests(collect(globals()), setup=setup, teardown=lambda c: c.close())
