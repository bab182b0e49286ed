"""`fedkin` command line: one sub-command per job; each module registers its own parser.

A sub-command module exposes ``register(subparsers)``, which adds a parser and sets
``func=callable(args) -> int``. Benchmarks register under ``fedkin bench`` through
``register_bench(bench_subparsers)``. Every command takes ``--plugin MODULE`` (repeatable):
the modules are imported before the command runs (see :mod:`fedkin.plugins`). A
:class:`~fedkin.core.errors.UserError` anywhere below becomes one line on stderr and exit
code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from fedkin.core.errors import UserError
from fedkin.plugins import load_plugins

COMMAND_MODULES = (
    "fedkin.cli.run",
    "fedkin.cli.compare",
    "fedkin.cli.listing",
    "fedkin.estimation.cli",
    "fedkin.privacy.cli",
    "fedkin.cli.flower",
)
BENCH_MODULES = (
    "fedkin.bench.throughput",
    "fedkin.bench.scale",
    "fedkin.estimation.bench",
    "fedkin.bench.privacy",
    "fedkin.bench.peers",
    "fedkin.bench.compile",
    "fedkin.bench.mel",
    "fedkin.bench.quantized",
    "fedkin.bench.optim",
    "fedkin.bench.channel",
    "fedkin.bench.diffusion",
    "fedkin.bench.spire_ablation",
    "fedkin.bench.generative",
)


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(
        prog="fedkin", description="Personalized federated learning and estimation."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    bench = sub.add_parser("bench", help="measure speed and statistical performance")
    bench_sub = bench.add_subparsers(dest="bench", metavar="BENCHMARK", required=True)
    for name in BENCH_MODULES:
        importlib.import_module(name).register_bench(bench_sub)
    _add_plugin_option(parser)
    return parser


def _add_plugin_option(parser: argparse.ArgumentParser) -> None:
    """``--plugin MODULE`` on every command (the leaves of the sub-command tree)."""
    groups = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not groups:
        parser.add_argument(
            "--plugin",
            action="append",
            default=[],
            dest="plugins",
            metavar="MODULE",
            help="import MODULE first (it may register algorithms, datasets, models, "
            "optimizers); repeatable",
        )
    for group in groups:
        for child in dict.fromkeys(group.choices.values()):
            _add_plugin_option(child)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        load_plugins(args.plugins)
        return int(args.func(args) or 0)
    except UserError as err:
        print(f"fedkin: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedkin: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
