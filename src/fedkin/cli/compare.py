"""`fedkin compare`: several algorithms on the same partitions and seeds."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from fedkin.core.errors import RunFailure


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare",
        help="compare algorithms on the same partitions and seeds",
        description="Run every algorithm for every seed (reusing finished runs and resuming "
        "interrupted ones) and write results.md, results.json and plots.",
    )
    p.add_argument("items", nargs="*", metavar="CONFIG.yaml | key=value")
    p.add_argument("--algorithms", help="comma-separated algorithm names (see `fedkin list`)")
    p.add_argument("--seeds", type=int, help="number of seeds (default 3 or the config's)")
    p.add_argument("--out", type=Path, help="output directory (default runs/compare-<name>)")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    p.set_defaults(func=cmd_compare)


def cmd_compare(args: argparse.Namespace) -> int:
    from fedkin.cli.run import split_items
    from fedkin.compare import plan, run_all, tune_all, write_report
    from fedkin.core.errors import UserError

    if args.seeds is not None and args.seeds < 1:
        raise UserError("--seeds must be at least 1")
    path, overrides = split_items(args.items)
    algorithms = args.algorithms.split(",") if args.algorithms else None
    base, section = plan(path, overrides, algorithms, args.seeds, args.plugins)
    out = args.out or Path("runs") / f"compare-{base.get('name', Path(path or 'default').stem)}"
    out.mkdir(parents=True, exist_ok=True)
    try:
        tuning = tune_all(base, section, out, progress=not args.quiet)
        results = run_all(base, section, out, progress=not args.quiet)
    except KeyboardInterrupt:
        print(
            f"fedkin: interrupted; run the same command again to continue ({out})", file=sys.stderr
        )
        return 130
    except RunFailure as err:
        print(f"fedkin: error: {err}", file=sys.stderr)
        return 1
    command = "fedkin compare " + shlex.join(
        [*args.items, f"--algorithms={','.join(section.algorithms)}", f"--seeds={section.seeds}"]
    )
    table, plots = write_report(results, out, command, tuning)
    print(table)
    print(f"written: {out}/results.md, results.json, {', '.join(p.name for p in plots)}")
    return 0
