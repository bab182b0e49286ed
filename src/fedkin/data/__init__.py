"""Datasets and partitioners: configs in, a :class:`FederatedDataset` out.

``build_dataset(cfg, seed)`` looks the config's ``name`` up in the dataset registry and builds
the dataset with randomness from ``Stream(seed).child("data").child(name)`` only; the train
rows are then cut to ``data.train_per_client`` per client (``"train-cap"`` child stream) and a
validation split (``data.validation_fraction``) is carved from them with the ``"validation"``
child stream.
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
    LinearGaussianConfig,
    PartitionConfig,
    PathologicalPartition,
    QuantitySkewPartition,
    SyntheticConfig,
)
from fedkin.data.digits import build_digits
from fedkin.data.fashion_mnist import build_fashion_mnist
from fedkin.data.federated import FederatedDataset
from fedkin.data.linear_gaussian import build_linear_gaussian
from fedkin.data.local_files import LocalFilesConfig, build_local_files
from fedkin.data.synthetic import build_synthetic
from fedkin.registry import DATASET_REGISTRY, register_dataset

register_dataset(DigitsConfig, build_digits)
register_dataset(SyntheticConfig, build_synthetic)
register_dataset(FashionMnistConfig, build_fashion_mnist)
register_dataset(LinearGaussianConfig, build_linear_gaussian)
register_dataset(LocalFilesConfig, build_local_files)
DATASETS = DATASET_REGISTRY
PARTITIONS: dict[str, type[BaseModel]] = {
    "iid": IidPartition,
    "dirichlet": DirichletPartition,
    "pathological": PathologicalPartition,
    "quantity": QuantitySkewPartition,
}


def build_dataset(cfg: DataConfig, seed: int) -> FederatedDataset:
    """Build the federated dataset described by ``cfg``, deterministically from ``seed``
    (the train cap and the validation split have their own streams, so they leave the
    partition unchanged; dataset configs without ``train_per_client`` or
    ``validation_fraction``, e.g. from plugins, get neither)."""
    data = Stream(seed).child("data")
    dataset = DATASET_REGISTRY.build(cfg, data.child(cfg.name))
    cap = getattr(cfg, "train_per_client", None)
    if cap is not None:
        dataset = dataset.with_train_cap(cap, data.child("train-cap"))
    fraction = getattr(cfg, "validation_fraction", 0.0)
    if fraction > 0:
        dataset = dataset.with_validation(fraction, data.child("validation"))
    return dataset


__all__ = [
    "DATASETS",
    "PARTITIONS",
    "DataConfig",
    "FederatedDataset",
    "PartitionConfig",
    "build_dataset",
]
