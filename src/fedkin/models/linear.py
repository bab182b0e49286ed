"""Linear dimensionality-reduction models (reconstruction task): x ↦ x̂ with x's shape.

* :class:`LinearAutoencoder` — x̂ = D(E x + b_E) + b_D with a k-dimensional code and no
  activation (ADEPT's ``Autoencoder``). Its optimum under the squared reconstruction error
  spans the top-k principal subspace of the (centred, with biases) data (Baldi & Hornik 1989).
* :class:`PcaProjector` — x̂ = U Uᵀ x with a basis U ∈ ℝ^{d×k} (orthonormal at init; ADEPT-PCA
  keeps it on the Stiefel manifold St(d, k) = {U : UᵀU = I}). For orthonormal U the batch
  loss (1/B) Σ_b ‖x_b − UUᵀx_b‖² = tr S − tr(Uᵀ S U) with S = (1/B) Σ_b x_b x_bᵀ, so minimizing
  it is PCA.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn


class LinearAutoencoder(nn.Module):
    """x̂ = decoder(encoder(flatten(x))), both linear, reshaped to x's shape."""

    #: maps x to a reconstruction x̂ (what reconstruction algorithms such as ADEPT require)
    reconstructs = True

    def __init__(self, in_features: int, latent: int, bias: bool) -> None:
        super().__init__()
        self.encoder = nn.Linear(in_features, latent, bias=bias)
        self.decoder = nn.Linear(latent, in_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x.flatten(1))).reshape(x.shape)


class PcaProjector(nn.Module):
    """x̂ = U Uᵀ flatten(x) for the basis parameter ``basis`` = U ``[d, k]``."""

    reconstructs = True

    def __init__(self, in_features: int, rank: int) -> None:
        super().__init__()
        if rank > in_features:
            from fedkin.core.errors import ConfigError

            raise ConfigError(f"model.rank: {rank} exceeds the feature dimension {in_features}")
        q, _ = torch.linalg.qr(torch.randn(in_features, rank))
        self.basis = nn.Parameter(q)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1)
        return (flat @ self.basis @ self.basis.T).reshape(x.shape)


class _ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LinearAeConfig(_ModelConfig):
    """Linear autoencoder (reconstruction task, e.g. ``algorithm.name=adept-ae``)."""

    name: Literal["linear-ae"] = "linear-ae"
    latent: int = Field(10, gt=0, description="code dimension k (ADEPT: 10 MNIST, 20 FMNIST)")
    bias: bool = Field(True, description="biases in encoder and decoder (as ADEPT's code)")

    def build(self, feature_shape: tuple[int, ...], image_shape, num_classes: int) -> nn.Module:
        return LinearAutoencoder(math.prod(feature_shape), self.latent, self.bias)


class PcaConfig(_ModelConfig):
    """PCA projector x̂ = UUᵀx (reconstruction task, e.g. ``algorithm.name=adept-pca``)."""

    name: Literal["pca"] = "pca"
    rank: int = Field(5, gt=0, description="number of principal components k")

    def build(self, feature_shape: tuple[int, ...], image_shape, num_classes: int) -> nn.Module:
        return PcaProjector(math.prod(feature_shape), self.rank)
