"""Functional optimizers in the optax style: pure ``init``/``update`` pairs that vmap over clients.

``init(params) -> state`` and ``update(grads, state, params) -> (new_params, state)``. Both are
pure functions of trees of tensors, so the vectorized engine maps them over a stacked client
dimension and the sequential engine calls them per client with identical numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, NamedTuple

import torch
from pydantic import BaseModel, ConfigDict, Field

from fedkin.core.tree import Tree, tree_map, tree_zeros_like
from fedkin.registry import OPTIMIZER_REGISTRY, register_optimizer


class Optimizer(NamedTuple):
    init: Callable[[Tree], Tree]
    update: Callable[[Tree, Tree, Tree], tuple[Tree, Tree]]
    #: step size η (None if the optimizer has no single one); proximal steps taken after the
    #: optimizer's step use it as their η (e.g. ``core.quantize.prox_optimizer``)
    lr: float | None = None


def sgd(lr: float, momentum: float = 0.0, weight_decay: float = 0.0) -> Optimizer:
    """SGD with heavy-ball momentum: m ← μm + (g + λθ);  θ ← θ − η m."""

    def init(params: Tree) -> Tree:
        return {"m": tree_zeros_like(params)} if momentum else {}

    def update(grads: Tree, state: Tree, params: Tree) -> tuple[Tree, Tree]:
        if weight_decay:
            grads = tree_map(lambda g, p: g.add(p, alpha=weight_decay), grads, params)
        if momentum:
            m = tree_map(lambda m, g: g.add(m, alpha=momentum), state["m"], grads)
            return tree_map(lambda p, d: p.add(d, alpha=-lr), params, m), {"m": m}
        return tree_map(lambda p, g: p.add(g, alpha=-lr), params, grads), state

    return Optimizer(init, update, lr)


def adam(lr: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> Optimizer:
    """Adam: m ← β₁m + (1−β₁)g, v ← β₂v + (1−β₂)g², θ ← θ − η m̂/(√v̂ + ε) with bias correction."""

    def init(params: Tree) -> Tree:
        return {
            "m": tree_zeros_like(params),
            "v": tree_zeros_like(params),
            "t": torch.zeros((), dtype=torch.float32),
        }

    def update(grads: Tree, state: Tree, params: Tree) -> tuple[Tree, Tree]:
        t = state["t"] + 1
        m = tree_map(lambda m, g: b1 * m + (1 - b1) * g, state["m"], grads)
        v = tree_map(lambda v, g: b2 * v + (1 - b2) * g * g, state["v"], grads)
        c1, c2 = 1 - b1**t, 1 - b2**t
        new = tree_map(lambda p, m, v: p - lr * (m / c1) / ((v / c2).sqrt() + eps), params, m, v)
        return new, {"m": m, "v": v, "t": t}

    return Optimizer(init, update, lr)


class SgdConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["sgd"] = "sgd"
    lr: float = Field(0.1, gt=0, description="learning rate η")
    momentum: float = Field(0.0, ge=0, lt=1, description="heavy-ball momentum μ")
    weight_decay: float = Field(0.0, ge=0, description="L2 weight decay λ")

    def build(self) -> Optimizer:
        return sgd(self.lr, self.momentum, self.weight_decay)


class AdamConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["adam"] = "adam"
    lr: float = Field(1e-3, gt=0, description="learning rate η")
    b1: float = Field(0.9, ge=0, lt=1, description="first-moment decay β₁")
    b2: float = Field(0.999, ge=0, lt=1, description="second-moment decay β₂")
    eps: float = Field(1e-8, gt=0, description="denominator ε")

    def build(self) -> Optimizer:
        return adam(self.lr, self.b1, self.b2, self.eps)


register_optimizer(SgdConfig)
register_optimizer(AdamConfig)

#: An optimizer's config: any registered optimizer (``fedkin.register_optimizer``).
OptimizerConfig = OPTIMIZER_REGISTRY.field
#: name → config class of every registered optimizer (built-ins and plugins).
OPTIMIZERS = OPTIMIZER_REGISTRY
