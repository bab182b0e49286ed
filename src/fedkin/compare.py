"""Compare algorithms on the same partitions and seeds: runs, a Markdown table, JSON and plots.

For every seed s, every algorithm runs on the dataset partition that seed s produces, so all
algorithms of a seed see identical clients, splits, cohorts and batches. Final-evaluation
metrics are reported as mean ± std over seeds. Each (algorithm, seed) is an ordinary run
directory under ``<out>/runs/``: finished runs are reused and interrupted ones resumed, so an
interrupted comparison continues where it stopped.

A comparison config is an experiment config plus an optional ``compare`` section:

    compare:
      algorithms: [fedavg, local, ditto]
      seeds: 3
      algorithm_options: {ditto: {lam: 0.5}}
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from fedkin.algorithms import ALGORITHMS
from fedkin.config import (
    CompareSection,
    deep_merge,
    parse_overrides,
    read_yaml,
    validate_config,
    with_plugins,
)
from fedkin.core.errors import ConfigError
from fedkin.experiment import CHECKPOINT
from fedkin.registry import ALGORITHM_REGISTRY
from fedkin.runs import execute, new_run, read_summary, resume_run
from fedkin.tracking import read_records

#: (summary key, column title) of the comparison table.
COLUMNS = [
    ("personal_acc_mean", "personal acc (mean)"),
    ("personal_acc_weighted", "personal acc (weighted)"),
    ("personal_acc_p10", "personal acc (p10)"),
    ("personal_acc_std", "std over clients"),
    ("global_acc_weighted", "global model acc"),
    ("new_acc_mean", "new-client acc"),
]


def plan(
    path: str | None,
    overrides: list[str],
    algorithms: list[str] | None,
    seeds: int | None,
    plugins: list[str] | None = None,
) -> tuple[dict[str, Any], CompareSection]:
    """Split a comparison config into the shared experiment dict and the compare section;
    ``plugins`` are added to the config's (every run records them in its config.yaml)."""
    raw = deep_merge(read_yaml(path) if path else {}, parse_overrides(overrides))
    raw = with_plugins(raw, plugins or [])
    section = validate_config(raw).compare or CompareSection()
    raw.pop("compare", None)
    if algorithms:
        section.algorithms = algorithms
    if seeds:
        section.seeds = seeds
    unknown = [a for a in section.algorithms if a not in ALGORITHMS]
    if unknown:
        raise ConfigError(
            f"--algorithms: unknown {', '.join(unknown)}; allowed: {', '.join(ALGORITHMS)} "
            f"({ALGORITHM_REGISTRY.hint})"
        )
    return raw, section


def run_config(base: dict[str, Any], section: CompareSection, algorithm: str, seed: int):
    raw = dict(base)
    raw["algorithm"] = {"name": algorithm, **section.algorithm_options.get(algorithm, {})}
    raw["seed"] = seed
    raw["name"] = f"{base.get('name', 'compare')}-{algorithm}-s{seed}"
    return validate_config(raw)


def run_all(
    base: dict[str, Any], section: CompareSection, out: Path, progress: bool = True
) -> dict[str, list[dict[str, Any]]]:
    """Run (or reuse/resume) every (algorithm, seed); returns summaries per algorithm."""
    results: dict[str, list[dict[str, Any]]] = {}
    for algorithm in section.algorithms:
        for seed in range(section.seeds):
            config = run_config(base, section, algorithm, seed)
            run_dir = out / "runs" / f"{algorithm}-seed{seed}"
            summary = read_summary(run_dir)
            if summary is None or summary.get("rounds", 0) < config.rounds:
                has_ckpt = (run_dir / CHECKPOINT).exists()
                experiment = resume_run(run_dir) if has_ckpt else new_run(config, run_dir)
                summary = execute(experiment, run_dir, progress=progress)
            results.setdefault(algorithm, []).append({**summary, "run_dir": str(run_dir)})
    return results


def aggregate(results: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Mean and std over seeds of every table column, sorted by personal accuracy."""
    rows = []
    for algorithm, runs in results.items():
        row: dict[str, Any] = {"algorithm": algorithm, "seeds": len(runs)}
        for key, _ in COLUMNS:
            values = [r[key] for r in runs if key in r]
            if values:
                row[key] = {
                    "mean": statistics.fmean(values),
                    "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                }
        rows.append(row)
    rows.sort(key=lambda r: -r.get("personal_acc_mean", {"mean": 0})["mean"])
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    header = "| algorithm | " + " | ".join(title for _, title in COLUMNS) + " |"
    lines = [header, "|---" * (len(COLUMNS) + 1) + "|"]
    for row in rows:
        cells = [
            f"{100 * row[k]['mean']:.2f} ± {100 * row[k]['std']:.2f}" if k in row else "–"
            for k, _ in COLUMNS
        ]
        lines.append(f"| {row['algorithm']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, list[dict[str, Any]]], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(8, 5))
    for index, (algorithm, runs) in enumerate(results.items()):
        color = plt.cm.tab20(index % 20)
        curves = []
        for r in runs:
            evals = [e for e in read_records(Path(r["run_dir"])) if e["kind"] == "eval"]
            curves.append([(e["round"], e["personal_acc_mean"]) for e in evals])
        n = min(len(c) for c in curves)
        rounds = [p[0] for p in curves[0][:n]]
        acc = np.array([[p[1] for p in c[:n]] for c in curves])
        style = "-" if index < 10 else "--"
        ax.plot(rounds, acc.mean(0), style, color=color, label=algorithm)
        ax.fill_between(
            rounds, acc.mean(0) - acc.std(0), acc.mean(0) + acc.std(0), color=color, alpha=0.15
        )
    ax.set(xlabel="round", ylabel="personalized test accuracy (mean over clients)")
    ax.legend(fontsize="small", ncol=2)
    fig.tight_layout()
    curve_path = out / "accuracy_over_rounds.png"
    fig.savefig(curve_path, dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = list(results)
    data = [[a for r in results[n] for a in r.get("personal_acc_by_client", [])] for n in names]
    ax.boxplot(data, tick_labels=names, showmeans=True)
    ax.set(ylabel="per-client personalized accuracy (all seeds)")
    fig.tight_layout()
    dist_path = out / "client_accuracy.png"
    fig.savefig(dist_path, dpi=100)
    plt.close(fig)
    return [curve_path, dist_path]


def write_report(
    results: dict[str, list[dict[str, Any]]], out: Path, command: str
) -> tuple[str, list[Path]]:
    rows = aggregate(results)
    table = markdown_table(rows)
    first = next(iter(results.values()))[0]
    config = read_yaml(Path(first["run_dir"]) / "config.yaml")
    config.pop("algorithm", None)
    config.pop("seed", None)
    text = (
        f"# fedkin compare\n\nCommand: `{command}`\n\n"
        f"Rounds: {first['rounds']}; seeds: {rows[0]['seeds']}; values are mean ± std over seeds "
        "of the final evaluation, in %.\n\n" + table
    )
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(
        json.dumps({"command": command, "config": config, "rows": rows}, indent=2) + "\n"
    )
    return table, plot(results, out)
