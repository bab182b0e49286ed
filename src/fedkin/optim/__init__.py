"""Functional (vmap-able) optimizers."""

from fedkin.optim.functional import (
    OPTIMIZERS,
    AdamConfig,
    Optimizer,
    OptimizerConfig,
    SgdConfig,
    adam,
    sgd,
)

__all__ = ["OPTIMIZERS", "AdamConfig", "Optimizer", "OptimizerConfig", "SgdConfig", "adam", "sgd"]
