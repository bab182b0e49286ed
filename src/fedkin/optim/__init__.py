"""Optimizers as composable gradient transformations (optax style), all pure and vmappable.

* :mod:`~fedkin.optim.transform` — ``GradientTransformation`` (``init``/``update`` → updates),
  ``apply_updates``, ``chain``, ``partition`` and the elementary transformations.
* :mod:`~fedkin.optim.schedules` — step-count schedules η(t).
* :mod:`~fedkin.optim.optimizer` — ``Optimizer`` (``init``/``step`` → new parameters), the
  object algorithms use; ``from_transform``, ``routed``, ``projected``.
* :mod:`~fedkin.optim.alias` — SGD, Adam, AdamW as chains.
* :mod:`~fedkin.optim.configs` — the registered configs (``fedkin list optimizers``).
* :mod:`~fedkin.optim.muon` — Muon and MuonBP (block-periodic orthogonalization).
* :mod:`~fedkin.optim.mada` — AVGrad and MADA (coefficients learned by hyper-gradient).
* :mod:`~fedkin.optim.memlight` — diffGrad, SGD-SaI, SWAN, FRUGAL.
* :mod:`~fedkin.optim.sam` — SAM and ASAM (two gradient evaluations per local step).
* :mod:`~fedkin.optim.precision` — bf16 weights and state, stochastic rounding.
* :mod:`~fedkin.optim.zeroth` — zeroth-order (SPSA) optimizers: MeZO, ZO-SGD, ZO-Adam,
  Sparse MeZO; FedKSeed's seed pool.
"""

from fedkin.optim.alias import adam, adam_transform, adamw, projected_sgd, sgd, sgd_transform
from fedkin.optim.configs import AdamConfig, AdamWConfig, BaseOptimizerConfig, SgdConfig
from fedkin.optim.mada import AvgradConfig, MadaConfig
from fedkin.optim.memlight import DiffGradConfig, FrugalConfig, SgdSaiConfig, SwanConfig
from fedkin.optim.muon import MuonBPConfig, MuonConfig
from fedkin.optim.optimizer import Optimizer, from_transform, projected, routed
from fedkin.optim.sam import AsamConfig, SamConfig
from fedkin.optim.schedules import Schedule, ScheduleConfig
from fedkin.optim.transform import (
    GradientTransformation,
    apply_updates,
    chain,
    label_by_key,
    label_by_ndim,
    partition,
)
from fedkin.optim.zeroth import MezoConfig, SparseMezoConfig, ZoAdamConfig, ZoSgdConfig
from fedkin.registry import OPTIMIZER_REGISTRY, register_optimizer

for _config in (
    SgdConfig,
    AdamConfig,
    AdamWConfig,
    AvgradConfig,
    MadaConfig,
    MuonConfig,
    MuonBPConfig,
    DiffGradConfig,
    SgdSaiConfig,
    SwanConfig,
    FrugalConfig,
    SamConfig,
    AsamConfig,
    MezoConfig,
    ZoSgdConfig,
    ZoAdamConfig,
    SparseMezoConfig,
):
    register_optimizer(_config)

#: An optimizer's config: any registered optimizer (``fedkin.register_optimizer``).
OptimizerConfig = OPTIMIZER_REGISTRY.field
#: name → config class of every registered optimizer (built-ins and plugins).
OPTIMIZERS = OPTIMIZER_REGISTRY

__all__ = [
    "OPTIMIZERS",
    "AdamConfig",
    "AdamWConfig",
    "AsamConfig",
    "AvgradConfig",
    "BaseOptimizerConfig",
    "DiffGradConfig",
    "FrugalConfig",
    "GradientTransformation",
    "MadaConfig",
    "MezoConfig",
    "MuonBPConfig",
    "MuonConfig",
    "Optimizer",
    "OptimizerConfig",
    "SamConfig",
    "Schedule",
    "ScheduleConfig",
    "SgdConfig",
    "SgdSaiConfig",
    "SparseMezoConfig",
    "SwanConfig",
    "ZoAdamConfig",
    "ZoSgdConfig",
    "adam",
    "adam_transform",
    "adamw",
    "apply_updates",
    "chain",
    "from_transform",
    "label_by_key",
    "label_by_ndim",
    "partition",
    "projected",
    "projected_sgd",
    "routed",
    "sgd",
    "sgd_transform",
]
