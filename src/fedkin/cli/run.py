"""`fedkin run`: run one experiment (the built-in default without arguments) or resume one."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

from fedkin.core.errors import NonFiniteModelError, UserError

EPILOG = """examples:
  fedkin run                                   the built-in default (digits, 100 clients, FedAvg)
  fedkin run configs/digits_dirichlet.yaml rounds=50 algorithm.name=fedprox algorithm.mu=0.1
  fedkin run --resume runs/20261123-120000-default
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


def _split_items(items: list[str]) -> tuple[str | None, list[str]]:
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


def prepare_run_dir(config_name: str, out: Path | None) -> Path:
    from fedkin.experiment import CHECKPOINT

    if out is None:
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        out = Path("runs") / f"{stamp}-{config_name}"
    if (out / CHECKPOINT).exists():
        raise UserError(f"{out} already holds a run; continue it with `fedkin run --resume {out}`")
    out.mkdir(parents=True, exist_ok=True)
    return out


def cmd_run(args: argparse.Namespace) -> int:
    from fedkin.config import dump_config, load_config
    from fedkin.experiment import CHECKPOINT, Experiment
    from fedkin.tracking import (
        SUMMARY,
        ConsoleTracker,
        JsonlTracker,
        PlotTracker,
        truncate_records,
    )

    if args.resume:
        if args.items or args.out:
            raise UserError("--resume takes only the run directory (its config.yaml is reused)")
        run_dir = args.resume
        if not (run_dir / CHECKPOINT).exists():
            raise UserError(f"{run_dir} has no {CHECKPOINT}; nothing to resume")
        config = load_config(run_dir / "config.yaml")
    else:
        path, overrides = _split_items(args.items)
        config = load_config(path, overrides)
        run_dir = prepare_run_dir(config.name, args.out)
        (run_dir / "config.yaml").write_text(dump_config(config))

    experiment = Experiment(config, run_dir)
    if args.resume:
        experiment.load_checkpoint(run_dir)
        truncate_records(run_dir, experiment.round)
        if experiment.round >= config.rounds and (run_dir / SUMMARY).exists():
            print(f"{run_dir} is complete ({experiment.round} rounds).", file=sys.stderr)
            return 0

    console = ConsoleTracker()
    trackers = [JsonlTracker(run_dir), PlotTracker(run_dir)]
    if not args.quiet:
        trackers.insert(0, console)
    try:
        summary = experiment.run(run_dir, trackers)
    except KeyboardInterrupt:
        if not args.quiet:
            console.abort()
        print(
            f"fedkin: interrupted after round {experiment.round}; the last checkpoint is in "
            f"{run_dir}. Continue with: fedkin run --resume {run_dir}",
            file=sys.stderr,
        )
        return 130
    except NonFiniteModelError as err:
        if not args.quiet:
            console.abort()
        print(f"fedkin: error: {err} Run directory: {run_dir}", file=sys.stderr)
        return 1
    if args.quiet:
        print(json.dumps(summary, indent=2))
    else:
        console.console.print(
            f"written: {run_dir}/ (config.yaml, metrics.jsonl, summary.json, checkpoint.pt, "
            "metrics.png)"
        )
    return 0
