"""Synthetic(α, β) of the FedProx paper (Li et al. 2020, "Federated Optimization in
Heterogeneous Networks"), following the reference generator in github.com/litian96/FedProx
(``data/synthetic_*/generate_synthetic.py`` and ``data/synthetic_iid/generate_iid.py``).

For client ``k`` (``d = dim``, ``C = num_classes``):

    n_k = ⌊LogNormal(4, 2)⌋ + 50                      (log-mean 4, log-std 2)
    u_k ~ N(0, α²),  B_k ~ N(0, β²)                   (α, β are *standard deviations*)
    W_k ~ N(u_k, 1)^{d×C},  b_k ~ N(u_k, 1)^C          (same u_k for W_k and b_k)
    v_k ~ N(B_k, 1)^d
    x ~ N(v_k, Σ),  Σ = diag(j^{-1.2}), j = 1..d
    y = argmax softmax(xᵀ W_k + b_k) = argmax(xᵀ W_k + b_k)

The paper writes ``N(0, α)``; the reference code calls ``np.random.normal(0, alpha)``, whose
second argument is the standard deviation, and this module follows the code. The two
readings coincide only for α, β ∈ {0, 1}; for Synthetic(0.5, 0.5) the reference draws with
std 0.5 (variance 0.25). ``iid=True`` is the reference Synthetic-IID (``generate_iid.py``):
one shared ``W, b ~ N(0, 1)`` and ``v_k = 0`` for every client; α and β are then ignored
(the general script would use ``v_k = B_k·1``, which is 0 at its IID setting β = 0).

Note that α does not change the data at all: ``u_k`` adds ``u_k·(1 + Σ_j x_j)`` to *every*
logit of client ``k`` alike, so the argmax — the label — is the same for any α (true of the
paper's definition and of the reference code; here the same seed gives identical (x, y) for
every α). Heterogeneity comes from β (feature shift) and the per-client model noise.

Each client's draws use its own generator seeded from ``stream.child("client").keys(k)``,
so client ``k``'s data does not depend on ``num_clients`` and no global RNG is touched.
The natural partition is kept (one generated client = one client); each client is split
into train/test stratified by label (the reference uses a 90/10 random split).
"""

from __future__ import annotations

import numpy as np
import torch

from fedkin.core.rng import Stream
from fedkin.data.config import SyntheticConfig
from fedkin.data.federated import FederatedDataset
from fedkin.data.partition import split_train_test
from fedkin.data.pooled import stream_seed

SIZE_LOG_MEAN, SIZE_LOG_STD, SIZE_OFFSET = 4.0, 2.0, 50


def _client(
    cfg: SyntheticConfig, rng: np.random.Generator, shared: tuple[np.ndarray, np.ndarray] | None
) -> tuple[np.ndarray, np.ndarray]:
    """Features ``[n_k, dim]`` and labels ``[n_k]`` of one client."""
    n = int(rng.lognormal(SIZE_LOG_MEAN, SIZE_LOG_STD)) + SIZE_OFFSET
    if shared is None:
        u = rng.normal(0.0, cfg.alpha)
        mean_x = rng.normal(rng.normal(0.0, cfg.beta), 1.0, cfg.dim)
        w = rng.normal(u, 1.0, (cfg.dim, cfg.num_classes))
        b = rng.normal(u, 1.0, cfg.num_classes)
    else:
        w, b = shared
        mean_x = np.zeros(cfg.dim)
    std_x = np.arange(1, cfg.dim + 1, dtype=np.float64) ** -0.6  # sqrt of j^-1.2
    x = mean_x + std_x * rng.standard_normal((n, cfg.dim))
    return x, np.argmax(x @ w + b, axis=1)


def build_synthetic(cfg: SyntheticConfig, stream: Stream) -> FederatedDataset:
    """Generate Synthetic(α, β) with ``cfg.num_clients`` clients and split each into train/test."""
    shared = None
    if cfg.iid:
        rng = np.random.default_rng(stream_seed(stream.child("shared")))
        shared = (rng.normal(0, 1, (cfg.dim, cfg.num_classes)), rng.normal(0, 1, cfg.num_classes))
    seeds = stream.child("client").keys(torch.arange(cfg.num_clients)).tolist()
    xs, ys = zip(*(_client(cfg, np.random.default_rng(s), shared) for s in seeds), strict=True)
    sizes = np.array([len(y) for y in ys])
    labels = np.concatenate(ys)
    parts = np.split(np.arange(len(labels)), np.cumsum(sizes)[:-1])
    train, test = split_train_test(
        labels, parts, cfg.test_fraction, stream_seed(stream.child("split"))
    )
    return FederatedDataset.from_parts(
        "synthetic",
        torch.as_tensor(np.concatenate(xs), dtype=torch.float32),
        torch.as_tensor(labels, dtype=torch.int64),
        cfg.num_classes,
        train,
        test,
    )
