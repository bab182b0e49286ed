"""Datasets and partitioners: configs in, a :class:`FederatedDataset` out.

``build_dataset(cfg, seed)`` looks the config's ``name`` up in the registry and builds the
dataset with randomness from ``Stream(seed).child("data").child(name)`` only.
``DATASETS`` and ``PARTITIONS`` map names to config classes (for ``fedkin list``).
"""

from __future__ import annotations

from collections.abc import Callable

from pydantic import BaseModel

from fedkin.core.rng import Stream
from fedkin.data.config import (
    DataConfig,
    DigitsConfig,
    DirichletPartition,
    FashionMnistConfig,
    IidPartition,
    PartitionConfig,
    PathologicalPartition,
    QuantitySkewPartition,
    SyntheticConfig,
)
from fedkin.data.digits import build_digits
from fedkin.data.fashion_mnist import build_fashion_mnist
from fedkin.data.federated import FederatedDataset
from fedkin.data.synthetic import build_synthetic

DATASETS: dict[str, type[BaseModel]] = {
    "digits": DigitsConfig,
    "synthetic": SyntheticConfig,
    "fashion-mnist": FashionMnistConfig,
}
PARTITIONS: dict[str, type[BaseModel]] = {
    "iid": IidPartition,
    "dirichlet": DirichletPartition,
    "pathological": PathologicalPartition,
    "quantity": QuantitySkewPartition,
}
_BUILDERS: dict[str, Callable[..., FederatedDataset]] = {
    "digits": build_digits,
    "synthetic": build_synthetic,
    "fashion-mnist": build_fashion_mnist,
}


def build_dataset(cfg: DataConfig, seed: int) -> FederatedDataset:
    """Build the federated dataset described by ``cfg``, deterministically from ``seed``."""
    return _BUILDERS[cfg.name](cfg, Stream(seed).child("data").child(cfg.name))


__all__ = [
    "DATASETS",
    "PARTITIONS",
    "DataConfig",
    "FederatedDataset",
    "PartitionConfig",
    "build_dataset",
]
