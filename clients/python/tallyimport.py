#!/usr/bin/env python3
"""tallyimport.py - write a tallyd model directory from a model trained elsewhere.

Why it exists: tallyd reads its own tensor names (docs/models.md); a user with a
trained PyTorch, scikit-learn or Hugging Face model should not rename tensors by
hand. Each command writes

    OUTDIR/config.json                   the kind and its settings
    OUTDIR/<version>/model.safetensors   float32 weights under tallyd's names
    OUTDIR/<version>/version.json        where it came from, and the file's sha256

where OUTDIR is <model repository>/<model name>. It needs the standard library
and numpy; PyTorch only to read a whole pickled module (a state_dict file is
read without it).

    tallyimport.py torch   SRC OUTDIR [--activations relu,softmax]
    tallyimport.py sklearn SRC.npz OUTDIR [--activation relu] [--out-activation softmax]
    tallyimport.py hf-gpt2 SRCDIR OUTDIR

`tallyimport.py COMMAND --help` explains each. After writing, the daemon picks
the model up at its next SIGHUP or repository poll, or at
`POST /v2/repository/models/<name>/load`.
"""

import argparse
import datetime
import hashlib
import json
import os
import pickle
import re
import shutil
import struct
import sys
import tempfile
import zipfile

try:
    import numpy as np
except ImportError:  # every command needs it; main() says so
    np = None

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2

# tallyd's mlp activations, and what each source calls them
MLP_ACTIVATIONS = ("none", "relu", "gelu", "gelu_tanh", "elu", "tanh", "sigmoid", "softmax")
SKLEARN_ACTIVATIONS = {"identity": "none", "logistic": "sigmoid", "tanh": "tanh",
                       "relu": "relu", "softmax": "softmax"}
HF_TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
                      "special_tokens_map.json", "added_tokens.json", "generation_config.json")


class ImportError_(Exception):
    """A source that cannot be imported; the message says what to change."""


# ---- safetensors ----------------------------------------------------------

ST_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4",
             "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "?"}


