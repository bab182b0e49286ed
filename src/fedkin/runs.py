"""Run directories: start a run, resume it from its checkpoint, execute it with trackers.

A run directory holds ``config.yaml`` (the fully resolved config), ``metrics.jsonl``,
``summary.json``, ``checkpoint.pt`` (plus ``client_state/`` for disk stores) and
``metrics.png``. Used by ``fedkin run`` and ``fedkin compare``.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path
from typing import Any

from fedkin.config import ExperimentConfig, dump_config, load_config
from fedkin.core.errors import UserError
from fedkin.experiment import CHECKPOINT, Experiment
from fedkin.tracking import SUMMARY, ConsoleTracker, JsonlTracker, PlotTracker, truncate_records


def default_run_dir(name: str) -> Path:
    return Path("runs") / f"{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}-{name}"


#: Files a run writes; a directory holding some of them but no checkpoint is a run that was
#: interrupted before its first checkpoint, and is started over.
RUN_FILES = ("metrics.jsonl", "summary.json", "metrics.png", "config.yaml")


def new_run(config: ExperimentConfig, run_dir: Path) -> Experiment:
    """Create ``run_dir`` (which must not hold a checkpointed run) and the experiment for it."""
    if (run_dir / CHECKPOINT).exists():
        raise UserError(
            f"{run_dir} already holds a run; continue it with `fedkin run --resume {run_dir}`"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in RUN_FILES:
        (run_dir / name).unlink(missing_ok=True)
    shutil.rmtree(run_dir / "client_state", ignore_errors=True)
    (run_dir / "config.yaml").write_text(dump_config(config))
    return Experiment(config, run_dir)


def resume_run(run_dir: Path) -> Experiment:
    """The experiment of ``run_dir`` restored to its last checkpoint (later records dropped)."""
    config_path = run_dir / "config.yaml"
    if config_path.exists() and load_config(config_path).backend.name == "flower":
        raise UserError(
            f"{run_dir}: runs on Flower (backend.name=flower) cannot be resumed: the clients' "
            f"personal states and error-feedback residuals live on their nodes (its {CHECKPOINT} "
            "holds the server side only: Γ, server optimizer, accountant, channel state)"
        )
    if not (run_dir / CHECKPOINT).exists():
        raise UserError(f"{run_dir} has no {CHECKPOINT}; nothing to resume")
    experiment = Experiment.load(run_dir)
    truncate_records(run_dir, experiment.round)
    return experiment


def run(
    config: ExperimentConfig | str | Path | None,
    run_dir: str | Path | None = None,
    *,
    overrides: list[str] | None = None,
    plugins: list[str] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Run an experiment to its end and return its summary: the Python form of ``fedkin run``.

    ``config``: an :class:`ExperimentConfig`, or a YAML path (None: the defaults) with
    ``key=value`` ``overrides`` and ``plugins``. ``run_dir`` defaults to
    ``runs/<date>-<time>-<name>``; it gets the usual files (``config.yaml``,
    ``metrics.jsonl``, ``summary.json``, checkpoint, plot)."""
    if not isinstance(config, ExperimentConfig):
        config = load_config(config, overrides, plugins)
    elif overrides or plugins:
        raise UserError("overrides and plugins apply to a config file; pass them to load_config")
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(config.name)
    if config.backend.name == "flower":
        return run_flower(config, run_dir)
    return execute(new_run(config, run_dir), run_dir, progress=progress)


def run_flower(config: ExperimentConfig, run_dir: Path) -> dict[str, Any]:
    """``backend.name=flower``: the experiment on Flower's Simulation Runtime, one SuperNode
    per client; ``run_dir`` gets config.yaml, metrics.jsonl, summary.json, population.pt and
    the server side's checkpoint.pt. Returns the summary; a run stopped by a guard raises its
    error here, as in-process."""
    from fedkin.backends.flower_app import run_simulation

    if run_dir.exists() and any(run_dir.iterdir()):
        raise UserError(f"{run_dir} is not empty; choose a new --out for a Flower run")
    return run_simulation(config, run_dir, client_cpus=config.backend.client_cpus).summary


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / SUMMARY
    return json.loads(path.read_text()) if path.exists() else None


def execute(experiment: Experiment, run_dir: Path, progress: bool = True) -> dict[str, Any]:
    """Run the remaining rounds with the standard trackers; returns the summary.

    Exceptions (``KeyboardInterrupt``, ``NonFiniteModelError``) propagate after the progress
    display is closed; the checkpoint on disk is the last completed one.
    """
    if experiment.round >= experiment.config.rounds:
        summary = read_summary(run_dir)
        if summary is not None:
            return summary
    console = ConsoleTracker() if progress else None
    trackers = [JsonlTracker(run_dir), PlotTracker(run_dir)]
    if console:
        trackers.insert(0, console)
    try:
        return experiment.run(run_dir, trackers)
    except BaseException:
        if console:
            console.abort()
        raise
