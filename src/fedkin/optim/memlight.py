"""Memory-light optimizers: diffGrad, SGD-SaI, SWAN and FRUGAL.

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

**SWAN** (Ma, Gong, Scetbon, Meeds, ICML 2025, arXiv 2412.13148): stateless. For a 2-D
gradient G (m × n, torch's out × in layout) GradNorm standardizes each row over the n inputs,
then GradWhitening multiplies by the inverse square root of the Gram matrix (transposed so the
Gram matrix is the smaller side), rescaled to the norm of G̃:

    G̃ = (G − ḡ1ᵀ) ⊘ (s1ᵀ),   ḡ_i = mean_j G_ij,  s_i = (mean_j (G_ij − ḡ_i)²)^{1/2} + ε
    W = (G̃G̃ᵀ)^{-1/2} G̃ · ‖G̃‖_F / ‖(G̃G̃ᵀ)^{-1/2} G̃‖_F          ( = U Vᵀ·√(mn/rank) )

(G̃ = UΣVᵀ, so W is G̃'s polar factor — Muon's orthogonalization of the raw gradient — with
RMS 1, Adam's update scale). (A)^{-1/2} comes from the coupled Newton–Schulz iteration on
A = G̃G̃ᵀ/‖G̃G̃ᵀ‖_F:  Y₀ = A, Z₀ = I,  T = 3I − Z_kY_k,  Y_{k+1} = ½Y_kT,  Z_{k+1} = ½TZ_k,
Z_k → A^{-1/2}. No state on matrices (AdamW on the other parameters, as the paper).

**FRUGAL** (Zmushko, Beznosikov, Takáč, Horváth, ICML 2025, arXiv 2411.07837): gradient
splitting. Every T steps the projector is refreshed from the current gradient's SVD
(GaLore's choice: the top r = ⌈ρ·min(m, n)⌉ left singular vectors P if m ≤ n, else right ones
applied from the right); the state-full part runs Adam in the r-dimensional coordinates, the
residual gets state-free signSGD:

    g_full = PᵀG,   g_free = G − P g_full
    m ← β₁m + (1−β₁)g_full,   v ← β₂v + (1−β₂)g_full²            (r × n, reset at refresh)
    u = P·m̂/(√v̂ + ε) + κ·sign(g_free)

with the bias corrections counted from the last refresh and κ = η_free/η. State: P and the two
moments on r of min(m, n) directions — ρ of Adam's state plus the projector.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field

from fedkin.core.tree import Tree, tree_leaves, tree_map, tree_zeros_like
from fedkin.optim.configs import BaseOptimizerConfig, MatrixOptimizerConfig
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


def grad_norm(g: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """SWAN's GradNorm: each row standardized over its n entries (population std)."""
    centered = g - g.mean(1, keepdim=True)
    return centered / (centered.pow(2).mean(1, keepdim=True).sqrt() + eps)


def grad_whitening(g: torch.Tensor, steps: int = 10, eps: float = 1e-8) -> torch.Tensor:
    """SWAN's GradWhitening: (GGᵀ)^{-1/2}G by coupled Newton–Schulz (on the smaller side),
    rescaled to ‖G‖_F."""
    tall = g.size(0) > g.size(1)
    x = g.T if tall else g
    gram = x @ x.T
    y = gram / gram.norm().clamp(min=eps)
    z = torch.eye(x.size(0), dtype=x.dtype).expand_as(y)
    for _ in range(steps):
        t = 3 * torch.eye(x.size(0), dtype=x.dtype) - z @ y
        y, z = 0.5 * y @ t, 0.5 * t @ z
    w = z @ x
    w = w * (x.norm() / w.norm().clamp(min=eps))
    return w.T if tall else w


def scale_by_swan(ns_steps: int = 10, eps: float = 1e-8) -> GradientTransformation:
    """u = GradWhitening(GradNorm(G)) for every (2-D) leaf; stateless."""

    def update(grads: Tree, state: Tree, params: Tree) -> tuple[Tree, Tree]:
        return tree_map(lambda g: grad_whitening(grad_norm(g, eps), ns_steps, eps), grads), state

    return GradientTransformation(lambda params: {}, update)


def frugal_rank(shape: tuple[int, ...], density: float) -> int:
    """r = ⌈ρ·min(m, n)⌉ state-full directions of an m × n matrix."""
    return max(1, math.ceil(density * min(shape)))


