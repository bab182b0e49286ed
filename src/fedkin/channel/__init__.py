"""The channel's building blocks: aggregation rules, compressors and attacks.

Each entry is a pydantic config (``name`` plus described options) with a ``build`` method,
registered by name like algorithms and optimizers and listed by ``fedkin list``.
"""

from fedkin.channel.aggregators import AGGREGATORS, PREAGGREGATORS, AggregatorConfig

__all__ = ["AGGREGATORS", "PREAGGREGATORS", "AggregatorConfig"]
