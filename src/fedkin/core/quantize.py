"""Quantization-aware training with learned centers (QuPeD Algorithm 1, QuPeL): the shared pieces.

Every quantized layer l has M sorted, learnable centers c_l = (c_1 < … < c_M). Its weights x
are trained in full precision and used through a quantizer:

* hard  Q_c(x) = c_{j*(x)},  j*(x) = argmin_j |x − c_j|   (nearest center; for sorted centers
  j* = #{j : x > m_j} with midpoints m_j = (c_j + c_{j+1})/2);
* soft  Q̃_c(x) = c_1 + Σ_{j=2}^{M} (c_j − c_{j−1}) · σ(P·(x − m_{j−1}))   (sigmoid staircase with
  sharpness P; Q̃_c → Q_c pointwise as P → ∞ for x off the midpoints).

The relaxed problem (QuPeD eq. (2)–(3)) is  min_{x,c} f(Q(x)) + λ·R(x, c)  with the distance
penalty R(x, c) = Σ_k min_j |x_k − c_j| (ℓ1) or Σ_k min_j (x_k − c_j)² (ℓ2), solved by alternating
proximal gradient steps (QuPeD Algorithm 1, lines 5–6):

    x ← prox_{η₁λR(·,c)}(x − η₁ ∇_x f),        c ← prox_{η₂λR(x,·)}(c − η₂ ∇_c f),   c ← sort(c)

with, for the nearest center q = Q_c(z) of z (assignments held fixed inside the prox):

    ℓ1:  x = z − η₁λ if z > q + η₁λ;  z + η₁λ if z < q − η₁λ;  q otherwise   (snap to the center)
    ℓ2:  x = (z + 2η₁λ q) / (1 + 2η₁λ)
    ℓ2 centers:  c_j = (z_j + 2η₂λ Σ_{k∈S_j} x_k) / (1 + 2η₂λ |S_j|),   S_j = {k : j*(x_k) = j}
    ℓ1 centers:  c_j = z_j + η₂λ (#{k∈S_j : x_k > c_j} − #{k∈S_j : x_k < c_j})   (subgradient step)

The authors' code (kazkara/QuPeD ``utils.update_prox``) takes the ℓ1 center step with the
opposite sign (it moves c_j away from its members); ``code_l1_center_sign=True`` reproduces that.
The center gradient of the hard quantizer is the straight-through one, ∂f/∂c_j = Σ_{k∈S_j} ∂f/∂q_k,
clipped to ±``center_grad_clip`` as in the code (±10). Which layers are quantized follows the code:
every weight with ≥ 2 dims except the first and the last (biases and 1-D parameters stay full
precision). Centers start at linspace(min x, max x, M), or for M = 2 at the means of the negative
and the positive weights. λ grows over rounds, λ_r = λ₀·(r + 1) (the code's λ₀·(epoch + 1)).
After ``freeze_round`` the weights are frozen at Q_c(x) and only the centers are fine-tuned by
gradient (λ = 0), the code's final phase.

Differences from the code, kept on purpose: its 1-bit quantizer assigns by sign (x < 0 → c_1)
rather than to the nearest center; its weight gradient is taken at the full-precision x (only the
center gradient at Q_c(x)), here both are straight-through gradients at Q_c(x) (the paper); its ℓ1
weight clamp to [−1, 1] and its stepwise center learning-rate schedule are not reproduced.

Everything here is a pure function of tensors (no data-dependent Python control flow), so it runs
inside ``vmap`` over a cohort.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch

from fedkin.core.tree import Tree
from fedkin.optim import Optimizer

Penalty = Literal["l1", "l2"]
Centers = dict[str, torch.Tensor]  # quantized layer name → sorted centers [M]


# ----- which layers, how many bits ---------------------------------------------------------------


def quantized_layers(params: Tree) -> list[str]:
    """Names of the quantized parameters: every ≥2-D weight except the first and the last layer's
    (as in the authors' code: first layer, classifier and biases stay full precision)."""
    weights = [name for name, p in params.items() if p.dim() >= 2]
    return weights[1:-1]


def bits_for(num_centers: int) -> int:
    """Bit-width b = ⌈log₂ M⌉ of a code for M centers (M = 2: 1 bit, M = 4: 2 bits)."""
    return max(1, math.ceil(math.log2(num_centers)))


def init_centers(params: Tree, layers: list[str], num_centers: int) -> Centers:
    """Per-layer initial centers (code's ``init_centers``): linspace(min, max, M) for M > 2,
    [mean of negative weights, mean of positive weights] for M = 2."""
    out = {}
    for name in layers:
        w = params[name].detach().flatten()
        if num_centers == 2:
            neg, pos = w < 0, w >= 0
            lo = (w * neg).sum() / neg.sum().clamp(min=1)
            hi = (w * pos).sum() / pos.sum().clamp(min=1)
            out[name] = torch.stack([lo, hi])
        else:
            out[name] = torch.linspace(float(w.min()), float(w.max()), num_centers)
    return out


# ----- quantizers ---------------------------------------------------------------------------------


def assign(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Index j*(x) of the nearest of the sorted centers ``c`` (ties to the lower center)."""
    mids = (c[1:] + c[:-1]) / 2
    return (x.unsqueeze(-1) > mids).sum(-1)


def _one_hot(idx: torch.Tensor, m: int, dtype: torch.dtype) -> torch.Tensor:
    return (idx.unsqueeze(-1) == torch.arange(m, device=idx.device)).to(dtype)


def hard_quantize(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Q_c(x) with straight-through gradients: ∂Q/∂x = 1 and ∂Q/∂c_j = 1[j*(x) = j]."""
    q = (_one_hot(assign(x.detach(), c.detach()), c.shape[-1], x.dtype) * c).sum(-1)
    return q + (x - x.detach())


def soft_quantize(x: torch.Tensor, c: torch.Tensor, sharpness: float) -> torch.Tensor:
    """Q̃_c(x) = c_1 + Σ_j (c_j − c_{j−1}) σ(P (x − m_{j−1})), differentiable in x and c."""
    steps = torch.sigmoid(sharpness * (x.unsqueeze(-1) - (c[1:] + c[:-1]) / 2))
    return c[0] + (steps * (c[1:] - c[:-1])).sum(-1)


def quantize_tree(params: Tree, centers: Centers, quantizer: Callable = hard_quantize) -> Tree:
    """``params`` with every quantized layer replaced by ``quantizer(x, c)``."""
    return {k: quantizer(v, centers[k]) if k in centers else v for k, v in params.items()}


def distance_penalty(x: torch.Tensor, c: torch.Tensor, kind: Penalty) -> torch.Tensor:
    """R(x, c) = Σ_k min_j |x_k − c_j| (ℓ1) or Σ_k min_j (x_k − c_j)² (ℓ2)."""
    d = (x.unsqueeze(-1) - c).abs()
    d = d if kind == "l1" else d.pow(2)
    return d.min(-1).values.sum()


# ----- closed-form proximal steps --------------------------------------------------------------


def prox_weights(z: torch.Tensor, c: torch.Tensor, step: torch.Tensor, kind: Penalty):
    """prox of ``step``·R(·, c) at z, assignments fixed at q = Q_c(z) (``step`` = η₁λ)."""
    q = (_one_hot(assign(z, c), c.shape[-1], z.dtype) * c).sum(-1)
    if kind == "l2":
        return (z + 2 * step * q) / (1 + 2 * step)
    return torch.where(z > q + step, z - step, torch.where(z < q - step, z + step, q))


def center_step(
    z: torch.Tensor,
    x: torch.Tensor,
    c: torch.Tensor,
    step: torch.Tensor,
    kind: Penalty,
    code_l1_sign: bool = False,
) -> torch.Tensor:
    """The center update after the gradient step z = c − η₂∇_c f, for weights x assigned to the
    centers ``c`` (``step`` = η₂λ): the ℓ2 prox, or the ℓ1 subgradient step (sign inverted if
    ``code_l1_sign``, as in the authors' code). Returns the sorted new centers."""
    member = _one_hot(assign(x, c), c.shape[-1], x.dtype).reshape(-1, c.shape[-1])  # [n, M]
    xs = x.reshape(-1, 1)
    if kind == "l2":
        new = (z + 2 * step * (member * xs).sum(0)) / (1 + 2 * step * member.sum(0))
    else:
        above = (member * (xs > c).to(x.dtype)).sum(0)
        below = (member * (xs < c).to(x.dtype)).sum(0)
        sign = -1.0 if code_l1_sign else 1.0
        new = z + sign * step * (above - below)
    return torch.sort(new).values


def lam_at(lam0: float, round_: torch.Tensor, lam_max: float | None = None) -> torch.Tensor:
    """λ_r = λ₀·(r + 1), capped at ``lam_max`` (the code's λ₀·(epoch + 1))."""
    lam = lam0 * (round_.to(torch.float32) + 1)
    return lam if lam_max is None else lam.clamp(max=lam_max)


# ----- the proximal optimizer ---------------------------------------------------------------


def prox_optimizer(
    inner: Optimizer,
    lam: torch.Tensor,
    center_lr: float,
    kind: Penalty,
    frozen: torch.Tensor,
    finetune_lr: float = 0.0,
    center_grad_clip: float = 10.0,
    code_l1_sign: bool = False,
) -> Optimizer:
    """One alternating proximal step on ``{"x": weights, "c": centers}`` per gradient.

    x: ``inner``'s step (η₁ = ``inner.lr``) then ``prox_weights`` toward the current centers.
    c: z = c − η₂·clip(∇_c f) then ``center_step`` with the new weights; sorted.
    Once ``frozen`` (a 0-d bool tensor; traced, so it vmaps) the weights stay at Q_c(x) and the
    centers take plain gradient steps with ``finetune_lr`` (λ = 0); ``finetune_lr=0`` freezes
    them too. Layers without centers (full precision) take ``inner``'s step only.
    """
    if inner.lr is None:
        raise ValueError("prox_optimizer needs an inner optimizer with a learning rate")

    def init(params: Tree) -> Tree:
        return inner.init(params["x"])

    def step(grads: Tree, state: Tree, params: Tree) -> tuple[Tree, Tree]:
        x, c = params["x"], params["c"]
        z, state = inner.step(grads["x"], state, x)
        new_x, new_c = dict(z), {}
        for name, cl in c.items():
            snapped = hard_quantize(x[name], cl)
            prox = prox_weights(z[name], cl, inner.lr * lam, kind)
            new_x[name] = torch.where(frozen, snapped, prox)
            g = grads["c"][name].clamp(-center_grad_clip, center_grad_clip)
            trained = center_step(
                cl - center_lr * g, new_x[name], cl, center_lr * lam, kind, code_l1_sign
            )
            tuned = torch.sort(cl - finetune_lr * g).values
            new_c[name] = torch.where(frozen, tuned, trained)
        return {"x": new_x, "c": new_c}, state

    return Optimizer(init, step, inner.lr)
