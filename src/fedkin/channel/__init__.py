"""The channel's building blocks: aggregation rules, compressors and attacks.

Each entry is a pydantic config (``name`` plus described options) with a ``build(seed)``
method, registered by name like algorithms and optimizers and listed by ``fedkin list``.
"""

from fedkin.channel.aggregators import (
    AGGREGATORS,
    PREAGGREGATORS,
    Aggregator,
    AggregatorConfig,
)
from fedkin.channel.attacks import ATTACKS, Attack, AttackConfig, byzantine_clients
from fedkin.channel.compressors import COMPRESSORS, Compressor, CompressorConfig
from fedkin.channel.trusted import TrustedDirectionConfig

__all__ = [
    "AGGREGATORS",
    "ATTACKS",
    "COMPRESSORS",
    "PREAGGREGATORS",
    "Aggregator",
    "AggregatorConfig",
    "Attack",
    "AttackConfig",
    "Compressor",
    "CompressorConfig",
    "TrustedDirectionConfig",
    "byzantine_clients",
]
