"""scikit-learn's bundled handwritten digits: 1797 8x8 images, 10 classes, offline.

Pixel values 0..16 are scaled to [0, 1] by /16 and stored flat (``x [1797, 64]``) with
``image_shape = (1, 8, 8)``. All samples are pooled, partitioned among clients by the
configured partitioner, and split per client into train/test.
"""

from __future__ import annotations

import torch

from fedkin.core.rng import Stream
from fedkin.data.config import DigitsConfig
from fedkin.data.federated import FederatedDataset
from fedkin.data.pooled import federate_pool


def build_digits(cfg: DigitsConfig, stream: Stream) -> FederatedDataset:
    """The digits dataset split among ``cfg.num_clients`` clients."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.as_tensor(bunch.data, dtype=torch.float32) / 16.0
    y = torch.as_tensor(bunch.target, dtype=torch.int64)
    return federate_pool(
        "digits", x, y, 10, (1, 8, 8), cfg.num_clients, cfg.test_fraction, cfg.partition, stream
    )
