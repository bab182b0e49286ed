"""The object algorithms step with: :class:`Optimizer`, ``step(grads, state, params) ->
(new_params, state)``.

An optimizer is usually a :class:`~fedkin.optim.transform.GradientTransformation` followed by
:func:`~fedkin.optim.transform.apply_updates` (:func:`from_transform`). Steps that are not
"θ + u" — projections, proximal maps — are optimizers directly: :func:`projected`,
``core.quantize.prox_optimizer``. :func:`routed` combines optimizers by top-level key.

The stepping method is called ``step`` (not ``update``) on purpose: ``update`` is a
transformation's and returns *updates*, ``step`` returns *new parameters*.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from fedkin.core.tree import Tree, tree_leaves, tree_map
from fedkin.optim.transform import GradientTransformation, apply_updates


class Optimizer(NamedTuple):
    """``init(params) -> state`` and ``step(grads, state, params) -> (new_params, state)``."""

    init: Callable[[Tree], Tree]
    step: Callable[[Tree, Tree, Tree], tuple[Tree, Tree]]
    #: peak step size η (None if the optimizer has no single one); proximal steps taken after
    #: the optimizer's step use it as their η (e.g. ``core.quantize.prox_optimizer``)
    lr: float | None = None
    #: sharpness-aware steps (:mod:`fedkin.optim.sam`): ε(g, θ); the local solver then steps
    #: with the gradient taken at θ + ε instead of g (None: an ordinary gradient step)
    perturbation: Callable[[Tree, Tree], Tree] | None = None
    #: None for first-order optimizers; a zeroth-order one's gradient estimator
    #: (:class:`~fedkin.optim.zeroth.ZerothOrder`): the local solver then passes ``step`` its
    #: estimate from forward passes instead of a gradient
    estimator: Any = None
    #: None: the local solver steps the weights in the dtype it received them in; a floating
    #: dtype (bf16 optimizers, :mod:`fedkin.optim.precision`): the local solver holds the
    #: weights in it across its steps and feeds the model inputs in it (:func:`working`)
    dtype: torch.dtype | None = None


def working(optimizer: Optimizer, tree: Any) -> Any:
    """The floating tensors of ``tree`` (or a tensor) in ``optimizer.dtype``: what the local
    solver holds its weights and inputs in (unchanged, without a copy, if ``dtype`` is None)."""
    dtype = optimizer.dtype
    if dtype is None:
        return tree
    if isinstance(tree, torch.Tensor):
        return tree.to(dtype) if tree.is_floating_point() else tree
    return tree_map(lambda t: working(optimizer, t), tree)


def from_transform(transform: GradientTransformation, lr: float | None = None) -> Optimizer:
    """θ ← θ + u with (u, s') = ``transform.update(g, s, θ)``."""

    def step(grads: Tree, state: Tree, params: Tree) -> tuple[Tree, Tree]:
        updates, state = transform.update(grads, state, params)
        return apply_updates(params, updates), state

    return Optimizer(transform.init, step, lr)


def routed(optimizers: dict[str, Optimizer]) -> Optimizer:
    """An optimizer over ``{key: subtree}`` that steps ``optimizers[key]`` on each key.

    The optimizer-level form of :func:`~fedkin.optim.transform.partition` with labels = the
    top-level keys (for members that are not transformations, e.g. proximal steps). Lets a local
    solve step a persistent personal model (state carried across rounds) and a fresh copy of the
    global model (state reset every round) with one gradient evaluation. State: ``{key: s}``.
    """

    def init(params: Tree) -> Tree:
        return {k: opt.init(params[k]) for k, opt in optimizers.items()}

    def step(grads: Tree, state: Tree, params: Tree) -> tuple[Tree, Tree]:
        new, new_state = {}, {}
        for k, opt in optimizers.items():
            new[k], new_state[k] = opt.step(grads[k], state[k], params[k])
        return new, new_state

    return Optimizer(init, step)


def projected(optimizer: Optimizer, project: Callable[[torch.Tensor], torch.Tensor]) -> Optimizer:
    """``optimizer``'s step followed by ``project`` leafwise; ``params`` may be a bare tensor."""

    def step(grads, state: Tree, params):
        if isinstance(params, torch.Tensor):
            new, state = optimizer.step({"p": grads}, state, {"p": params})
            return project(new["p"]), state
        new, state = optimizer.step(grads, state, params)
        return tree_map(project, new), state

    def init(params) -> Tree:
        return optimizer.init({"p": params} if isinstance(params, torch.Tensor) else params)

    return Optimizer(init, step, optimizer.lr)


def state_bytes_per_param(optimizer: Optimizer, params: Tree) -> float:
    """Bytes of ``optimizer``'s state per model parameter, measured on its initial state
    (element sizes of the stored tensors; 0-d step counts included)."""
    state = optimizer.init(params)
    n = sum(t.numel() for t in tree_leaves(params))
    return sum(t.numel() * t.element_size() for t in tree_leaves(state)) / n
