"""ADEPT's hierarchical linear-Gaussian model (the synthetic data of ADEPT's code,
``get_synthetic_data`` in ``adept_ae/main.py``): a shared linear decoder, perturbed per client.

With latent dimension r and data dimension d:

    W ~ N(0, s²)^{d×r},  b ~ N(0, s²)^d                 shared decoder (s = signal_std)
    W_i = W + N(0, g²)^{d×r},  b_i = b + N(0, g²)^d      client i's decoder (g = perturbation_std)
    z ~ N(0, t² I_r),  x = W_i z + b_i (+ N(0, e² I_d))  (t = latent_std, e = noise_std)

and each client's samples are divided by the std of its training samples. So client i's data
lie in (near, with noise) the affine subspace b_i + span(W_i): its true principal subspace is
span(W_i), returned by :func:`client_decoders` for tests. ADEPT's code draws the decoder bias
(``decoder_bias``) and no observation noise (the noise term is commented out there; then
n ≥ r + 1 samples determine the subspace exactly, so ``noise_std > 0`` or fewer samples than
latent dimensions make local estimation hard); it normalizes test data by their own std, here
by the training std.

Randomness: the shared decoder from ``stream.child("shared")``, client i's perturbation and
samples from ``stream.child("client").keys(i)``; so client i's data do not depend on
``num_clients``. Labels are all 0 (one class): the task is reconstruction.
"""

from __future__ import annotations

import numpy as np
import torch

from fedkin.core.rng import Stream
from fedkin.data.config import LinearGaussianConfig
from fedkin.data.federated import FederatedDataset
from fedkin.data.pooled import stream_seed


def _generate(cfg: LinearGaussianConfig, stream: Stream) -> tuple[list[np.ndarray], np.ndarray]:
    """Per-client samples ``[train + test, d]`` (normalized) and decoders ``[m, d, r]``."""
    d, r = cfg.dim, cfg.latent
    shared = np.random.default_rng(stream_seed(stream.child("shared")))
    w = shared.normal(0.0, cfg.signal_std, (d, r))
    b = shared.normal(0.0, cfg.signal_std, d) if cfg.decoder_bias else np.zeros(d)
    n = cfg.train_samples + cfg.test_samples
    xs, ws = [], []
    for seed in stream.child("client").keys(torch.arange(cfg.num_clients)).tolist():
        rng = np.random.default_rng(seed)
        w_i = w + rng.normal(0.0, cfg.perturbation_std, (d, r))
        b_i = b + (rng.normal(0.0, cfg.perturbation_std, d) if cfg.decoder_bias else 0.0)
        z = rng.normal(0.0, cfg.latent_std, (n, r))
        x = z @ w_i.T + b_i + rng.normal(0.0, cfg.noise_std, (n, d))
        xs.append(x / x[: cfg.train_samples].std())
        ws.append(w_i)
    return xs, np.stack(ws)


def build_linear_gaussian(cfg: LinearGaussianConfig, stream: Stream) -> FederatedDataset:
    """The federated dataset: client i's first ``train_samples`` rows train, the rest test."""
    xs, _ = _generate(cfg, stream)
    n = cfg.train_samples + cfg.test_samples
    starts = np.arange(cfg.num_clients) * n
    train = [s + np.arange(cfg.train_samples) for s in starts]
    test = [s + np.arange(cfg.train_samples, n) for s in starts]
    x = torch.as_tensor(np.concatenate(xs), dtype=torch.float32)
    y = torch.zeros(len(x), dtype=torch.int64)
    return FederatedDataset.from_parts("linear-gaussian", x, y, 1, train, test)


def client_decoders(cfg: LinearGaussianConfig, seed: int) -> torch.Tensor:
    """The true decoders W_i ``[num_clients, dim, latent]`` of the dataset that
    ``fedkin.data.build_dataset(cfg, seed)`` builds (its stream): span(W_i) is client i's
    true principal subspace."""
    stream = Stream(seed).child("data").child(cfg.name)
    return torch.as_tensor(_generate(cfg, stream)[1], dtype=torch.float64)
