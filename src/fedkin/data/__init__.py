"""Datasets and partitioners: configs in, a :class:`FederatedDataset` out.

``build_dataset(cfg, seed)`` looks the config's ``name`` up in the dataset registry and builds
the dataset with randomness from ``Stream(seed).child("data").child(name)`` only.
``DATASETS`` (the registry: built-ins and plugins) and ``PARTITIONS`` map names to config
classes (for ``fedkin list``).
"""

from __future__ import annotations

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
from fedkin.registry import DATASET_REGISTRY, register_dataset

register_dataset(DigitsConfig, build_digits)
register_dataset(SyntheticConfig, build_synthetic)
register_dataset(FashionMnistConfig, build_fashion_mnist)
DATASETS = DATASET_REGISTRY
PARTITIONS: dict[str, type[BaseModel]] = {
    "iid": IidPartition,
    "dirichlet": DirichletPartition,
    "pathological": PathologicalPartition,
    "quantity": QuantitySkewPartition,
}


def build_dataset(cfg: DataConfig, seed: int) -> FederatedDataset:
    """Build the federated dataset described by ``cfg``, deterministically from ``seed``."""
    return DATASET_REGISTRY.build(cfg, Stream(seed).child("data").child(cfg.name))


__all__ = [
    "DATASETS",
    "PARTITIONS",
    "DataConfig",
    "FederatedDataset",
    "PartitionConfig",
    "build_dataset",
]
