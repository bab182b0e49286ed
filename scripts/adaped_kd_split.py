"""AdaPeD diagnostic: KD(θ_i ‖ w) on each client's training vs held-out inputs at a checkpoint.

    python scripts/adaped_kd_split.py RUN_DIR

RUN_DIR is a finished `fedkin run` of AdaPeD; it is copied first, so it is left untouched.
Prints the mean over visited clients of KD(θ_i ‖ w) on their training and test inputs, and ψ.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from fedkin.config import load_config
from fedkin.experiment import Experiment


def load(run: Path) -> Experiment:
    copy = Path(tempfile.mkdtemp()) / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("metrics.jsonl"))
    experiment = Experiment(load_config(copy / "config.yaml"), copy)
    experiment.load_checkpoint(copy)
    return experiment


def kd_split(e: Experiment) -> dict[str, float]:
    ds, alg, w = e.dataset, e.algorithm, e.population["global"]
    states = e.store.gather(torch.arange(ds.num_clients))
    out: dict[str, list[float]] = {"train": [], "test": []}
    for i in torch.nonzero(states["seen"] > 0).flatten().tolist():
        theta = {k: v[i] for k, v in states["theta"].items()}
        splits = {
            "train": ds.train_index[i, : int(ds.train_sizes[i])],
            "test": ds.test_index[i, : int(ds.test_sizes[i])],
        }
        for name, idx in splits.items():
            x = ds.x[idx]
            out[name].append(float(alg.kd(alg.logits(theta, x), alg.logits(w, x))))
    result = {f"kd_{k}_inputs": sum(v) / len(v) for k, v in out.items()}
    return {**result, "clients": len(out["train"]), "psi": float(e.population["psi"])}


if __name__ == "__main__":
    print(json.dumps(kd_split(load(Path(sys.argv[1])))))
