"""AVGrad and MADA (Ozkara et al., ICML 2024, arXiv 2401.08893).

**AVGrad** is Adam whose second moment is the running *average* of the v_t (AMSGrad takes their
maximum):  v̄_t = (v_t + (t−1)·v̄_{t−1})/t,  u = m̂/(√(v̄_t/(1−β₂ᵗ)) + ε).

**MADA** interpolates several adaptive optimizers with coefficients λ = (β₁, β₂, β₃, ρ, c, γ)
and learns λ during training by hyper-gradient descent. As in the authors' code
(amazon-science/mada_optimizer_search, ``gdtuo.Meta.step``), per parameter:

    ĝ   = g + β₃(g − g_prev)
    g̃²  = c·ĝ² + (1−c)·(v + ĝ²·sign(ĝ² − v))          c = 1: Adam, c = 0: Yogi
    m   ← β₁m + (1−β₁)g;   v ← β₂v + (1−β₂)g̃²;   n ← β₃n + (1−β₃)(g − g_prev)   (Adan)
    m_L ← 0.98·m_L + 0.02·g;   u_L = 0.95·m_L + 0.05·g                          (Lion-like)
    v̄   ← (v + (t−1)·v̄)/t
    m̂ = m/(1−β₁ᵗ);   v̂ = (ρ·v + (1−ρ)·v̄)/(1−β₂ᵗ)                      ρ = 1: Adam, 0: AVGrad
    d = γ·(m̂ + β₃n)/(√v̂ + ε) + (1−γ)·sign(u_L)                         γ = 0: sign update

with the code's initial values v = v̄ = 1e-15, n = g₁² (sic), and λ clamped to β₁ ∈ [0.01, 0.99],
β₂ ∈ [0.501, 0.99], β₃ ∈ [0, 0.99], ρ, c, γ ∈ [0, 1]. Adam is the vertex (β₃, c, ρ, γ) =
(0, 1, 1, 1), AVGrad (0, 1, 0, 1), Yogi's second moment (0, 0, 1, 1). (The released code's ρ
interpolates Adam ↔ AVGrad; there is no AMSGrad max.)

**Hyper-gradient** (one step truncated, as the code): θ_t = θ_{t−1} − α·d_{t−1}(λ), so
∂L(θ_t)/∂λ = −α⟨g_t, ∂d_{t−1}/∂λ⟩, with the previous state held fixed (the code detaches it) and
v̄ not differentiated. The Jacobian ∂d/∂λ (6 parameter-sized tensors, by forward mode) is kept
in the state until the next gradient arrives; then λ ← clamp(λ − η_λ ⊙ ∂L/∂λ) before d_t is
computed. Per-coefficient hyper learning rates η_λ default to the code's (β₁, β₂: 5e-4; β₃, ρ,
c, γ: 0.1); all zero pins λ (the limit tests).

Memory: m, v, v̄, n, g_prev, m_L + 6 Jacobian tensors = 12 parameter-sized states (48 B/param
in fp32 on top of the weights) — a server or small-model optimizer.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch.func import jacfwd

from fedkin.core.tree import Tree, tree_leaves, tree_map, tree_zeros_like
from fedkin.optim.configs import BaseOptimizerConfig
from fedkin.optim.transform import GradientTransformation

COEFFICIENTS = ("beta1", "beta2", "beta3", "rho", "c", "gamma")
BOUNDS = {
    "beta1": (0.01, 0.99),
    "beta2": (0.501, 0.99),
    "beta3": (0.0, 0.99),
    "rho": (0.0, 1.0),
    "c": (0.0, 1.0),
    "gamma": (0.0, 1.0),
}
LION_B1, LION_B2 = 0.95, 0.98


def scale_by_avgrad(
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8
) -> GradientTransformation:
    """u = m̂/(√(v̄/(1−β₂ᵗ)) + ε), v̄ the running mean of the Adam second moments v₁ … v_t."""

    def init(params: Tree) -> Tree:
        zeros = tree_zeros_like(params)
        return {"m": zeros, "v": zeros, "vbar": zeros, "t": torch.zeros(())}

    def update(grads: Tree, state: Tree, params: Tree) -> tuple[Tree, Tree]:
        t = state["t"] + 1
        m = tree_map(lambda m, g: b1 * m + (1 - b1) * g, state["m"], grads)
        v = tree_map(lambda v, g: b2 * v + (1 - b2) * g * g, state["v"], grads)
        vbar = tree_map(lambda vb, v: (v + (t - 1) * vb) / t, state["vbar"], v)
        c1, c2 = 1 - b1**t, 1 - b2**t
        u = tree_map(lambda m, vb: (m / c1) / ((vb / c2).sqrt() + eps), m, vbar)
        return u, {"m": m, "v": v, "vbar": vbar, "t": t}

    return GradientTransformation(init, update)


def _direction(
    lam: torch.Tensor,
    t: torch.Tensor,
    g: torch.Tensor,
    s: dict,
    eps: float,
    vbar: torch.Tensor | None = None,
):
    """d_t(λ) and the new state of one leaf from its previous state ``s`` (held fixed).

    ``vbar``: v̄_t to use instead of the one computed from v_t(λ) (to differentiate with v̄
    held fixed, as the authors' code detaches it).
    """
    b1, b2, b3, rho, c, gamma = lam.unbind()
    diff = g - s["g"]
    g_hat = g + b3 * diff
    sq = g_hat * g_hat
    g_tilde_sq = c * sq + (1 - c) * (s["v"] + sq * torch.sign(sq - s["v"]))
    m = b1 * s["m"] + (1 - b1) * g
    v = b2 * s["v"] + (1 - b2) * g_tilde_sq
    n = b3 * s["n"] + (1 - b3) * diff
    if vbar is None:
        vbar = (v + (t - 1) * s["vbar"]) / t
    m_lion = LION_B2 * s["m_lion"] + (1 - LION_B2) * g
    u_lion = LION_B1 * m_lion + (1 - LION_B1) * g
    m_hat = m / (1 - b1**t)
    v_hat = (rho * v + (1 - rho) * vbar) / (1 - b2**t)
    d = gamma * (m_hat + b3 * n) / (v_hat.sqrt() + eps) + (1 - gamma) * torch.sign(u_lion)
    return d, {"m": m, "v": v, "vbar": vbar, "n": n, "g": g, "m_lion": m_lion}


def scale_by_mada(
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.99,
    beta3: float = 0.0,
    rho: float = 1.0,
    c: float = 1.0,
    gamma: float = 1.0,
    eps: float = 1e-6,
    hyper_lr: tuple[float, ...] = (5e-4, 5e-4, 0.1, 0.1, 0.1, 0.1),
) -> GradientTransformation:
    """u = d_t(λ) of MADA, with λ learned by the one-step hyper-gradient (see module doc).

    ``lr`` is α in the hyper-gradient −α⟨g_t, ∂d_{t−1}/∂λ⟩ (the step size applied downstream).
    State: the moments, λ (``lam``, 6 scalars in :data:`COEFFICIENTS` order) and ∂d/∂λ (``jac``).
    """
    lo = torch.tensor([BOUNDS[k][0] for k in COEFFICIENTS])
    hi = torch.tensor([BOUNDS[k][1] for k in COEFFICIENTS])
    eta = torch.tensor(hyper_lr, dtype=torch.float32)
    names = ("m", "v", "vbar", "n", "g", "m_lion")

    def init(params: Tree) -> Tree:
        zeros = tree_zeros_like(params)
        tiny = tree_map(lambda z: z + 1e-15, zeros)
        return {
            **{k: zeros for k in names},
            "v": tiny,
            "vbar": tiny,
            "t": torch.zeros(()),
            "lam": torch.tensor([beta1, beta2, beta3, rho, c, gamma]).clamp(lo, hi),
            "jac": tree_map(lambda z: torch.zeros(*z.shape, 6), zeros),
        }

    def update(grads: Tree, state: Tree, params: Tree) -> tuple[Tree, Tree]:
        t = state["t"] + 1
        # hyper-step: ∂L(θ_t)/∂λ = −α⟨g_t, ∂d_{t−1}/∂λ⟩, then clamp (no-op at t = 1: jac = 0)
        hyper = -lr * sum(
            (g.unsqueeze(-1) * j).reshape(-1, 6).sum(0)
            for g, j in zip(tree_leaves(grads), tree_leaves(state["jac"]), strict=True)
        )
        lam = (state["lam"] - eta * hyper).clamp(lo, hi)

        def leaf(g: torch.Tensor, *old: torch.Tensor):
            s = dict(zip(names, old, strict=True))
            s["n"] = torch.where(t == 1, g * g, s["n"])  # the code's n₀ = g₁²
            d, new = _direction(lam, t, g, s, eps)
            jac = jacfwd(lambda lam_: _direction(lam_, t, g, s, eps, new["vbar"])[0])(lam)
            return d, new, jac

        out = tree_map(leaf, grads, *(state[k] for k in names))
        new_state = {k: tree_map(lambda r, k=k: r[1][k], out) for k in names}
        return tree_map(lambda r: r[0], out), {
            **new_state,
            "t": t,
            "lam": lam,
            "jac": tree_map(lambda r: r[2], out),
        }

    return GradientTransformation(init, update)


class AvgradConfig(BaseOptimizerConfig):
    """AVGrad: Adam with the time-averaged second moment (MADA's ρ = 0 vertex)."""

    name: Literal["avgrad"] = "avgrad"
    lr: float = Field(1e-3, gt=0, description="learning rate η (peak value under a schedule)")
    b1: float = Field(0.9, ge=0, lt=1, description="first-moment decay β₁")
    b2: float = Field(0.999, ge=0, lt=1, description="second-moment decay β₂")
    eps: float = Field(1e-8, gt=0, description="denominator ε")

    def direction(self) -> GradientTransformation | None:
        return scale_by_avgrad(self.b1, self.b2, self.eps)


class MadaConfig(BaseOptimizerConfig):
    """MADA: Adam/AVGrad/Yogi/Adan/sign interpolation with coefficients learned online."""

    name: Literal["mada"] = "mada"
    lr: float = Field(1e-3, gt=0, description="learning rate α (peak value under a schedule)")
    beta1: float = Field(0.9, ge=0.01, le=0.99, description="initial β₁ (first moment)")
    beta2: float = Field(0.99, ge=0.501, le=0.99, description="initial β₂ (second moment)")
    beta3: float = Field(0.0, ge=0, le=0.99, description="initial β₃ (Adan look-ahead)")
    rho: float = Field(1.0, ge=0, le=1, description="initial ρ (1: Adam v, 0: AVGrad mean)")
    c: float = Field(1.0, ge=0, le=1, description="initial c (1: Adam g², 0: Yogi)")
    gamma: float = Field(1.0, ge=0, le=1, description="initial γ (1: adaptive, 0: sign update)")
    eps: float = Field(1e-6, gt=0, description="denominator ε")
    hyper_lr: tuple[float, float, float, float, float, float] = Field(
        (5e-4, 5e-4, 0.1, 0.1, 0.1, 0.1),
        description="hyper learning rates of (β₁, β₂, β₃, ρ, c, γ); all 0 pins the coefficients",
    )

    def direction(self) -> GradientTransformation | None:
        return scale_by_mada(
            self.lr,
            self.beta1,
            self.beta2,
            self.beta3,
            self.rho,
            self.c,
            self.gamma,
            self.eps,
            self.hyper_lr,
        )
