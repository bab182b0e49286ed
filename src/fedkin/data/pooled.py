"""Shared pipeline for pooled datasets: partition the pool, split each client, pack.

    labels ──partition(cfg, seed_p)──► client parts ──split_train_test(seed_s)──► train/test
           ──► FederatedDataset (one store, padded index tables)

Seeds come from named children of the dataset's :class:`~fedkin.core.rng.Stream`, so the
partition and the split are independent and reproducible.
"""

from __future__ import annotations

import numpy as np
import torch

from fedkin.core.rng import Stream
from fedkin.data import partition as P
from fedkin.data.config import (
    DirichletPartition,
    IidPartition,
    PartitionConfig,
    PathologicalPartition,
    QuantitySkewPartition,
)
from fedkin.data.federated import FederatedDataset


def stream_seed(stream: Stream) -> int:
    """A 32-bit integer seed for numpy/torch generators, derived from a stream."""
    return int(stream.keys().item())


def partition_pool(
    cfg: PartitionConfig, labels: np.ndarray, num_clients: int, seed: int
) -> list[np.ndarray]:
    """Apply the partitioner named by ``cfg`` to a pool with the given labels."""
    match cfg:
        case IidPartition():
            return P.iid(len(labels), num_clients, seed)
        case DirichletPartition():
            return P.dirichlet(labels, num_clients, cfg.alpha, seed, min_size=cfg.min_size)
        case PathologicalPartition():
            return P.pathological(labels, num_clients, cfg.classes_per_client, seed)
        case QuantitySkewPartition():
            return P.quantity_skew(
                len(labels), num_clients, seed, sigma=cfg.sigma, min_size=cfg.min_size
            )
    raise TypeError(f"unknown partition config {cfg!r}")


def federate_pool(
    name: str,
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    image_shape: tuple[int, int, int] | None,
    num_clients: int,
    test_fraction: float,
    partition: PartitionConfig,
    stream: Stream,
) -> FederatedDataset:
    """Partition a pooled dataset among clients and split every client into train/test."""
    labels = y.numpy()
    parts = partition_pool(partition, labels, num_clients, stream_seed(stream.child("partition")))
    train, test = P.split_train_test(
        labels, parts, test_fraction, stream_seed(stream.child("split"))
    )
    return FederatedDataset.from_parts(name, x, y, num_classes, train, test, image_shape)
