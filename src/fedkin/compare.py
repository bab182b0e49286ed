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
      tune: {fedprox: {mu: [0.001, 0.01, 0.1, 0.5, 1]}}

``tune`` chooses options without looking at test data: each grid point runs for every seed with
``data.validation_fraction = compare.validation_fraction`` (clients' training data split into
train and validation), the point with the highest mean final ``val_personal_acc_mean`` wins,
and the algorithm's reported runs then train on the full training data with it. The grid, the
validation accuracy of every point and the choice go to ``results.json`` / ``results.md``.
"""

from __future__ import annotations

import itertools
import json
import statistics
from pathlib import Path
from typing import Any

from fedkin.algorithms import ALGORITHMS
from fedkin.config import (
    CompareSection,
    deep_merge,
    dump_config,
    parse_overrides,
    read_yaml,
    validate_config,
    with_plugins,
)
from fedkin.core.errors import ConfigError
from fedkin.core.tasks import CLASSIFICATION, TASKS, Task
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


def task_of(summary: dict[str, Any]) -> Task:
    """The task whose personal score a run's summary (or an aggregated row) reports
    (``fedkin.core.tasks``: ``personal_<score>_mean``); classification if none matches."""
    for task in TASKS:
        if any(k.endswith(f"personal_{task.score_name}_mean") for k in summary):
            return task
    return CLASSIFICATION


def columns_for(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """The table columns for a run's task: :data:`COLUMNS` for classification; the same
    statistics of the task's score (reconstruction: energy captured; diffusion: 1 − denoising
    MSE) and its test loss for the others."""
    task = task_of(summary)
    if task is CLASSIFICATION:
        return COLUMNS
    score, loss = task.score_name, task.loss_name
    return [
        (f"personal_{score}_mean", f"personal {score} (mean)"),
        (f"personal_{score}_p10", f"personal {score} (p10)"),
        (f"personal_{score}_std", "std over clients"),
        (f"personal_{loss}", f"personal test {loss} × 100"),
        (f"global_{score}_mean", f"global model {score}"),
        (f"new_{score}_mean", f"new-client {score}"),
    ]


def tune_keys(summary: dict[str, Any]) -> tuple[str, str]:
    """The final-evaluation keys averaged over seeds for a tuning grid point: the task's
    validation score (higher wins) and its validation loss (the tie-breaker, lower wins)."""
    task = task_of(summary)
    return f"val_personal_{task.score_name}_mean", f"val_personal_{task.loss_name}"


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
    config = validate_config(raw)
    section = config.compare or CompareSection()
    if config.privacy.enabled and not config.privacy.release_diagnostics:
        raise ConfigError(
            "fedkin compare ranks algorithms by accuracy on the clients' test data, which a "
            f"run with privacy.mechanism={config.privacy.mechanism} does not release; set "
            "privacy.release_diagnostics=true to measure utility in simulation (the runs are "
            "then marked not private)"
        )
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
    untuned = [a for a in section.tune if a not in section.algorithms]
    if untuned:
        raise ConfigError(
            f"compare.tune: {', '.join(untuned)} not among the compared algorithms; "
            f"allowed: {', '.join(section.algorithms)}"
        )
    empty = [f"{a}.{k}" for a, grid in section.tune.items() for k, v in grid.items() if not v]
    if empty:
        raise ConfigError(f"compare.tune: empty grid for {', '.join(empty)}; give ≥ 1 value")
    return raw, section


def run_config(
    base: dict[str, Any],
    section: CompareSection,
    algorithm: str,
    seed: int,
    options: dict[str, Any] | None = None,
    validation: bool = False,
):
    """The config of one run; ``options`` override the algorithm's ``algorithm_options`` and
    ``validation`` carves the tuning validation split out of the clients' training data."""
    raw = dict(base)
    raw["algorithm"] = {
        "name": algorithm,
        **section.algorithm_options.get(algorithm, {}),
        **(options or {}),
    }
    raw["seed"] = seed
    raw["name"] = f"{base.get('name', 'compare')}-{algorithm}-s{seed}"
    if validation:
        raw["data"] = {**raw.get("data", {}), "validation_fraction": section.validation_fraction}
    return validate_config(raw)


