#!/usr/bin/env python3
"""The learning loop's example (docs/learning.md): `aware_learning`, the
AWARE-NET ensemble of gen_aware.py's nine hosted members with the loop on
("log" and "refit" in its config.json), version 1 uniform (tier2.logits = 0).

    generate(repo_dir)                 (called by deploy/gen_models.py)

Its served rows are logged under deploy/models/aware_learning/.rowlog/
(ignored by git; `make reset-models` removes it)."""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, ".."))


def config():
    import gen_aware
    c = gen_aware.ensemble_config()
    c["description"] = ("AWARE-NET ensemble with the learning loop on: served rows logged, "
                        "feedback, candidates promoted by log loss (docs/learning.md)")
    c["version_policy"] = {"latest": {"num_versions": 1}}
    c["log"] = {"sample_rate": 1.0, "max_rows": 10000}
    c["refit"] = {"every_rows": 1000, "window_rows": 100, "min_rows": 50, "compare_rows": 100,
                  "margin": 0.02, "max_age_seconds": 3600,
                  "params": {"epochs": 300, "learning_rate": 0.05, "seed": 1}}
    return c


def generate(repo):
    import gen_aware
    import gen_models
    gen_models.write_model(repo, "aware_learning", config(),
                           {"tier2.logits": ("F32", [len(gen_aware.FAMILIES)],
                                             [0.0] * len(gen_aware.FAMILIES))})


if __name__ == "__main__":
    generate(sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "..", "models"))
