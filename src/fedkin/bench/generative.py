"""`fedkin bench generative`: personalized unsupervised and generative learning (issue #14).

Tables (``--table``; each a builder in :data:`TABLES` returning JSON rows
``{"table", "method", "dataset", "metric", "value", "std", "trainable_params"}``, ``value`` the
mean over seeds of the mean over clients and ``std`` its std over seeds):

* ``table1`` — reconstruction on each dataset's pair of configs (``configs/adept_pca*.yaml``,
  ``configs/adept_ae*.yaml``): test MSE ‖x − x̂‖²/d per sample (``test_mse``), energy captured
  1 − ‖x − x̂‖²/‖x‖² (``energy_captured``) and, where the truth is known (linear-Gaussian), the
  principal-angle error ‖∠(span θ_i, span W_i)‖₂ to the client's true subspace
  (``subspace_error``). Methods: every algorithm of the config's ``compare.algorithms`` run with
  fedkin (ADEPT-PCA / ADEPT-AE, Local, FedAvg), plus exact PCA by SVD on the PCA config's data:
  ``local-pca`` (each client's own training samples) and ``global-pca`` (all clients' training
  samples pooled). PCA is uncentred, x̂ = UUᵀx, as the ``pca`` model.
* ``amplification`` — ADEPT-PCA trained with n samples per client (the PCA config's
  ``data.train_per_client``; linear-Gaussian: n = 10 of a pool of 80 per client) against exact
  local PCA given k·n samples per client (the nested ``data.train_per_client = k·n`` subsets of
  the same clients, same test data), for k on a grid (up to the smallest client's training set);
  the reported ``matching_k`` is the k at which local PCA's test MSE (and subspace error) falls
  to ADEPT-PCA's, linearly interpolated between grid points (``null`` above the grid).
* ``table2`` — per-client KID/FID of personalized diffusion models (SPIRE, ADEPT-DGM, Local,
  FedAvg with full and last-layer fine-tuning) on digits, on training clients and on new
  clients after equal-budget adaptation, plus forgetting: :mod:`fedkin.bench.diffusion` with its
  default settings, one seed (its ``*_std`` metrics are over clients; ``std`` is null).
* ``headroom`` — an oracle (λ chosen on test data) for what any collaboration can gain: PCA of
  each client's second-moment matrix mixed with the pooled one, at n and 4n samples per client.

Each fedkin run is an in-process :class:`~fedkin.experiment.Experiment` of the config with
``seed`` set; the exact baselines use the same dataset (same seed, so the same partition).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedkin.bench.diffusion import generative_table2
from fedkin.config import deep_merge, parse_overrides, read_yaml, validate_config
from fedkin.core.errors import ConfigError, DataError
from fedkin.core.evaluate import summarize
from fedkin.core.tasks import RECONSTRUCTION
from fedkin.core.tree import tree_leaves
from fedkin.data import FederatedDataset, build_dataset
from fedkin.experiment import Experiment

CONFIGS = Path(__file__).resolve().parents[3] / "configs"


@dataclass(frozen=True)
class Pair:
    """One dataset's PCA and autoencoder configs (paths relative to ``configs/``) and the
    overrides of the PCA config for amplification (a pool of ≥ max(K_GRID)·n samples)."""

    pca: str
    ae: str
    amplify: tuple[str, ...] = ()


DATASETS = {
    "linear-gaussian": Pair(
        "adept_pca.yaml", "adept_ae.yaml", ("data.train_samples=80", "data.train_per_client=10")
    ),
    "fashion-mnist": Pair("adept_pca_fmnist.yaml", "adept_ae_fmnist.yaml"),
    "digits": Pair("adept_pca_digits.yaml", "adept_ae_digits.yaml"),
}
#: multiples k of ADEPT's n samples per client given to local PCA (amplification)
K_GRID = (1, 1.5, 2, 3, 4, 6, 8)
Row = dict[str, Any]


def load_raw(name: str, overrides: list[str]) -> dict[str, Any]:
    """A config file of ``configs/`` with ``key=value`` overrides, as a dict."""
    return deep_merge(read_yaml(CONFIGS / name), parse_overrides(overrides))


def experiment_config(raw: dict[str, Any], algorithm: str, seed: int):
    """The validated config of one fedkin run: ``algorithm`` with its ``algorithm_options``."""
    raw = dict(raw)
    section = raw.pop("compare", None) or {}
    options = section.get("algorithm_options", {}).get(algorithm, {})
    if algorithm == raw.get("algorithm", {}).get("name"):
        options = {**raw["algorithm"], **options}
    raw["algorithm"] = {**options, "name": algorithm}
    raw["seed"] = seed
    return validate_config(raw)


def top_subspace(x: torch.Tensor, k: int) -> torch.Tensor:
    """The top-k right singular vectors of the (uncentred) sample matrix ``[n, d]``: PCA."""
    return torch.linalg.svd(x.flatten(1).to(torch.float64), full_matrices=False).Vh[:k].T


def subspace_error(u: torch.Tensor, w: torch.Tensor) -> float:
    """‖θ‖₂ of the principal angles θ between span(u) and span(w)."""
    qu, _ = torch.linalg.qr(u.to(torch.float64))
    qw, _ = torch.linalg.qr(w.to(torch.float64))
    return float(torch.arccos(torch.linalg.svdvals(qw.T @ qu).clamp(max=1.0)).norm())


def basis_scores(ds: FederatedDataset, bases: list[torch.Tensor]) -> dict[str, float]:
    """Test MSE and energy captured of x̂ = U_i U_iᵀ x on every client's test split, summarized
    exactly as fedkin's evaluation (:func:`fedkin.core.evaluate.summarize`)."""
    energy, err, count = [], [], []
    for i, u in enumerate(bases):
        x = ds.client_test(i)[0].flatten(1).to(torch.float64)
        e, mse = RECONSTRUCTION.per_sample(x @ u @ u.T, x, torch.zeros(len(x)))
        energy.append(e.sum())
        err.append(mse.sum())
        count.append(len(x))
    s = summarize(
        "personal", torch.stack(energy), torch.stack(err), torch.tensor(count), RECONSTRUCTION
    )
    return {"test_mse": s["personal_mse"], "energy_captured": s["personal_energy_mean"]}