def run_or_reuse(config, run_dir: Path, progress: bool) -> dict[str, Any]:
    """Summary of ``config`` run in ``run_dir``: reused if finished, else resumed or started.
    A run directory holding a different config (e.g. other tuned options) is an error."""
    stored = run_dir / "config.yaml"
    if stored.exists() and stored.read_text() != dump_config(config):
        raise ConfigError(
            f"{run_dir} holds a run with a different config (options changed since it ran?); "
            "remove it or use another --out"
        )
    summary = read_summary(run_dir)
    if summary is None or summary.get("rounds", 0) < config.rounds:
        has_ckpt = (run_dir / CHECKPOINT).exists()
        experiment = resume_run(run_dir) if has_ckpt else new_run(config, run_dir)
        summary = execute(experiment, run_dir, progress=progress)
    return {**summary, "run_dir": str(run_dir)}


def grid_points(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of the grid's values, in grid order."""
    return [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]


def tune_all(
    base: dict[str, Any], section: CompareSection, out: Path, progress: bool = True
) -> dict[str, dict[str, Any]]:
    """Choose every ``compare.tune`` grid's options on validation data; sets the winners in
    ``section.algorithm_options`` and returns, per algorithm, the grid's validation results
    and the choice."""
    tuning: dict[str, dict[str, Any]] = {}
    for algorithm, grid in section.tune.items():
        points = []
        for options in grid_points(grid):
            label = ",".join(f"{k}={v}" for k, v in options.items())
            runs = [
                run_or_reuse(
                    run_config(base, section, algorithm, seed, options, validation=True),
                    out / "runs" / f"tune-{algorithm}-{label}-seed{seed}",
                    progress,
                )
                for seed in range(section.seeds)
            ]
            keys = tune_keys(runs[0])
            points.append(
                {"options": options, **{k: statistics.fmean(r[k] for r in runs) for k in keys}}
            )
        best = max(points, key=lambda p: (p[keys[0]], -p[keys[1]]))
        section.algorithm_options[algorithm] = {
            **section.algorithm_options.get(algorithm, {}),
            **best["options"],
        }
        tuning[algorithm] = {
            "chosen": best["options"],
            "metric": keys[0],
            "validation_fraction": section.validation_fraction,
            "grid": points,
        }
    return tuning


def run_all(
    base: dict[str, Any], section: CompareSection, out: Path, progress: bool = True
) -> dict[str, list[dict[str, Any]]]:
    """Run (or reuse/resume) every (algorithm, seed); returns summaries per algorithm."""
    results: dict[str, list[dict[str, Any]]] = {}
    for algorithm in section.algorithms:
        for seed in range(section.seeds):
            config = run_config(base, section, algorithm, seed)
            run_dir = out / "runs" / f"{algorithm}-seed{seed}"
            results.setdefault(algorithm, []).append(run_or_reuse(config, run_dir, progress))
    return results


def aggregate(results: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Mean and std over seeds of every table column, sorted by the personal score (accuracy;
    energy captured for reconstruction)."""
    columns = columns_for(next(iter(results.values()))[0])
    rows = []
    for algorithm, runs in results.items():
        row: dict[str, Any] = {"algorithm": algorithm, "seeds": len(runs)}
        for key, _ in columns:
            values = [r[key] for r in runs if key in r]
            if values:
                row[key] = {
                    "mean": statistics.fmean(values),
                    "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                }
        rows.append(row)
    rows.sort(key=lambda r: -r.get(columns[0][0], {"mean": 0})["mean"])
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    columns = columns_for(rows[0])
    header = "| algorithm | " + " | ".join(title for _, title in columns) + " |"
    lines = [header, "|---" * (len(columns) + 1) + "|"]
    for row in rows:
        cells = [
            f"{100 * row[k]['mean']:.2f} ± {100 * row[k]['std']:.2f}" if k in row else "–"
            for k, _ in columns
        ]
        lines.append(f"| {row['algorithm']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, list[dict[str, Any]]], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    score, _ = columns_for(next(iter(results.values()))[0])[0]
    task = task_of({score: 0})
    what = "accuracy" if task is CLASSIFICATION else task.score_name
    fig, ax = plt.subplots(figsize=(8, 5))
    for index, (algorithm, runs) in enumerate(results.items()):
        color = plt.cm.tab20(index % 20)
        curves = []
        for r in runs:
            evals = [e for e in read_records(Path(r["run_dir"])) if e["kind"] == "eval"]
            curves.append([(e["round"], e[score]) for e in evals])
        n = min(len(c) for c in curves)
        rounds = [p[0] for p in curves[0][:n]]
        acc = np.array([[p[1] for p in c[:n]] for c in curves])
        style = "-" if index < 10 else "--"
        ax.plot(rounds, acc.mean(0), style, color=color, label=algorithm)
        ax.fill_between(
            rounds, acc.mean(0) - acc.std(0), acc.mean(0) + acc.std(0), color=color, alpha=0.15
        )
    ax.set(xlabel="round", ylabel=f"personalized test {what} (mean over clients)")
    ax.legend(fontsize="small", ncol=2)
    fig.tight_layout()
    curve_path = out / "accuracy_over_rounds.png"
    fig.savefig(curve_path, dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = list(results)
    data = [[a for r in results[n] for a in r.get("personal_acc_by_client", [])] for n in names]
    ax.boxplot(data, tick_labels=names, showmeans=True)
    ax.set(ylabel=f"per-client personalized {what} (all seeds)")
    fig.tight_layout()
    dist_path = out / "client_accuracy.png"
    fig.savefig(dist_path, dpi=100)
    plt.close(fig)
    return [curve_path, dist_path]


def tuning_markdown(tuning: dict[str, dict[str, Any]]) -> str:
    """One paragraph per tuned algorithm: the grid's validation accuracies and the choice."""
    parts = []
    for algorithm, t in tuning.items():
        cells = ", ".join(f"{_label(p['options'])}: {100 * p[t['metric']]:.2f}" for p in t["grid"])
        parts.append(
            f"- **{algorithm}**: chose {_label(t['chosen'])} by {t['metric']} (mean over seeds, "
            f"%, validation = {t['validation_fraction']:g} of each client's training data): "
            f"{cells}\n"
        )
    return "\nTuned on validation data (never on test data):\n\n" + "".join(parts)


def _label(options: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in options.items())


def write_report(
    results: dict[str, list[dict[str, Any]]],
    out: Path,
    command: str,
    tuning: dict[str, dict[str, Any]] | None = None,
) -> tuple[str, list[Path]]:
    rows = aggregate(results)
    table = markdown_table(rows) + (tuning_markdown(tuning) if tuning else "")
    first = next(iter(results.values()))[0]
    config = read_yaml(Path(first["run_dir"]) / "config.yaml")
    config.pop("algorithm", None)
    config.pop("seed", None)
    privacy = config.get("privacy", {})
    note = (
        f"Privacy: privacy.mechanism={privacy['mechanism']} with privacy.release_diagnostics="
        "true — a simulation measuring utility: the accuracies are evaluated on the clients' "
        "data and released outside the DP mechanism, so these runs are not private.\n\n"
        if privacy.get("mechanism", "none") != "none"
        else ""
    )
    text = (
        f"# fedkin compare\n\nCommand: `{command}`\n\n"
        f"Rounds: {first['rounds']}; seeds: {rows[0]['seeds']}; values are mean ± std over seeds "
        f"of the final evaluation, {'in %' if task_of(first) is CLASSIFICATION else '× 100'}.\n\n"
        + note
        + table
    )
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(
        json.dumps(
            {"command": command, "config": config, "rows": rows, "tuning": tuning or {}}, indent=2
        )
        + "\n"
    )
    return table, plot(results, out)
