"""bytelm: the example byte-level language model (RoPE, LSSAR attention).

Its weights are trained, not generated: deploy/gen/train_bytelm.py wrote
deploy/bytelm/ (config.json, 1/model.safetensors, 1/version.json with the
weights' sha256), and this copies them into the repository, checking the
digest. Stdlib only."""
import hashlib
import os
import shutil

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(HERE, "..", "bytelm")


def generate(repo):
    if not os.path.isdir(SRC):
        return
    out = os.path.join(repo, "bytelm")
    os.makedirs(os.path.join(out, "1"), exist_ok=True)
    shutil.copyfile(os.path.join(SRC, "config.json"), os.path.join(out, "config.json"))
    for name in ("model.safetensors", "version.json"):
        shutil.copyfile(os.path.join(SRC, "1", name), os.path.join(out, "1", name))
    import json
    want = json.load(open(os.path.join(SRC, "1", "version.json")))["sha256"]
    got = hashlib.sha256(open(os.path.join(out, "1", "model.safetensors"), "rb").read()).hexdigest()
    if got != want:
        raise SystemExit("deploy/bytelm/1/model.safetensors: sha256 %s, version.json says %s"
                         % (got, want))
