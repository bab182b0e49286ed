"""`fedkin list`: the available datasets, partitioners, models, algorithms, optimizers, and the
channel's aggregators, pre-aggregators, compressors, attacks and client steps."""

from __future__ import annotations

import argparse

from pydantic import BaseModel
from rich.console import Console
from rich.markup import escape
from rich.table import Table


def catalog() -> dict[str, dict[str, type[BaseModel]]]:
    from fedkin.algorithms import ALGORITHMS
    from fedkin.channel import AGGREGATORS, ATTACKS, COMPRESSORS, PREAGGREGATORS
    from fedkin.channel.momentum import MomentumConfig
    from fedkin.data import DATASETS, PARTITIONS
    from fedkin.models import MODELS
    from fedkin.optim import OPTIMIZERS

    return {
        "datasets": dict(DATASETS),
        "partitions": dict(PARTITIONS),
        "models": dict(MODELS),
        "algorithms": {name: cls.Config for name, cls in ALGORITHMS.items()},
        "optimizers": dict(OPTIMIZERS),
        "aggregators": dict(AGGREGATORS),
        "preaggregators": dict(PREAGGREGATORS),
        "compressors": dict(COMPRESSORS),
        "attacks": dict(ATTACKS),
        "client_steps": {"momentum": MomentumConfig},
    }


def options(config_cls: type[BaseModel]) -> list[tuple[str, str, str]]:
    """(key, default, description) for every option of a config class except ``name``."""
    rows = []
    for key, field in config_cls.model_fields.items():
        if key == "name":
            continue
        if field.is_required():
            rows.append((key, "(required)", field.description or ""))
            continue
        default = field.get_default(call_default_factory=True)
        if isinstance(default, BaseModel):
            default = default.model_dump()
        rows.append((key, repr(default), field.description or (config_cls.__doc__ or "").strip()))
    return rows


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "list",
        help="show datasets, partitioners, models, algorithms, optimizers, aggregators, "
        "compressors, attacks, client steps",
    )
    p.add_argument("kind", nargs="?", choices=sorted(catalog_kinds()), help="show only this kind")
    p.set_defaults(func=cmd_list)


def catalog_kinds() -> tuple[str, ...]:
    return tuple(catalog())


def cmd_list(args: argparse.Namespace) -> int:
    console = Console()
    for kind, entries in catalog().items():
        if args.kind and kind != args.kind:
            continue
        table = Table(title=f"{kind} (config key: {_config_key(kind)})", show_lines=True)
        table.add_column("name", style="bold")
        table.add_column("options (key = default: description)")
        for name, cls in entries.items():
            doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
            lines = [doc] if doc else []
            lines += [f"{k} = {d}: {desc}" for k, d, desc in options(cls)]
            table.add_row(name, escape("\n".join(lines)) or "(no options)")
        console.print(table)
    return 0


def _config_key(kind: str) -> str:
    return {
        "datasets": "data.name",
        "partitions": "data.partition.name",
        "models": "model.name",
        "algorithms": "algorithm.name",
        "optimizers": "client.optimizer.name / server.optimizer.name",
        "aggregators": "channel.aggregator.name",
        "preaggregators": "channel.aggregator.pre: [{name: …}]",
        "compressors": "channel.compress.name",
        "attacks": "attack.name",
        "client_steps": "channel.momentum",
    }[kind]
