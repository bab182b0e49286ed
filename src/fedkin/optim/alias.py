"""The classic optimizers as chains of transformations (optax's ``alias``).

Each ``*_transform`` returns the :class:`~fedkin.optim.transform.GradientTransformation`
(to chain or :func:`~fedkin.optim.transform.partition`); the plain names return the
:class:`~fedkin.optim.optimizer.Optimizer` algorithms step with.
"""

from __future__ import annotations

import torch

from fedkin.optim.optimizer import Optimizer, from_transform, projected
from fedkin.optim.schedules import Schedule
from fedkin.optim.transform import (
    GradientTransformation,
    add_decayed_weights,
    chain,
    scale_by_adam,
    scale_by_learning_rate,
    trace,
)


def sgd_transform(
    lr: float | Schedule, momentum: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False
) -> GradientTransformation:
    """torch's SGD: g ← g + λθ;  m ← μm + g;  u = −η m  (Nesterov: u = −η(g + μm))."""
    return chain(
        add_decayed_weights(weight_decay), trace(momentum, nesterov), scale_by_learning_rate(lr)
    )


def adam_transform(
    lr: float | Schedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> GradientTransformation:
    """Adam, or AdamW with decoupled decay λ: u = −η(m̂/(√v̂ + ε) + λθ)."""
    return chain(
        scale_by_adam(b1, b2, eps), add_decayed_weights(weight_decay), scale_by_learning_rate(lr)
    )


def sgd(lr: float, momentum: float = 0.0, weight_decay: float = 0.0) -> Optimizer:
    """SGD with heavy-ball momentum: m ← μm + (g + λθ);  θ ← θ − η m."""
    return from_transform(sgd_transform(lr, momentum, weight_decay), lr)


def adam(lr: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> Optimizer:
    """Adam: m ← β₁m + (1−β₁)g, v ← β₂v + (1−β₂)g², θ ← θ − η m̂/(√v̂ + ε) with bias correction."""
    return from_transform(adam_transform(lr, b1, b2, eps), lr)


def adamw(
    lr: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.01
) -> Optimizer:
    """AdamW (decoupled weight decay): θ ← θ − η(m̂/(√v̂ + ε) + λθ)."""
    return from_transform(adam_transform(lr, b1, b2, eps, weight_decay), lr)


def projected_sgd(lr: float, lo: float, hi: float) -> Optimizer:
    """θ ← clamp(θ − η g, lo, hi) leafwise (stateless; for positive scalars such as AdaPeD's ψ);
    ``params`` may be a bare tensor."""
    return projected(sgd(lr), lambda p: torch.clamp(p, lo, hi))
