"""Priors p(θ | Γ) as penalty terms R(θ; Γ) = −log p(θ | Γ) (up to constants and scaling).

A client's MAP objective is  L_i(θ; D_i) + R(θ; Γ).  Algorithms compose these terms with the
data loss instead of writing their own regularizers.
"""

from __future__ import annotations

import torch

from fedkin.core.tree import Tree, tree_map, tree_sqnorm


def gaussian_penalty(theta: Tree, center: Tree, lam: float | torch.Tensor) -> torch.Tensor:
    """Isotropic Gaussian prior θ ~ N(w, λ⁻¹ I):  R(θ; w) = λ/2 ‖θ − w‖²."""
    return 0.5 * lam * tree_sqnorm(tree_map(torch.sub, theta, center))
