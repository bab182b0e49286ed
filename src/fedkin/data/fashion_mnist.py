"""Fashion-MNIST (Xiao et al. 2017) from the four standard IDX files.

Debian/Ubuntu ship them in ``dataset-fashion-mnist`` under ``/usr/share/datasets/fashion-mnist``
(gzip-compressed); uncompressed copies with the same names without ``.gz`` work too. The
60,000 train and 10,000 test images are pooled (70,000), scaled to [0, 1] and stored as
``x [N, 1, 28, 28]``; then partitioned among clients and split per client into train/test.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fedkin.core.errors import DataError
from fedkin.core.rng import Stream
from fedkin.data.config import FashionMnistConfig
from fedkin.data.federated import FederatedDataset
from fedkin.data.idx import read_idx
from fedkin.data.pooled import federate_pool

FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
NUM_CLASSES = 10


def _locate(root: Path) -> dict[str, Path]:
    """Path of each IDX file (``.gz`` preferred), or a DataError listing all missing ones."""
    found, missing = {}, []
    for key, name in FILES.items():
        candidates = [root / f"{name}.gz", root / name]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            missing.append(f"{name}.gz")
        else:
            found[key] = path
    if missing:
        raise DataError(
            f"Fashion-MNIST files not found in {root}: missing {', '.join(missing)} (or the same "
            "names without .gz). Install them with `apt-get install dataset-fashion-mnist` "
            "(into /usr/share/datasets/fashion-mnist) or set data.root to a directory that "
            "holds them."
        )
    return found


def load_fashion_mnist(root: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Pooled train+test images ``uint8 [N, H, W]`` and labels ``int64 [N]`` read from ``root``."""
    paths = _locate(Path(root))
    images, labels = [], []
    for split in ("train", "test"):
        x = read_idx(paths[f"{split}_images"], 3)
        y = read_idx(paths[f"{split}_labels"], 1).astype(np.int64)
        if len(x) != len(y):
            raise DataError(
                f"{paths[f'{split}_images']} holds {len(x)} images but "
                f"{paths[f'{split}_labels']} holds {len(y)} labels; the files do not belong "
                "together — reinstall or re-download them."
            )
        images.append(x)
        labels.append(y)
    if images[0].shape[1:] != images[1].shape[1:]:
        raise DataError(
            f"train images are {images[0].shape[1:]} but test images are {images[1].shape[1:]} "
            f"in {root}; the files do not belong together — reinstall or re-download them."
        )
    y = np.concatenate(labels)
    if len(y) and (y.min() < 0 or y.max() >= NUM_CLASSES):
        raise DataError(
            f"labels in {root} range over [{y.min()}, {y.max()}], expected 0..{NUM_CLASSES - 1}; "
            "these are not Fashion-MNIST label files."
        )
    return np.concatenate(images), y


def build_fashion_mnist(cfg: FashionMnistConfig, stream: Stream) -> FederatedDataset:
    """Fashion-MNIST pooled, optionally subsampled to ``cfg.max_samples``, and partitioned."""
    images, labels = load_fashion_mnist(cfg.root)
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    y = torch.from_numpy(labels)
    if cfg.max_samples is not None and cfg.max_samples < len(y):
        keys = stream.child("subsample").keys(torch.arange(len(y)))
        keep = torch.argsort(keys, stable=True)[: cfg.max_samples].sort().values
        x, y = x[keep], y[keep]
    image_shape = (1, int(x.shape[2]), int(x.shape[3]))
    return federate_pool(
        "fashion-mnist",
        x,
        y,
        NUM_CLASSES,
        image_shape,
        cfg.num_clients,
        cfg.test_fraction,
        cfg.partition,
        stream,
    )
