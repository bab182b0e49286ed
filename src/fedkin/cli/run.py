"""`fedkin run`: run one experiment (the built-in default without arguments) or resume one."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from fedkin.core.errors import RunFailure, UserError

if TYPE_CHECKING:
    from fedkin.config import ExperimentConfig

EPILOG = """examples:
  fedkin run                                   the built-in default (digits, 100 clients, FedAvg)
  fedkin run configs/digits_dirichlet.yaml rounds=50 algorithm.name=fedprox algorithm.mu=0.1
  fedkin run --resume runs/20261123-120000-default
  fedkin run --plugin mypackage.plugin algorithm.name=mine   names registered by a plugin
Any config key can be overridden with key=value (dotted paths). `fedkin list` shows datasets,
partitioners, models, algorithms and optimizers with their options."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="run an experiment",
        description="Run a federated experiment and write a run directory "
        "(config.yaml, metrics.jsonl, summary.json, checkpoint.pt, metrics.png).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "items", nargs="*", metavar="CONFIG.yaml | key=value", help="config file and overrides"
    )
    p.add_argument("--out", type=Path, help="run directory (default runs/<date>-<time>-<name>)")
    p.add_argument(
        "--resume", type=Path, metavar="DIR", help="continue the run in DIR from its checkpoint"
    )
    p.add_argument("--quiet", action="store_true", help="no progress display")
    p.set_defaults(func=cmd_run)


def split_items(items: list[str]) -> tuple[str | None, list[str]]:
    path = None
    overrides = []
    for item in items:
        if "=" in item:
            overrides.append(item)
        elif path is None:
            path = item
        else:
            raise UserError(
                f"unexpected argument {item!r}: give one config file and key=value overrides"
            )
    return path, overrides


def cmd_run(args: argparse.Namespace) -> int:
    from fedkin.config import load_config
    from fedkin.experiment import CHECKPOINT
    from fedkin.runs import default_run_dir, execute, new_run, resume_run

    if args.resume:
        if args.items or args.out:
            raise UserError("--resume takes only the run directory (its config.yaml is reused)")
        run_dir = args.resume
        experiment = resume_run(run_dir)
    else:
        path, overrides = split_items(args.items)
        config = load_config(path, overrides, plugins=args.plugins)
        run_dir = args.out or default_run_dir(config.name)
        if config.backend.name == "flower":
            return run_on_flower(config, run_dir, args.quiet)
        experiment = new_run(config, run_dir)
    try:
        summary = execute(experiment, run_dir, progress=not args.quiet)
    except KeyboardInterrupt:
        if (run_dir / CHECKPOINT).exists():
            hint = (
                f"the last checkpoint is in {run_dir}. Continue with: fedkin run --resume {run_dir}"
            )
        else:
            hint = "no checkpoint was written yet; run the same command again to start over"
        print(f"fedkin: interrupted after round {experiment.round}; {hint}", file=sys.stderr)
        return 130
    except RunFailure as err:
        print(f"fedkin: error: {err} Run directory: {run_dir}", file=sys.stderr)
        return 1
    if args.quiet:
        print(json.dumps({k: v for k, v in summary.items() if not k.endswith("_by_client")}))
    else:
        print(
            f"written: {run_dir}/ (config.yaml, metrics.jsonl, summary.json, checkpoint.pt, "
            "metrics.png)",
            file=sys.stderr,
        )
    return 0


def run_on_flower(config: ExperimentConfig, run_dir: Path, quiet: bool) -> int:
    """``backend.name=flower``: see :func:`fedkin.runs.run_flower`."""
    from fedkin.runs import run_flower

    summary = {k: v for k, v in run_flower(config, run_dir).items() if not k.endswith("_by_client")}
    print(json.dumps(summary) if quiet else f"written: {run_dir}/ {json.dumps(summary)}")
    return 0
