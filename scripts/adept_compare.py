"""ADEPT-PCA vs local PCA vs global PCA on the linear-Gaussian model (issue #14, Table 1 on
synthetic data): per-client test reconstruction MSE, energy captured and principal-angle error
to the client's true subspace span(W_i), averaged over clients, for several seeds.

Local PCA: the top-k right singular vectors of each client's own training samples; global
PCA: those of all clients' training samples pooled (both exact, by SVD). ADEPT-PCA: a fedkin
run of the config. Rows: {"method", "dataset", "metric", "value", "trainable_params", "seed"}.

    PYTHONPATH=src python scripts/adept_compare.py configs/adept_pca.yaml --seeds 0 1 2 \
        --out benchmarks/results/generative/adept_pca
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from fedkin.config import load_config
from fedkin.core.tasks import RECONSTRUCTION
from fedkin.data.linear_gaussian import client_decoders
from fedkin.experiment import Experiment


def top_subspace(x: torch.Tensor, k: int) -> torch.Tensor:
    return torch.linalg.svd(x.to(torch.float64), full_matrices=False).Vh[:k].T


def angle_error(u: torch.Tensor, w: torch.Tensor) -> float:
    qu, _ = torch.linalg.qr(u.to(torch.float64))
    qw, _ = torch.linalg.qr(w.to(torch.float64))
    return float(torch.arccos(torch.linalg.svdvals(qw.T @ qu).clamp(max=1.0)).norm())


def client_metrics(u: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> dict[str, float]:
    u = u.to(torch.float64)
    x = x.to(torch.float64)
    energy, mse = RECONSTRUCTION.per_sample(x @ u @ u.T, x, torch.zeros(len(x)))
    return {
        "test_mse": float(mse.mean()),
        "energy_captured": float(energy.mean()),
        "subspace_error": angle_error(u, w),
    }


def run(config_path: str, seed: int) -> list[dict]:
    cfg = load_config(config_path, [f"seed={seed}"])
    exp = Experiment(cfg)
    for _ in range(cfg.rounds):
        exp.run_round()
    ds, k = exp.dataset, cfg.model.rank
    truth = client_decoders(cfg.data, cfg.seed)
    pooled = top_subspace(torch.cat([ds.client_train(i)[0] for i in range(ds.num_clients)]), k)
    bases = {
        "adept-pca": lambda i: exp.personal_params(i)["basis"],
        "local-pca": lambda i: top_subspace(ds.client_train(i)[0], k),
        "global-pca": lambda i: pooled,
    }
    rows = []
    for method, basis in bases.items():
        per_client = [
            client_metrics(basis(i), ds.client_test(i)[0], truth[i]) for i in range(ds.num_clients)
        ]
        for metric in per_client[0]:
            rows.append(
                {
                    "method": method,
                    "dataset": "linear-gaussian",
                    "metric": metric,
                    "value": statistics.mean(c[metric] for c in per_client),
                    "trainable_params": int(truth.shape[1] * k),
                    "seed": seed,
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", type=Path, required=True, help="path prefix for .json/.md")
    args = parser.parse_args()
    rows = [row for seed in args.seeds for row in run(args.config, seed)]
    command = (
        f"PYTHONPATH=src python scripts/adept_compare.py {args.config} --seeds "
        f"{' '.join(map(str, args.seeds))} --out {args.out}"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(
        json.dumps({"command": command, "rows": rows}, indent=1)
    )
    methods = list(dict.fromkeys(r["method"] for r in rows))
    metrics = list(dict.fromkeys(r["metric"] for r in rows))
    lines = [f"Command: `{command}`", "", "| method | " + " | ".join(metrics) + " |"]
    lines.append("|---" * (len(metrics) + 1) + "|")
    for m in methods:
        cells = []
        for metric in metrics:
            v = [r["value"] for r in rows if r["method"] == m and r["metric"] == metric]
            sd = statistics.stdev(v) if len(v) > 1 else 0.0
            cells.append(f"{statistics.mean(v):.4f} ± {sd:.4f}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Mean ± std over seeds {args.seeds} of the mean over clients (test split).")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