def st_save(path, tensors, metadata=None):
    """tensors: {name: numpy array}, written in name order, 8-byte aligned."""
    header, offset, blobs = {}, 0, []
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        code = {np.dtype("<f4"): "F32", np.dtype("<f8"): "F64", np.dtype("<i8"): "I64",
                np.dtype("<i4"): "I32"}.get(a.dtype.newbyteorder("<"))
        if code is None:
            raise ImportError_("tensor %r: dtype %s cannot be written" % (name, a.dtype))
        raw = a.astype(a.dtype.newbyteorder("<")).tobytes()
        header[name] = {"dtype": code, "shape": list(a.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for b in blobs:
            f.write(b)


def st_load(path):
    """{name: numpy array} of a safetensors file (BF16 widened to float32)."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 8:
        raise ImportError_("%s: not a safetensors file (too short)" % path)
    (n,) = struct.unpack("<Q", data[:8])
    try:
        header = json.loads(data[8:8 + n])
    except ValueError as e:
        raise ImportError_("%s: not a safetensors file (%s)" % (path, e))
    base, out = 8 + n, {}
    for name, e in header.items():
        if name == "__metadata__":
            continue
        lo, hi = e["data_offsets"]
        raw = data[base + lo:base + hi]
        if e["dtype"] == "BF16":
            a = (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32)
        elif e["dtype"] in ST_DTYPES:
            a = np.frombuffer(raw, ST_DTYPES[e["dtype"]])
        else:
            raise ImportError_("%s: tensor %r has dtype %s" % (path, name, e["dtype"]))
        out[name] = a.reshape(e["shape"])
    return out


# ---- PyTorch files without PyTorch ----------------------------------------
#
# torch.save writes a zip: <archive>/data.pkl pickles the object with each
# tensor as torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)
# and each storage as a persistent id ('storage', torch.FloatStorage, key,
# location, numel) whose bytes are <archive>/data/<key>. Unpickling with those
# few globals mapped to numpy reads a state_dict exactly, with no code from the
# file run (every other global is refused).

TORCH_STORAGES = {"FloatStorage": "<f4", "DoubleStorage": "<f8", "HalfStorage": "<f2",
                  "BFloat16Storage": "bf16", "LongStorage": "<i8", "IntStorage": "<i4",
                  "ShortStorage": "<i2", "CharStorage": "i1", "ByteStorage": "u1",
                  "BoolStorage": "?"}


class _StorageType:
    def __init__(self, name):
        self.name = name


def _rebuild_tensor(storage, offset, size, stride, *rest):
    arr = storage
    if not size:
        return arr[offset:offset + 1].reshape(())
    itemsize = arr.itemsize
    return np.lib.stride_tricks.as_strided(arr[offset:], shape=tuple(size),
                                           strides=tuple(s * itemsize for s in stride)).copy()


def _rebuild_parameter(data, *rest):
    return data


class _TorchUnpickler(pickle.Unpickler):
    def __init__(self, f, zf, prefix):
        super().__init__(f)
        self.zf, self.prefix, self.cache = zf, prefix, {}

    def find_class(self, module, name):
        if module == "collections" and name == "OrderedDict":
            import collections
            return collections.OrderedDict
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in TORCH_STORAGES:
            return _StorageType(name)
        raise ImportError_("the file pickles %s.%s: not a plain state_dict (save "
                           "model.state_dict(), or install PyTorch to read a whole module)"
                           % (module, name))

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise ImportError_("unknown persistent id %r" % (pid,))
        stype, key = pid[1], pid[2]
        if key not in self.cache:
            raw = self.zf.read("%sdata/%s" % (self.prefix, key))
            code = TORCH_STORAGES[stype.name]
            if code == "bf16":
                a = (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32)
            else:
                a = np.frombuffer(raw, code)
            self.cache[key] = a
        return self.cache[key]


def torch_load_state_dict(path):
    """{name: numpy array} from a torch.save'd state_dict (zip format), without torch."""
    if not zipfile.is_zipfile(path):
        raise ImportError_("%s: not a torch.save zip file (legacy pre-1.6 files need PyTorch)" % path)
    with zipfile.ZipFile(path) as zf:
        pkl = [n for n in zf.namelist() if n.endswith("data.pkl")]
        if not pkl:
            raise ImportError_("%s: no data.pkl inside" % path)
        prefix = pkl[0][:-len("data.pkl")]
        with zf.open(pkl[0]) as f:
            obj = _TorchUnpickler(f, zf, prefix).load()
    if not isinstance(obj, dict):
        raise ImportError_("%s: holds a %s, not a state_dict" % (path, type(obj).__name__))
    return dict(obj)


# ---- writing a model directory --------------------------------------------

def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_model_dir(outdir, config, tensors, version, source, extra_files=(), force=False,
                    copy_weights=None):
    """Writes config.json and <version>/ (model.safetensors, version.json, extra
    files) by rename, so a daemon polling the repository never sees half of it."""
    vdir = os.path.join(outdir, str(version))
    if os.path.exists(vdir) and not force:
        raise ImportError_("%s exists (--force replaces it)" % vdir)
    os.makedirs(outdir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".import-", dir=outdir)
    try:
        weights = os.path.join(tmp, "model.safetensors")
        if copy_weights:
            shutil.copyfile(copy_weights, weights)
        else:
            st_save(weights, tensors)
        for src in extra_files:
            shutil.copyfile(src, os.path.join(tmp, os.path.basename(src)))
        info = {"version": version, "sha256": sha256_file(weights), "source": source,
                "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
        with open(os.path.join(tmp, "version.json"), "w") as f:
            json.dump(info, f, indent=2, sort_keys=True)
            f.write("\n")
        ctmp = os.path.join(outdir, ".config.json.tmp")
        with open(ctmp, "w") as f:
            json.dump(config, f, indent=2)
            f.write("\n")
        if os.path.exists(vdir):
            shutil.rmtree(vdir)
        os.rename(tmp, vdir)
        os.rename(ctmp, os.path.join(outdir, "config.json"))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return info


def mlp_tensors(layers):
    """layers: [(weight [out, in], bias [out] or None)] -> tallyd's mlp tensors."""
    out, prev = {}, None
    for i, (w, b) in enumerate(layers):
        w = np.asarray(w, dtype=np.float32)
        if w.ndim != 2:
            raise ImportError_("layer %d: weight has shape %s, expected [out, in]" % (i, list(w.shape)))
        if prev is not None and w.shape[1] != prev:
            raise ImportError_("layer %d takes %d inputs but layer %d gives %d"
                               % (i, w.shape[1], i - 1, prev))
        b = np.zeros(w.shape[0], np.float32) if b is None else np.asarray(b, dtype=np.float32).reshape(-1)
        if b.shape[0] != w.shape[0]:
            raise ImportError_("layer %d: bias has %d entries for %d outputs" % (i, b.shape[0], w.shape[0]))
        if not (np.isfinite(w).all() and np.isfinite(b).all()):
            raise ImportError_("layer %d: weights hold NaN or Inf" % i)
        out["layers.%d.weight" % i] = w
        out["layers.%d.bias" % i] = b
        prev = w.shape[0]
    return out


def parse_activations(text, n):
    acts = [a.strip() for a in text.split(",") if a.strip()]
    bad = [a for a in acts if a not in MLP_ACTIVATIONS]
    if bad:
        raise ImportError_("activation %r is not one of %s" % (bad[0], ", ".join(MLP_ACTIVATIONS)))
    if len(acts) != n:
        raise ImportError_("--activations names %d activations for %d Linear layers (one per "
                           "layer, 'none' where a Linear is followed by no activation)" % (len(acts), n))
    return acts


# ---- PyTorch nn.Sequential ------------------------------------------------

def _module_activation(m):
    """tallyd's name of an activation module, '' for a module that changes nothing
    at inference (Dropout, Identity, Flatten of [B, D]), None if unsupported."""
    name = type(m).__name__
    if name in ("Dropout", "Identity", "Flatten", "AlphaDropout"):
        return ""
    if name == "ReLU":
        return "relu"
    if name == "GELU":
        return "gelu_tanh" if getattr(m, "approximate", "none") == "tanh" else "gelu"
    if name == "ELU":
        return "elu" if float(getattr(m, "alpha", 1.0)) == 1.0 else None
    if name == "Tanh":
        return "tanh"
    if name == "Sigmoid":
        return "sigmoid"
    if name == "Softmax":
        return "softmax" if getattr(m, "dim", None) in (-1, 1) else None
    return None


def sequential_from_module(model):
    """[(weight, bias)], [activation] from an nn.Sequential of Linear and activations."""
    layers, acts = [], []
    for i, m in enumerate(model.children() if hasattr(model, "children") else model):
        name = type(m).__name__
        if name == "Linear":
            layers.append((m.weight.detach().cpu().float().numpy(),
                           None if m.bias is None else m.bias.detach().cpu().float().numpy()))
            acts.append("none")
            continue
        a = _module_activation(m)
        if a is None:
            raise ImportError_("module %d (%s) has no tallyd counterpart; mlp supports Linear "
                               "followed by %s" % (i, name, ", ".join(MLP_ACTIVATIONS[1:])))
        if a == "":
            continue
        if not layers or acts[-1] != "none":
            raise ImportError_("module %d (%s) does not follow a Linear: tallyd applies one "
                               "activation after each Linear" % (i, name))
        acts[-1] = a
    if not layers:
        raise ImportError_("the module holds no Linear layer")
    return layers, acts


def sequential_from_state_dict(sd):
    """[(weight, bias)] in module order from a Sequential's state_dict
    ('0.weight', '0.bias', '2.weight', ...; an outer prefix such as 'net.' is allowed)."""
    found = {}
    for key, val in sd.items():
        m = re.match(r"^(.*?)(\d+)\.(weight|bias)$", key)
        if not m:
            raise ImportError_("state_dict key %r is not <index>.weight or <index>.bias of an "
                               "nn.Sequential" % key)
        found.setdefault((m.group(1), int(m.group(2))), {})[m.group(3)] = np.asarray(val)
    prefixes = {p for p, _ in found}
    if len(prefixes) != 1:
        raise ImportError_("state_dict keys have several prefixes (%s): one nn.Sequential expected"
                           % ", ".join(sorted(repr(p) for p in prefixes)))
    layers = []
    for key in sorted(found, key=lambda k: k[1]):
        t = found[key]
        if "weight" not in t:
            raise ImportError_("module %d has a bias and no weight" % key[1])
        if t["weight"].ndim != 2:
            raise ImportError_("module %d's weight has shape %s: only Linear layers (2-D weights) "
                               "are supported" % (key[1], list(t["weight"].shape)))
        layers.append((t["weight"], t.get("bias")))
    return layers


def load_torch_source(path):
    """(layers, activations or None) from a .pt/.pth (state_dict or whole module),
    a .safetensors state_dict, or an .npz of the state_dict's arrays."""
    low = path.lower()
    if low.endswith(".safetensors"):
        return sequential_from_state_dict(st_load(path)), None
    if low.endswith(".npz"):
        with np.load(path) as z:
            return sequential_from_state_dict({k: z[k] for k in z.files}), None
    try:
        return sequential_from_state_dict(torch_load_state_dict(path)), None
    except ImportError_ as plain_error:
        try:
            import torch
        except ImportError:
            raise plain_error
    obj = torch.load(path, map_location="cpu")  # a whole module: needs its classes, i.e. torch
    if isinstance(obj, dict):
        return sequential_from_state_dict({k: v.detach().cpu().float().numpy() for k, v in obj.items()}), None
    return sequential_from_module(obj)


def cmd_torch(a):
    layers, acts = load_torch_source(a.src)
    if a.activations:
        acts = parse_activations(a.activations, len(layers))
    elif acts is None:
        raise ImportError_("%s is a state_dict: it has no activations. Give them with "
                           "--activations (one per Linear, e.g. relu,softmax), or save the whole "
                           "module (torch.save(model, path)) so they can be read" % a.src)
    config = {"kind": "mlp", "activations": acts}
    return config, mlp_tensors(layers), {"format": "pytorch nn.Sequential", "file": os.path.basename(a.src)}


# ---- scikit-learn MLPClassifier / MLPRegressor -----------------------------

def cmd_sklearn(a):
    with np.load(a.src, allow_pickle=False) as z:
        files = set(z.files)
        coefs = sorted((int(k.split("_")[1]), z[k]) for k in files if re.match(r"^coefs_\d+$", k))
        inters = sorted((int(k.split("_")[1]), z[k]) for k in files if re.match(r"^intercepts_\d+$", k))
        stored = {k: str(z[k]) for k in ("activation", "out_activation") if k in files}
    if not coefs or [i for i, _ in coefs] != list(range(len(coefs))) or len(inters) != len(coefs):
        raise ImportError_("%s: expected coefs_0..coefs_{n-1} and intercepts_0..intercepts_{n-1} "
                           "(see docs/models.md for the np.savez line)" % a.src)
    hidden = a.activation or stored.get("activation")
    out = a.out_activation or stored.get("out_activation")
    if not hidden or not out:
        raise ImportError_("the activations are not in %s: give --activation (the model's "
                           "activation) and --out-activation (its out_activation_)" % a.src)
    for what, v in (("activation", hidden), ("out_activation", out)):
        if v not in SKLEARN_ACTIVATIONS:
            raise ImportError_("%s %r is not one of %s" % (what, v, ", ".join(SKLEARN_ACTIVATIONS)))
    # sklearn keeps coefs_[i] as [in, out]; tallyd (like torch's Linear) as [out, in]
    layers = [(c.T, b) for (_, c), (_, b) in zip(coefs, inters)]
    acts = [SKLEARN_ACTIVATIONS[hidden]] * (len(layers) - 1) + [SKLEARN_ACTIVATIONS[out]]
    config = {"kind": "mlp", "activations": acts}
    return config, mlp_tensors(layers), {"format": "scikit-learn MLP", "file": os.path.basename(a.src),
                                         "activation": hidden, "out_activation": out}


# ---- Hugging Face GPT-2 ----------------------------------------------------

def cmd_hf_gpt2(a):
    cpath = os.path.join(a.src, "config.json")
    try:
        with open(cpath) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise ImportError_("%s: %s" % (cpath, e))
    if config.get("model_type") != "gpt2":
        raise ImportError_("%s: model_type is %r; only gpt2 checkpoints are imported"
                           % (cpath, config.get("model_type")))
    for key in ("n_layer", "n_head", "n_embd", "vocab_size", "n_positions"):
        if not isinstance(config.get(key), int):
            raise ImportError_("%s: %r missing or not an integer" % (cpath, key))
    st_path = os.path.join(a.src, "model.safetensors")
    bin_path = os.path.join(a.src, "pytorch_model.bin")
    copy, tensors = None, None
    if os.path.isfile(st_path):
        names = st_load(st_path)
        copy = st_path  # served as it is: tallyd reads the HF names, F16/BF16 included
    elif os.path.isfile(bin_path):
        names = torch_load_state_dict(bin_path)
        tensors = {k: np.asarray(v, dtype=np.float32) for k, v in names.items()
                   if not re.search(r"\.attn\.(bias|masked_bias)$", k)}  # causal-mask buffers
    elif os.path.isfile(os.path.join(a.src, "model.safetensors.index.json")):
        raise ImportError_("%s: sharded checkpoints are not imported; save it unsharded "
                           "(save_pretrained(..., max_shard_size=\"100GB\"))" % a.src)
    else:
        raise ImportError_("%s: no model.safetensors or pytorch_model.bin" % a.src)
    pre = "transformer." if "transformer.wte.weight" in names else ""
    need = ["wte.weight", "ln_f.weight", "ln_f.bias"]
    if config.get("positions", "learned") == "learned":
        need.append("wpe.weight")
    missing = [pre + n for n in need if pre + n not in names]
    if missing:
        raise ImportError_("the checkpoint has no tensor %r: not a GPT-2 checkpoint" % missing[0])
    extra = [os.path.join(a.src, n) for n in HF_TOKENIZER_FILES if os.path.isfile(os.path.join(a.src, n))]
    config = dict(config)
    config.setdefault("kind", "transformer")
    return config, tensors, {"format": "huggingface gpt2", "dir": os.path.basename(os.path.abspath(a.src)),
                             "tokenizer_files": [os.path.basename(p) for p in extra]}, extra, copy


# ---- command line -----------------------------------------------------------

def build_parser():
    p = argparse.ArgumentParser(
        prog="tallyimport.py",
        description="Write a tallyd model directory (config.json, VERSION/model.safetensors, "
                    "VERSION/version.json with the weights' sha256) from a trained model.",
        epilog="docs/models.md describes every kind's tensors; docs/clients.md shows each import.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def common(sp):
        sp.add_argument("outdir", metavar="OUTDIR", help="the model's directory: <repository>/<model name>")
        sp.add_argument("--version", type=int, default=1, help="version number to write (default 1)")
        sp.add_argument("--force", action="store_true", help="replace the version if it exists")

    t = sub.add_parser("torch", help="a PyTorch nn.Sequential of Linear and activation layers",
                       description="Import an nn.Sequential of Linear layers and activations as an "
                                   "mlp. SRC: torch.save(model.state_dict()) (.pt/.pth, read without "
                                   "PyTorch), the same as .safetensors or .npz, or torch.save(model) "
                                   "(a whole module: needs PyTorch; its activations are read from it).")
    t.add_argument("src", metavar="SRC", help="state_dict or module file")
    common(t)
    t.add_argument("--activations", metavar="A,B,...",
                   help="one per Linear: %s (needed for a state_dict; overrides a module's)"
                        % ", ".join(MLP_ACTIVATIONS))
    s = sub.add_parser("sklearn", help="a scikit-learn MLPClassifier or MLPRegressor (.npz)",
                       description="Import an MLPClassifier or MLPRegressor saved with np.savez(path, "
                                   "**{'coefs_%%d' %% i: c for i, c in enumerate(m.coefs_)}, "
                                   "**{'intercepts_%%d' %% i: b for i, b in enumerate(m.intercepts_)}, "
                                   "activation=m.activation, out_activation=m.out_activation_).")
    s.add_argument("src", metavar="SRC.npz")
    common(s)
    s.add_argument("--activation", choices=sorted(SKLEARN_ACTIVATIONS),
                   help="the hidden layers' activation (default: the one saved in the .npz)")
    s.add_argument("--out-activation", choices=sorted(SKLEARN_ACTIVATIONS),
                   help="out_activation_: softmax (classifier, 3+ classes), logistic (binary "
                        "classifier), identity (regressor); default: the one saved in the .npz")
    h = sub.add_parser("hf-gpt2", help="a Hugging Face GPT-2 checkpoint directory",
                       description="Import a save_pretrained() GPT-2 directory: config.json "
                                   "(model_type gpt2) and model.safetensors (served as it is) or "
                                   "pytorch_model.bin (converted); tokenizer files are copied into "
                                   "the version directory.")
    h.add_argument("src", metavar="SRCDIR")
    common(h)
    return p


def main(argv=None):
    p = build_parser()
    try:
        a = p.parse_args(argv)
    except SystemExit as e:
        return EXIT_OK if e.code == 0 else EXIT_USAGE
    if np is None:
        print("tallyimport: numpy is needed (apt-get install python3-numpy)", file=sys.stderr)
        return EXIT_ERROR
    if a.version < 1:
        print("tallyimport: --version must be a positive integer", file=sys.stderr)
        return EXIT_USAGE
    try:
        extra, copy = (), None
        if a.command == "torch":
            config, tensors, source = cmd_torch(a)
        elif a.command == "sklearn":
            config, tensors, source = cmd_sklearn(a)
        else:
            config, tensors, source, extra, copy = cmd_hf_gpt2(a)
        info = write_model_dir(a.outdir, config, tensors, a.version, source, extra, a.force, copy)
    except (ImportError_, OSError, ValueError, KeyError) as e:
        print("tallyimport: %s" % e, file=sys.stderr)
        return EXIT_ERROR
    print("wrote %s (%s, version %d, sha256 %s)" % (a.outdir, config["kind"], a.version, info["sha256"]))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
