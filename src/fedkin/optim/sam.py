"""Sharpness-aware minimization: SAM (Foret et al., ICLR 2021) and ASAM (Kwon et al., ICML 2021)
as a local-solver variant — two gradient evaluations per step.

With g = ∇L(θ) on the step's batch, the base optimizer steps with the gradient taken at the
worst point of a ρ-ball around θ (first-order):

    SAM:   ε = ρ·g / (‖g‖ + δ)
    ASAM:  ε = ρ·T²g / (‖T g‖ + δ),   T = diag(|θ| + η)     (scale-invariant ball)
    g_SAM = ∇L(θ + ε) on the same batch;   θ ← base_step(θ, g_SAM)

with ‖·‖ the global ℓ2 norm over all leaves and δ = 10⁻¹² (pytorch-optimizer's
``perturb_eps``). η = 0 is pytorch-optimizer's ``SAM(adaptive=True)``; the ASAM paper uses
η = 0.01 and ρ = 0.5. The base optimizer's state is its own (SGD with momentum here, as in the
SAM paper); SAM adds no state, only one parameter-sized temporary (θ + ε) and a second
forward/backward per step.

The perturbation is a field of :class:`~fedkin.optim.optimizer.Optimizer`
(``perturbation(g, θ) -> ε``); :meth:`fedkin.algorithms.base.Algorithm.local_solve` takes the
second gradient at θ + ε. Everything is a pure function of trees, so it vmaps over the cohort.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar, Literal

import torch
from pydantic import Field

from fedkin.core.tree import Tree, tree_leaves, tree_map
from fedkin.optim.configs import SgdConfig
from fedkin.optim.optimizer import Optimizer

PERTURB_EPS = 1e-12


def sam_perturbation(
    rho: float, adaptive: bool = False, eta: float = 0.0
) -> Callable[[Tree, Tree], Tree]:
    """ε(g, θ) of SAM (``adaptive=False``) or ASAM (see module doc)."""

    def perturb(grads: Tree, params: Tree) -> Tree:
        if adaptive:
            scale = tree_map(lambda p: p.abs() + eta, params)
            scaled = tree_map(torch.mul, scale, grads)
        else:
            scaled = grads
        norm = torch.sqrt(sum(t.pow(2).sum() for t in tree_leaves(scaled)))
        factor = rho / (norm + PERTURB_EPS)
        if adaptive:
            return tree_map(lambda s, t: s * t * factor, scale, scaled)
        return tree_map(lambda g: g * factor, grads)

    return perturb


class SamConfig(SgdConfig):
    """SAM: SGD (momentum, weight decay) with the gradient taken at θ + ρ·g/‖g‖."""

    name: Literal["sam"] = "sam"  # type: ignore[assignment]
    sharpness_aware: ClassVar[bool] = True
    rho: float = Field(0.05, gt=0, description="radius ρ of the neighbourhood")

    def perturbation(self) -> Callable[[Tree, Tree], Tree]:
        return sam_perturbation(self.rho)

    def build(self) -> Optimizer:
        return super().build()._replace(perturbation=self.perturbation())


class AsamConfig(SamConfig):
    """ASAM: adaptive SAM, the ball scaled by T = |θ| + η."""

    name: Literal["asam"] = "asam"  # type: ignore[assignment]
    rho: float = Field(0.5, gt=0, description="radius ρ of the (scaled) neighbourhood")
    eta: float = Field(0.01, ge=0, description="η in T = |θ| + η (0: pytorch-optimizer's form)")

    def perturbation(self) -> Callable[[Tree, Tree], Tree]:
        return sam_perturbation(self.rho, adaptive=True, eta=self.eta)