def scale_by_frugal(
    density: float = 0.25,
    period: int = 200,
    free_ratio: float = 1.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
) -> GradientTransformation:
    """FRUGAL(Adam, signSGD) on every (2-D) leaf (see module doc); projector refreshed at
    steps t ≡ 0 (mod ``period``) from the gradient's SVD, moments reset with it."""

    def left(g: torch.Tensor) -> bool:
        return g.size(0) <= g.size(1)

    def shapes(p: torch.Tensor) -> tuple[tuple[int, int], tuple[int, int]]:
        m, n = p.shape
        r = frugal_rank((m, n), density)
        return ((m, r), (r, n)) if m <= n else ((n, r), (m, r))

    def init(params: Tree) -> Tree:
        return {
            "P": tree_map(lambda p: p.new_zeros(shapes(p)[0]), params),
            "m": tree_map(lambda p: p.new_zeros(shapes(p)[1]), params),
            "v": tree_map(lambda p: p.new_zeros(shapes(p)[1]), params),
            "count": torch.zeros((), dtype=torch.int64),
            "t": torch.zeros(()),
        }

    def update(grads: Tree, state: Tree, params: Tree) -> tuple[Tree, Tree]:
        refresh = state["count"] % period == 0
        t = torch.where(refresh, 0.0, state["t"]) + 1
        c1, c2 = 1 - b1**t, 1 - b2**t

        def projector(g: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
            u, _, vh = torch.linalg.svd(g, full_matrices=False)
            new = u[:, : old.size(1)] if left(g) else vh[: old.size(1)].T
            return torch.where(refresh, new, old)

        def down(g: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
            return p.T @ g if left(g) else g @ p

        def up(x: torch.Tensor, p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
            return p @ x if left(g) else x @ p.T

        proj = tree_map(projector, grads, state["P"])
        low = tree_map(down, grads, proj)
        m = tree_map(lambda m, x: torch.where(refresh, 0.0, m).lerp(x, 1 - b1), state["m"], low)
        v = tree_map(
            lambda v, x: (b2 * torch.where(refresh, 0.0, v)).addcmul(x, x, value=1 - b2),
            state["v"],
            low,
        )

        def direction(g, p, x, m, v):
            full = up((m / c1) / ((v / c2).sqrt() + eps), p, g)
            return full + free_ratio * (g - up(x, p, g)).sign()

        u = tree_map(direction, grads, proj, low, m, v)
        return u, {"P": proj, "m": m, "v": v, "count": state["count"] + 1, "t": t}

    return GradientTransformation(init, update)


class SwanConfig(MatrixOptimizerConfig):
    """SWAN: stateless GradNorm + GradWhitening on 2-D weights, AdamW on the rest."""

    name: Literal["swan"] = "swan"
    lr: float = Field(1e-3, gt=0, description="learning rate η of the 2-D weights")
    ns_steps: int = Field(10, ge=1, le=99, description="coupled Newton–Schulz iterations")
    eps: float = Field(1e-8, gt=0, description="ε of the row std and the normalizations")

    def matrix_direction(self) -> GradientTransformation:
        return scale_by_swan(self.ns_steps, self.eps)


class FrugalConfig(MatrixOptimizerConfig):
    """FRUGAL: Adam on a rank-ρ SVD subspace refreshed every T steps, signSGD on the rest."""

    name: Literal["frugal"] = "frugal"
    lr: float = Field(1e-3, gt=0, description="learning rate η of the 2-D weights")
    density: float = Field(
        0.25, gt=0, le=1, description="ρ: state-full fraction of each matrix's min(m, n) directions"
    )
    period: int = Field(200, ge=1, description="T: refresh the projector every T steps")
    free_lr_ratio: float = Field(
        1.0, ge=0, description="κ = η_free/η, the signSGD step on the state-free residual"
    )
    b1: float = Field(0.9, ge=0, lt=1, description="first-moment decay β₁ (state-full part)")
    b2: float = Field(0.999, ge=0, lt=1, description="second-moment decay β₂ (state-full part)")
    eps: float = Field(1e-8, gt=0, description="Adam's denominator ε")

    def matrix_direction(self) -> GradientTransformation:
        return scale_by_frugal(
            self.density, self.period, self.free_lr_ratio, self.b1, self.b2, self.eps
        )


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
