"""Memory-light optimizers: diffGrad and SGD-SaI.

**diffGrad** (Dubey et al. 2019), in pytorch-optimizer's form (the Adam paper's ε̂ placement):

    m ← β₁m + (1−β₁)g,  v ← β₂v + (1−β₂)g²,  ξ = sigmoid(|g_prev − g|)  (g_prev = 0 at t = 1)
    u = (√(1−β₂ᵗ)/(1−β₁ᵗ))·ξ⊙m / (√(v + 10⁻¹⁵) + ε)

3 states (m, v, g_prev): 12 B/param of state in fp32.

**SGD-SaI** (Xu et al. 2024, "No More Adam", official code ``sgd_sai.py``): each parameter
tensor p gets a fixed learning-rate scale from its gradient signal-to-noise ratio at the first
step, gsnr_p = ‖g_p‖₂/(std(g_p) + ε), normalized by the largest over all tensors; then SGD with
momentum (buffer initialized to the first gradient):

    buf ← g (t = 1),  buf ← μ·buf + (1−μ)·g (t > 1);   u = (gsnr_p / max_q gsnr_q)·buf

with decoupled weight decay in the config. 1 state + 1 scalar per tensor: 4 B/param.
pytorch-optimizer's ``SGDSaI`` differs (no division by the maximum, a zero-initialized buffer,
‖g‖ alone for 1-D tensors), so learning rates do not transfer between the two.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from fedkin.core.tree import Tree, tree_leaves, tree_map, tree_zeros_like
from fedkin.optim.configs import BaseOptimizerConfig
from fedkin.optim.transform import GradientTransformation, add_decayed_weights, chain


def scale_by_diffgrad(
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8
) -> GradientTransformation:
    """diffGrad's direction (see module doc)."""

    def init(params: Tree) -> Tree:
        zeros = tree_zeros_like(params)
        return {"m": zeros, "v": zeros, "g": zeros, "t": torch.zeros(())}

    def update(grads: Tree, state: Tree, params: Tree) -> tuple[Tree, Tree]:
        t = state["t"] + 1
        m = tree_map(lambda m, g: m.lerp(g, 1 - b1), state["m"], grads)
        v = tree_map(lambda v, g: (b2 * v).addcmul(g, g, value=1 - b2), state["v"], grads)
        size = (1 - b2**t).sqrt() / (1 - b1**t)

        def direction(m, v, g, prev):
            friction = (prev - g).abs().sigmoid()
            return size * (friction * m) / ((v + 1e-15).sqrt() + eps)

        u = tree_map(direction, m, v, grads, state["g"])
        return u, {"m": m, "v": v, "g": grads, "t": t}

    return GradientTransformation(init, update)


def scale_by_sai(momentum: float = 0.9, eps: float = 1e-8) -> GradientTransformation:
    """SGD-SaI's direction (see module doc); the scales are fixed at the first update."""

    def init(params: Tree) -> Tree:
        return {
            "buf": tree_zeros_like(params),
            "scale": tree_map(lambda p: torch.zeros(()), params),
            "t": torch.zeros(()),
        }

    def update(grads: Tree, state: Tree, params: Tree) -> tuple[Tree, Tree]:
        t = state["t"] + 1
        first = t == 1
        gsnr = tree_map(lambda g: g.norm() / (g.std() + eps), grads)
        gmax = torch.stack(tree_leaves(gsnr)).max()
        scale = tree_map(lambda s, old: torch.where(first, s / gmax, old), gsnr, state["scale"])
        buf = tree_map(
            lambda b, g: torch.where(first, g, momentum * b + (1 - momentum) * g),
            state["buf"],
            grads,
        )
        u = tree_map(lambda s, b: s * b, scale, buf)
        return u, {"buf": buf, "scale": scale, "t": t}

    return GradientTransformation(init, update)


class DiffGradConfig(BaseOptimizerConfig):
    """diffGrad: Adam with a per-coordinate friction sigmoid(|Δg|) (pytorch-optimizer's form)."""

    name: Literal["diffgrad"] = "diffgrad"
    lr: float = Field(1e-3, gt=0, description="learning rate η (peak value under a schedule)")
    b1: float = Field(0.9, ge=0, lt=1, description="first-moment decay β₁")
    b2: float = Field(0.999, ge=0, lt=1, description="second-moment decay β₂")
    eps: float = Field(1e-8, gt=0, description="denominator ε")

    def direction(self) -> GradientTransformation | None:
        return scale_by_diffgrad(self.b1, self.b2, self.eps)


class SgdSaiConfig(BaseOptimizerConfig):
    """SGD-SaI: SGD with momentum, per-tensor lr scales from the gradient SNR at step 1."""

    name: Literal["sgd-sai"] = "sgd-sai"
    lr: float = Field(1e-2, gt=0, description="learning rate η (peak value under a schedule)")
    momentum: float = Field(0.9, ge=0, lt=1, description="momentum μ (EMA form)")
    eps: float = Field(1e-8, gt=0, description="ε in ‖g‖/(std(g) + ε)")
    weight_decay: float = Field(1e-2, ge=0, description="decoupled weight decay λ")

    def direction(self) -> GradientTransformation | None:
        return chain(scale_by_sai(self.momentum, self.eps), add_decayed_weights(self.weight_decay))