def personal_basis(params: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The d×k basis of a personal PCA (``basis``) or linear autoencoder (decoder weight)."""
    for key in ("basis", "decoder.weight"):
        if key in params:
            return params[key]
    return None


def truth(raw: dict[str, Any], seed: int) -> torch.Tensor | None:
    """Each client's true decoder W_i (linear-Gaussian data only)."""
    from fedkin.data.linear_gaussian import client_decoders

    cfg = validate_config({**raw, "seed": seed})
    return client_decoders(cfg.data, seed) if cfg.data.name == "linear-gaussian" else None


_RUNS: dict[str, tuple[dict[str, float], int]] = {}


def run_fedkin(raw: dict[str, Any], algorithm: str, seed: int) -> tuple[dict[str, float], int]:
    """Train ``algorithm`` on the config; its personal test metrics and trainable params
    (a run already made by this process, e.g. for another table, is reused)."""
    key = json.dumps([raw, algorithm, seed], sort_keys=True, default=str)
    if key not in _RUNS:
        _RUNS[key] = _train(raw, algorithm, seed)
    return _RUNS[key]


def _train(raw: dict[str, Any], algorithm: str, seed: int) -> tuple[dict[str, float], int]:
    exp = Experiment(experiment_config(raw, algorithm, seed))
    for _ in range(exp.config.rounds):
        exp.run_round()
    record = exp.evaluate()
    scores = {"test_mse": record["personal_mse"], "energy_captured": record["personal_energy_mean"]}
    w = truth(raw, seed)
    params = [exp.personal_params(i) for i in range(exp.dataset.num_clients)]
    if w is not None and personal_basis(params[0]) is not None:
        errs = [subspace_error(personal_basis(p), w[i]) for i, p in enumerate(params)]
        scores["subspace_error"] = statistics.fmean(errs)
    return scores, sum(t.numel() for t in tree_leaves(params[0]))


def exact_pca(raw: dict[str, Any], seed: int) -> dict[str, tuple[dict[str, float], int]]:
    """Local and global PCA by SVD on the config's dataset (rank = ``model.rank``)."""
    cfg = validate_config({**raw, "seed": seed})
    ds, k = build_dataset(cfg.data, seed), cfg.model.rank
    local = [top_subspace(ds.client_train(i)[0], k) for i in range(ds.num_clients)]
    pooled = top_subspace(torch.cat([ds.client_train(i)[0] for i in range(ds.num_clients)]), k)
    out = {}
    w = truth(raw, seed)
    for method, bases in (("local-pca", local), ("global-pca", [pooled] * ds.num_clients)):
        scores = basis_scores(ds, bases)
        if w is not None:
            scores["subspace_error"] = statistics.fmean(
                subspace_error(u, w[i]) for i, u in enumerate(bases)
            )
        out[method] = (scores, int(bases[0].numel()))
    return out


def rows_over_seeds(
    table: str, dataset: str, per_seed: list[dict[str, tuple[dict[str, float], int]]]
) -> list[Row]:
    """Mean and std over seeds of every (method, metric)."""
    rows = []
    for method, (scores, params) in per_seed[0].items():
        for metric in scores:
            values = [s[method][0][metric] for s in per_seed]
            rows.append(
                {
                    "table": table,
                    "method": method,
                    "dataset": dataset,
                    "metric": metric,
                    "value": statistics.fmean(values),
                    "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                    "trainable_params": params,
                }
            )
    return rows


def seeds(args: argparse.Namespace) -> range:
    """``--first-seed``, …, ``--first-seed + --seeds − 1``."""
    return range(getattr(args, "first_seed", 0), getattr(args, "first_seed", 0) + args.seeds)


def pairs(args: argparse.Namespace) -> list[tuple[str, Pair]]:
    """The ``--datasets`` (default: all) with their configs; an unknown name is an error."""
    names = args.datasets or list(DATASETS)
    unknown = [d for d in names if d not in DATASETS]
    if unknown:
        raise ConfigError(f"--datasets: unknown {unknown}; allowed: {', '.join(DATASETS)}")
    return [(d, DATASETS[d]) for d in names]


def table1(args: argparse.Namespace) -> list[Row]:
    """Reconstruction MSE, energy captured (and subspace error) per method and dataset."""
    rows = []
    for dataset, pair in pairs(args):
        per_seed = []
        for seed in seeds(args):
            results: dict[str, tuple[dict[str, float], int]] = {}
            for name in (pair.pca, pair.ae):
                raw = load_raw(name, args.overrides)
                for algorithm in (raw.get("compare") or {}).get("algorithms", []):
                    label = _label(algorithm, raw)
                    results[label] = run_fedkin(raw, algorithm, seed)
                    _progress(args, dataset, seed, label, results[label][0])
            results.update(exact_pca(load_raw(pair.pca, args.overrides), seed))
            per_seed.append(results)
        rows += rows_over_seeds("table1", dataset, per_seed)
    return rows


def _label(algorithm: str, raw: dict[str, Any]) -> str:
    """Method label: ADEPT's own names; baselines suffixed by the model (local-ae, fedavg-pca)."""
    if algorithm.startswith("adept"):
        return algorithm
    return f"{algorithm}-{'ae' if raw['model']['name'] == 'linear-ae' else 'pca'}"


def _progress(args: argparse.Namespace, *parts: Any) -> None:
    if not args.json:
        print("  ", *parts, flush=True)


def amplification(args: argparse.Namespace) -> list[Row]:
    """ADEPT-PCA with n samples per client against local PCA with k·n (matching k)."""
    rows = []
    for dataset, pair in pairs(args):
        raw = load_raw(pair.pca, [*pair.amplify, *args.overrides])
        n = validate_config(raw).data.train_per_client
        if n is None:
            raise SystemExit(f"configs/{pair.pca} sets no data.train_per_client")
        per_seed = []
        for seed in seeds(args):
            results = {"adept-pca (n)": run_fedkin(raw, "adept-pca", seed)}
            for k in K_GRID:
                capped = deep_merge(raw, {"data": {"train_per_client": round(k * n)}})
                try:
                    results[f"local-pca (k={k:g})"] = exact_pca(capped, seed)["local-pca"]
                except DataError:  # a client holds fewer than k·n samples: the grid ends here
                    break
            _progress(args, dataset, seed, {m: r[0] for m, r in results.items()})
            per_seed.append(results)
        out = rows_over_seeds("amplification", dataset, per_seed)
        for metric in ("test_mse", "subspace_error"):
            curve = {r["method"]: r["value"] for r in out if r["metric"] == metric}
            if not curve:
                continue
            target = curve.pop("adept-pca (n)")
            ks = [float(m.split("k=")[1].rstrip(")")) for m in curve]
            out.append(
                {
                    "table": "amplification",
                    "method": "adept-pca",
                    "dataset": dataset,
                    "metric": f"matching_k_{metric}",
                    "value": matching_k(ks, list(curve.values()), target),
                    "std": None,
                    "trainable_params": out[0]["trainable_params"],
                }
            )
        rows += out
    return rows


def matching_k(ks: list[float], values: list[float], target: float) -> float | None:
    """The smallest k at which the decreasing-in-k curve ``values`` reaches ``target``,
    linearly interpolated between grid points; ``ks[0]`` if it starts below, None if never."""
    if values[0] <= target:
        return ks[0]
    for j in range(1, len(ks)):
        if values[j] <= target:
            v0, v1 = values[j - 1], values[j]
            return ks[j - 1] + (ks[j] - ks[j - 1]) * (v0 - target) / (v0 - v1)
    return None


def headroom(args: argparse.Namespace) -> list[Row]:
    """How much collaboration can gain at all: the test MSE of the PCA of S_i + λ·S̄ (S_i the
    client's, S̄ the mean of all clients' second-moment matrices (1/n) Σ x xᵀ) for λ on a grid,
    λ = 0 local and λ → ∞ global PCA, at n and 4n training samples per client. The best λ is
    chosen on test data: an oracle bound for reading the other tables, not a method."""
    rows = []
    for dataset, pair in pairs(args):
        base = load_raw(pair.pca, [*pair.amplify, *args.overrides])
        n = validate_config(base).data.train_per_client
        for size in (n, 4 * n) if n else ():
            raw = deep_merge(base, {"data": {"train_per_client": size}})
            cfg = validate_config({**raw, "seed": 0})
            ds, k = build_dataset(cfg.data, 0), cfg.model.rank
            xs = [ds.client_train(i)[0].flatten(1).double() for i in range(ds.num_clients)]
            second = [x.T @ x / len(x) for x in xs]
            pooled = sum(second) / len(second)
            for lam in LAMBDAS:
                bases = [torch.linalg.eigh(s + lam * pooled).eigenvectors[:, -k:] for s in second]
                rows.append(
                    {
                        "table": "headroom",
                        "method": f"pca(S_i + {lam:g}·S̄)",
                        "dataset": f"{dataset}, n={size}",
                        "metric": "test_mse",
                        "value": basis_scores(ds, bases)["test_mse"],
                        "std": None,
                        "trainable_params": int(bases[0].numel()),
                    }
                )
    return rows


LAMBDAS = (0.0, 0.1, 0.3, 1.0, 3.0, 10.0, 1e6)

#: ``--table`` name → builder(args) → rows (``args``: the parsed options ``datasets``,
#: ``seeds``, ``overrides``, ``json``). ``table2`` (per-client KID of personalized diffusion
#: models on digits) is :func:`fedkin.bench.diffusion.generative_table2`, with the default
#: settings of ``fedkin bench diffusion`` (which takes its options).
TABLES: dict[str, Callable[[argparse.Namespace], list[Row]]] = {
    "table1": table1,
    "amplification": amplification,
    "headroom": headroom,
    "table2": generative_table2,
}


def markdown(rows: list[Row]) -> str:
    """One Markdown table per (table, dataset): methods × metrics, mean ± std over seeds."""
    parts = []
    for table, dataset in dict.fromkeys((r["table"], r["dataset"]) for r in rows):
        sub = [r for r in rows if r["table"] == table and r["dataset"] == dataset]
        metrics = list(dict.fromkeys(r["metric"] for r in sub))
        methods = list(dict.fromkeys(r["method"] for r in sub))
        lines = [
            f"### {table}: {dataset}",
            "",
            "| method | trainable params | " + " | ".join(metrics) + " |",
            "|---" * (len(metrics) + 2) + "|",
        ]
        for m in methods:
            cells = {r["metric"]: r for r in sub if r["method"] == m}
            params = next(iter(cells.values()))["trainable_params"]
            lines.append(
                f"| {m} | {params} | "
                + " | ".join(_cell(cells.get(metric)) for metric in metrics)
                + " |"
            )
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def _cell(row: Row | None) -> str:
    if row is None or row["value"] is None:
        return "–" if row is None else "not reached"
    if not row["std"]:
        return f"{row['value']:.4g}"
    return f"{row['value']:.4f} ± {row['std']:.4f}"


def cmd_generative(args: argparse.Namespace) -> int:
    tables = list(TABLES) if args.table == "all" else [args.table]
    rows = [row for name in tables for row in TABLES[name](args)]
    print(json.dumps(rows, indent=1) if args.json else markdown(rows))
    if args.out:
        command = "fedkin " + shlex.join(sys.argv[1:])
        write_results(rows, command, args.out)
    return 0


def write_results(rows: list[Row], command: str, out: Path) -> None:
    """``out``.json ({"command", "rows"}), ``out``.md (command and tables) and, with
    amplification rows, ``out``_amplification.png (local PCA's test MSE against k)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"command": command, "rows": rows}, indent=1))
    text = f"Command: `{command}`\n\n" + markdown(rows)
    out.with_suffix(".md").write_text(text)
    amp = [r for r in rows if r["table"] == "amplification" and r["metric"] == "test_mse"]
    if amp:
        plot_amplification(amp, out.with_name(out.name + "_amplification.png"))


def plot_amplification(rows: list[Row], path: Path) -> None:
    """Per dataset: local PCA's test MSE against k (k·n samples per client), ADEPT-PCA's (n
    samples) as a horizontal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    fig, axes = plt.subplots(1, len(datasets), figsize=(5 * len(datasets), 4), squeeze=False)
    for ax, dataset in zip(axes[0], datasets, strict=True):
        sub = [r for r in rows if r["dataset"] == dataset]
        local = [r for r in sub if r["method"].startswith("local-pca")]
        ks = [float(r["method"].split("k=")[1].rstrip(")")) for r in local]
        ax.errorbar(
            ks,
            [r["value"] for r in local],
            [r["std"] for r in local],
            marker="o",
            label="local PCA, k·n samples per client",
        )
        adept = next(r for r in sub if r["method"] == "adept-pca (n)")
        ax.axhline(adept["value"], color="C3", label="ADEPT-PCA, n samples per client")
        k = matching_k(ks, [r["value"] for r in local], adept["value"])
        if k is not None:
            ax.axvline(k, color="C3", linestyle=":", label=f"matching k = {k:.2f}")
        ax.set(xlabel="k", ylabel="test MSE (mean over clients)", title=dataset)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def register_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generative",
        help="ADEPT vs local and global: reconstruction table, sample amplification",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--table", choices=[*TABLES, "all"], default="all", help="table to build")
    p.add_argument("--datasets", nargs="+", help=f"subset of {', '.join(DATASETS)} (default: all)")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (mean ± std over them)")
    p.add_argument("--first-seed", type=int, default=0, help="seeds FIRST..FIRST+N-1")
    p.add_argument(
        "--set",
        dest="overrides",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="overrides applied to every config (e.g. rounds=20 for a quick run)",
    )
    p.add_argument("--json", action="store_true", help="print JSON rows instead of tables")
    p.add_argument(
        "--out", type=Path, help="also write OUT.json, OUT.md (with the command) and plots"
    )
    p.set_defaults(func=cmd_generative)
