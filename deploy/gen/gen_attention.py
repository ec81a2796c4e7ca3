"""Example models for long-context attention (docs/attention.md):

  attention_demo  the `attention` kind: attention as a service, no weights
  tiny_gpt2       a small random GPT-2-layout `transformer` (2 layers, 64 wide,
                  4 heads, vocabulary 256 = bytes, RoPE positions, LSSAR p = 15),
                  written by tests/reference/make_tiny_gpt2.py (seeded, so
                  every run writes the same bytes)

Standard library only, like every generator here."""
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "tests", "reference"))
import make_tiny_gpt2  # noqa: E402


def generate(repo):
    adir = os.path.join(repo, "attention_demo")
    os.makedirs(os.path.join(adir, "1"), exist_ok=True)
    with open(os.path.join(adir, "config.json"), "w") as f:
        json.dump({"kind": "attention", "max_sequence_length": 131072}, f, indent=2)
        f.write("\n")
    make_tiny_gpt2.make(os.path.join(repo, "tiny_gpt2"), n_layer=2, n_head=4, n_embd=64,
                        vocab_size=256, n_positions=1024, positions="rope", attention="lssar",
                        p=15, offset_rows=3, seed=5)
    # Its 256 ids are bytes: the text endpoints (tokenize, completions) work
    # on it, though its random weights write no sense.
    cpath = os.path.join(repo, "tiny_gpt2", "config.json")
    with open(cpath) as f:
        cfg = json.load(f)
    cfg["tokenizer"] = "bytes"
    with open(cpath, "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")
