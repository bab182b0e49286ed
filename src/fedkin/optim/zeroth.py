"""Zeroth-order (SPSA) gradient estimates from seeds: MeZO (Malladi et al. 2023) and
FedKSeed's seed pool (Qin et al. 2024).

For a direction z ~ N(0, I) regenerated from a seed,

    p = (L(θ + εz) − L(θ − εz)) / (2ε),     ĝ = p·z,      E[ĝ] → ∇L (ε → 0),

two forward passes and no backward: memory is that of inference plus z (MeZO perturbs in place
to avoid even that copy; here trees are immutable, so θ ± εz are temporaries of one parameter
size each). z is counter-based (:func:`fedkin.core.rng.normal` of (seed, index, leaf,
element)), so a seed index — not z — is what needs to be stored or sent, and the same z is
rebuilt on any engine or machine. FedKSeed restricts the seeds to a pool of K shared indices:
a client's local ZO-SGD trajectory Δ = −η Σ_s p_s z_{k_s} is then the vector Σ_k c_k z_k
with c_k = −η Σ_{s: k_s = k} p_s, so (index, scalar) pairs reconstruct it exactly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fedkin.core.rng import normal
from fedkin.core.tree import Tree, tree_add, tree_leaves, tree_map


def seed_direction(params: Tree, seed: int, index: torch.Tensor | int) -> Tree:
    """z(index) ~ N(0, I) shaped like ``params`` (counter-based; ``index`` may be batched)."""
    leaf = iter(range(len(tree_leaves(params))))

    def draw(v: torch.Tensor) -> torch.Tensor:
        z = normal(seed, index, next(leaf), torch.arange(v.numel()))
        return z.reshape(v.shape).to(v.dtype)

    return tree_map(draw, params)


def spsa_scalar(
    loss: Callable[[Tree], torch.Tensor], params: Tree, z: Tree, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """p = (L(θ + εz) − L(θ − εz))/(2ε), the projected gradient along z (two forwards), and
    the mean of the two losses (≈ L(θ))."""
    plus = loss(tree_add(params, z, eps))
    minus = loss(tree_add(params, z, -eps))
    return (plus - minus) / (2 * eps), (plus + minus) / 2


def reconstruct(params: Tree, seed: int, scalars: torch.Tensor) -> Tree:
    """Σ_k c_k z_k over the pool (``scalars`` = c, one per pool index; zeros are skipped)."""
    total = tree_map(torch.zeros_like, params)
    for k in torch.nonzero(scalars).flatten().tolist():
        total = tree_add(total, seed_direction(params, seed, k), scalars[k])
    return total
