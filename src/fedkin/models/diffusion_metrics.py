"""Sample-quality metrics of a client's generator: KID and an FID-style score on the features
of a classifier fedkin trains itself.

Inception-v3 weights (what KID/FID normally use) cannot be downloaded here, and an ImageNet
network would say little about 8×8 digits anyway, so the feature map f is the penultimate layer
(ReLU of the hidden fully connected layer) of a small CNN (:class:`fedkin.models.zoo.CNN`)
trained by :func:`feature_classifier` on the pooled training data of all clients and cached on
disk. Numbers are therefore comparable within fedkin, not with published Inception KIDs.

With real features X = {x_a}_{a≤m} and generated features Y = {y_b}_{b≤n} in ℝ^d:

* KID (Bińkowski et al. 2018) = unbiased MMD² with the kernel k(x, y) = (xᵀy/d + 1)³:

      Σ_{a≠a'} k(x_a, x_a')/(m(m−1)) + Σ_{b≠b'} k(y_b, y_b')/(n(n−1)) − 2 Σ_{a,b} k(x_a, y_b)/(mn),

  over the whole sets (torchmetrics' ``KernelInceptionDistance`` averages it over random
  subsets; with one subset of all m = n samples the two agree, which the tests check).
* FID-style (Heusel et al. 2017) = ‖μ_X − μ_Y‖² + tr(Σ_X + Σ_Y − 2(Σ_X Σ_Y)^{1/2}) with unbiased
  covariances; tr (Σ_X Σ_Y)^{1/2} = Σ √λ over the eigenvalues λ of Σ_X^{1/2} Σ_Y Σ_X^{1/2}.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from fedkin.models.zoo import CNN


class FeatureMap(nn.Module):
    """f(x): the penultimate features of a trained classifier, for images in [0, 1]
    ``[n, C, H, W]`` (or flat rows); usable as torchmetrics' ``feature=`` extractor."""

    def __init__(self, classifier: CNN) -> None:
        super().__init__()
        self.classifier = classifier.eval()

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier.embed(x.to(torch.float32)).to(torch.float64)


def _train_rows(dataset) -> torch.Tensor:
    mask = torch.arange(dataset.train_index.shape[1]) < dataset.train_sizes.unsqueeze(1)
    return dataset.train_index[mask]


def feature_classifier(
    dataset,
    cache_dir: Path,
    channels: tuple[int, ...] = (16, 32),
    hidden: int = 64,
    epochs: int = 30,
    seed: int = 0,
) -> tuple[FeatureMap, float]:
    """The feature map of a CNN trained (Adam, lr 1e-3, batch 64, ``epochs`` epochs) on the
    pooled training rows of every client, and its test accuracy on the pooled test rows. The
    weights are cached in ``cache_dir`` under a hash of the data and the settings."""
    rows = _train_rows(dataset)
    x, y = dataset.x[rows], dataset.y[rows]
    key = hashlib.sha256(x.numpy().tobytes() + y.numpy().tobytes())
    key.update(repr((dataset.name, channels, hidden, epochs, seed)).encode())
    path = Path(cache_dir) / f"features-{dataset.name}-{key.hexdigest()[:16]}.pt"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CNN(dataset.image_shape, list(channels), hidden, dataset.num_classes)
        if path.exists():
            model.load_state_dict(torch.load(path))
        else:
            opt = torch.optim.Adam(model.parameters(), lr=1e-3)
            for _ in range(epochs):
                for idx in torch.randperm(len(x)).split(64):
                    opt.zero_grad()
                    nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
                    opt.step()
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(model.state_dict(), path)
    test = dataset.test_index[
        torch.arange(dataset.test_index.shape[1]) < dataset.test_sizes.unsqueeze(1)
    ]
    with torch.no_grad():
        acc = float((model.eval()(dataset.x[test]).argmax(-1) == dataset.y[test]).float().mean())
    return FeatureMap(model), acc


def kid(real: torch.Tensor, fake: torch.Tensor, degree: int = 3, coef: float = 1.0) -> float:
    """Unbiased MMD² of feature sets ``real`` [m, d] and ``fake`` [n, d], polynomial kernel."""
    x, y = real.to(torch.float64), fake.to(torch.float64)
    d = x.shape[1]

    def k(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a @ b.T / d + coef) ** degree

    m, n = len(x), len(y)
    kxx, kyy = k(x, x), k(y, y)
    xx = (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
    yy = (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
    return float(xx + yy - 2 * k(x, y).mean())


def _sqrtm_psd(s: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh(s)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def fid(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Fréchet distance of Gaussians fitted to ``real`` and ``fake`` features."""
    x, y = real.to(torch.float64), fake.to(torch.float64)
    mx, my = x.mean(0), y.mean(0)
    sx, sy = torch.cov(x.T), torch.cov(y.T)
    root = _sqrtm_psd(sx)
    cross = torch.linalg.eigvalsh(root @ sy @ root).clamp(min=0).sqrt().sum()
    return float((mx - my).pow(2).sum() + sx.trace() + sy.trace() - 2 * cross)
