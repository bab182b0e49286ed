"""Small pure helpers shared by the personalized algorithms (no algorithm of their own).

* :func:`routed` — one functional optimizer made of several, each owning one top-level key of
  the parameter tree (optax's ``multi_transform``). Lets a local solve step a persistent personal
  model (optimizer state carried across rounds) and a fresh copy of the global model (state
  reset every round) with one gradient evaluation.
* :func:`projected_sgd` — SGD followed by clamping into ``[lo, hi]`` (for positive scalars such
  as AdaPeD's ψ).
* :func:`on_first_visit` — ``θ_i`` if client i has trained before, else a fallback (the current
  global model), selected with ``torch.where`` so it vmaps.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from fedkin.core.tree import Tree, tree_map
from fedkin.optim import Optimizer

PersonalInit = Literal["global", "initial"]

PERSONAL_INIT_FIELD = Field(
    "global",
    description="personal model of a client's first round: 'global' copies the current global "
    "model w (a client first sampled late does not start from the random init); 'initial' uses "
    "the shared initial model (as in PFLlib). Unvisited clients are evaluated with w under "
    "'global' and with the initial model under 'initial'",
)


def routed(optimizers: dict[str, Optimizer]) -> Optimizer:
    """Optimizer over a tree ``{key: subtree}`` that applies ``optimizers[key]`` to each key."""

    def init(params: Tree) -> Tree:
        return {k: opt.init(params[k]) for k, opt in optimizers.items()}

    def update(grads: Tree, state: Tree, params: Tree) -> tuple[Tree, Tree]:
        new, new_state = {}, {}
        for k, opt in optimizers.items():
            new[k], new_state[k] = opt.update(grads[k], state[k], params[k])
        return new, new_state

    return Optimizer(init, update)


def projected_sgd(lr: float, lo: float, hi: float) -> Optimizer:
    """p ← clamp(p − η g, lo, hi) leafwise (stateless); ``params`` may be a bare tensor."""

    def step(p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return (p - lr * g).clamp(lo, hi)

    def init(params: Tree | torch.Tensor) -> Tree:
        return {}

    def update(grads, state: Tree, params):
        if isinstance(params, torch.Tensor):
            return step(params, grads), state
        return tree_map(step, params, grads), state

    return Optimizer(init, update)


def on_first_visit(seen: torch.Tensor, own: Tree, fallback: Tree) -> Tree:
    """``own`` where ``seen > 0`` else ``fallback`` (leafwise; ``seen`` is a 0-d tensor)."""
    return tree_map(lambda a, b: torch.where(seen > 0, a, b), own, fallback)
