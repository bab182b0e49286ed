"""Gradient transformations in the optax style: pure ``init``/``update`` pairs that compose.

A :class:`GradientTransformation` maps gradients to *updates*:

    init(params) -> state,      update(grads, state, params) -> (updates, state'),

and :func:`apply_updates` adds the updates to the parameters, θ ← θ + u. Every function is a
pure function of trees of tensors (nested ``dict[str, Tensor]``), states included, so the
vectorized engine ``vmap``\\ s a transformation over a stacked client dimension and the
sequential engine calls it per client with the same numbers. States are dicts too (a chain's
state is ``{"0": s₀, "1": s₁, …}``) so they stack, store and checkpoint like parameters.

Optimizers are chains: SGD with momentum is ``chain(add_decayed_weights(λ), trace(μ),
scale_by_learning_rate(η))``, Adam is ``chain(scale_by_adam(β₁, β₂, ε),
scale_by_learning_rate(η))`` (see :mod:`fedkin.optim.alias`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from fedkin.core.tree import Tree, tree_device, tree_leaves, tree_map, tree_zeros_like
from fedkin.optim.schedules import Schedule


class GradientTransformation(NamedTuple):
    """``init(params) -> state``; ``update(grads, state, params) -> (updates, state)``."""

    init: Callable[[Tree], Tree]
    update: Callable[[Tree, Tree, Tree], tuple[Tree, Tree]]


def apply_updates(params: Tree, updates: Tree) -> Tree:
    """θ + u leafwise."""
    return tree_map(torch.add, params, updates)


def _stateless(fn: Callable[[Tree, Tree], Tree]) -> GradientTransformation:
    return GradientTransformation(lambda params: {}, lambda g, s, p: (fn(g, p), s))


def identity() -> GradientTransformation:
    """u = g."""
    return _stateless(lambda g, p: g)


def chain(*transforms: GradientTransformation | None) -> GradientTransformation:
    """Apply ``transforms`` in order, each to the previous one's output (``None`` is skipped).

    State: ``{"0": s₀, "1": s₁, …}`` over the non-``None`` transforms, leaving out empty
    states (so a chain of stateless transformations has state ``{}``); a chain of one
    transformation is that transformation.
    """
    parts = [t for t in transforms if t is not None]
    if len(parts) == 1:
        return parts[0]

    def init(params: Tree) -> Tree:
        states = {str(i): t.init(params) for i, t in enumerate(parts)}
        return {k: s for k, s in states.items() if s}

    def update(grads: Tree, state: Tree, params: Tree) -> tuple[Tree, Tree]:
        new_state = {}
        for i, t in enumerate(parts):
            grads, s = t.update(grads, state.get(str(i), {}), params)
            if s:
                new_state[str(i)] = s
        return grads, new_state

    return GradientTransformation(init, update)


# ----- partition: different transformations for different parameters -------------------------


def _select(tree: Tree, labels: Tree, label: str) -> Tree:
    """The subtree of leaves labelled ``label`` (empty dicts pruned)."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            sub = _select(v, labels[k], label)
            if sub:
                out[k] = sub
        elif labels[k] == label:
            out[k] = v
    return out


def _merge(into: Tree, part: Tree) -> None:
    for k, v in part.items():
        if isinstance(v, dict):
            _merge(into.setdefault(k, {}), v)
        else:
            into[k] = v


def _reorder(tree: Tree, like: Tree) -> Tree:
    return {k: _reorder(tree[k], v) if isinstance(v, dict) else tree[k] for k, v in like.items()}


def partition(
    transforms: dict[str, GradientTransformation], label_fn: Callable[[Tree], Tree]
) -> GradientTransformation:
    """Route each leaf to ``transforms[label]`` where ``label_fn(params)`` labels the leaves.

    ``label_fn`` returns a tree of the parameters' structure with ``str`` leaves (optax's
    ``multi_transform``); e.g. :func:`label_by_ndim` sends 2-D matrices to Muon and the rest to
    AdamW. Each transformation sees only its own leaves. State: ``{label: state}``.
    Under ``vmap`` the labels see one client's shapes (``ndim`` without the cohort dimension).
    """

    def init(params: Tree) -> Tree:
        labels = label_fn(params)
        return {k: t.init(_select(params, labels, k)) for k, t in transforms.items()}

    def update(grads: Tree, state: Tree, params: Tree) -> tuple[Tree, Tree]:
        labels = label_fn(params)
        unknown = {x for x in tree_leaves(labels) if x not in transforms}
        if unknown:
            raise ValueError(f"partition: labels {sorted(unknown)} have no transformation")
        updates: Tree = {}
        new_state = {}
        for k, t in transforms.items():
            u, new_state[k] = t.update(
                _select(grads, labels, k), state[k], _select(params, labels, k)
            )
            _merge(updates, u)
        return _reorder(updates, grads), new_state

    return GradientTransformation(init, update)


def label_by_ndim(matrix: str = "matrix", other: str = "other") -> Callable[[Tree], Tree]:
    """A ``label_fn`` for :func:`partition`: ``matrix`` for 2-D leaves, ``other`` for the rest."""
    return lambda params: tree_map(lambda p: matrix if p.dim() == 2 else other, params)


def label_by_key() -> Callable[[Tree], Tree]:
    """A ``label_fn`` for :func:`partition`: each leaf's top-level key."""

    def label(key: str, value) -> Tree | str:
        return tree_map(lambda _: key, value) if isinstance(value, dict) else key

    return lambda params: {k: label(k, v) for k, v in params.items()}


# ----- elementary transformations -------------------------------------------------------------


def scale(factor: float) -> GradientTransformation:
    """u = c·g."""
    return _stateless(lambda g, p: tree_map(lambda x: factor * x, g))


def scale_by_learning_rate(lr: float | Schedule) -> GradientTransformation:
    """u = −η_t·g; a constant η is stateless, a schedule η(t) keeps the step count t.

    t counts this transformation's updates (0 at the first), a 0-d tensor so it vmaps.
    """
    if not callable(lr):
        return scale(-lr)

    def init(params: Tree) -> Tree:
        return {"count": torch.zeros((), dtype=torch.int64, device=tree_device(params))}

    def update(grads: Tree, state: Tree, params: Tree) -> tuple[Tree, Tree]:
        eta = lr(state["count"])
        return tree_map(lambda x: -eta * x, grads), {"count": state["count"] + 1}

    return GradientTransformation(init, update)


def add_decayed_weights(weight_decay: float) -> GradientTransformation | None:
    """u = g + λθ (``None``, i.e. nothing to chain, if λ = 0)."""
    if not weight_decay:
        return None
    return _stateless(lambda g, p: tree_map(lambda x, w: x.add(w, alpha=weight_decay), g, p))


def trace(momentum: float, nesterov: bool = False) -> GradientTransformation | None:
    """Heavy-ball momentum m ← μm + g, u = m (Nesterov: u = g + μm), as torch's SGD;
    ``None`` if μ = 0."""
    if not momentum:
        return None

    def init(params: Tree) -> Tree:
        return {"m": tree_zeros_like(params)}

    def update(grads: Tree, state: Tree, params: Tree) -> tuple[Tree, Tree]:
        m = tree_map(lambda m, g: g.add(m, alpha=momentum), state["m"], grads)
        u = tree_map(lambda g, m: g.add(m, alpha=momentum), grads, m) if nesterov else m
        return u, {"m": m}

    return GradientTransformation(init, update)


def scale_by_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> GradientTransformation:
    """m ← β₁m + (1−β₁)g, v ← β₂v + (1−β₂)g², u = m̂/(√v̂ + ε), m̂ = m/(1−β₁ᵗ), v̂ = v/(1−β₂ᵗ)."""

    def init(params: Tree) -> Tree:
        return {
            "m": tree_zeros_like(params),
            "v": tree_zeros_like(params),
            "t": torch.zeros((), dtype=torch.float32, device=tree_device(params)),
        }

    def update(grads: Tree, state: Tree, params: Tree) -> tuple[Tree, Tree]:
        t = state["t"] + 1
        m = tree_map(lambda m, g: b1 * m + (1 - b1) * g, state["m"], grads)
        v = tree_map(lambda v, g: b2 * v + (1 - b2) * g * g, state["v"], grads)
        c1, c2 = 1 - b1**t, 1 - b2**t
        u = tree_map(lambda m, v: (m / c1) / ((v / c2).sqrt() + eps), m, v)
        return u, {"m": m, "v": v, "t": t}

    return GradientTransformation(init, update)


def clip_by_global_norm(max_norm: float) -> GradientTransformation:
    """u = g·min(1, C/‖g‖) with ‖g‖ the norm over all leaves."""

    def fn(g: Tree, p: Tree) -> Tree:
        norm = torch.sqrt(sum(x.pow(2).sum() for x in tree_leaves(g)))
        factor = (max_norm / norm.clamp(min=1e-12)).clamp(max=1.0)
        return tree_map(lambda x: x * factor, g)

    return _stateless(fn)


def clip(max_abs: float) -> GradientTransformation:
    """u = clamp(g, −c, c) elementwise."""
    return _stateless(lambda g, p: tree_map(lambda x: x.clamp(-max_abs, max_abs), g))


def differentially_private_aggregate(
    clip_norm: float,
    noise_multiplier: float,
    denominator: torch.Tensor | float,
    noise: Callable[[torch.Tensor, int, int], torch.Tensor],
) -> GradientTransformation:
    """DP-SGD's aggregation (optax's ``differentially_private_aggregate``) on *per-example*
    gradients (every leaf has a leading example dimension):

        u = ( Σ_j clip_C(g_j) + σC·z ) / D,     clip_C(g) = g·min(1, C/‖g‖),

    with z = ``noise(t, leaf, numel)`` a standard normal draw keyed by the step count t (the
    state, so it vmaps) and the leaf index, and D the data-independent ``denominator`` (the
    expected batch size). Padded example slots must carry zero gradients (they then add 0).
    """
    sigma = noise_multiplier * clip_norm

    def init(params: Tree) -> Tree:
        return {"count": torch.zeros((), dtype=torch.int64, device=tree_device(params))}

    def update(grads: Tree, state: Tree, params: Tree) -> tuple[Tree, Tree]:
        leaves = tree_leaves(grads)
        norms = torch.sqrt(sum(t.reshape(t.shape[0], -1).pow(2).sum(1) for t in leaves))
        factor = (clip_norm / norms.clamp(min=1e-12)).clamp(max=1.0)
        counter = iter(range(len(leaves)))

        def noisy_mean(t: torch.Tensor) -> torch.Tensor:
            clipped = (t * factor.reshape(-1, *([1] * (t.dim() - 1)))).sum(0)
            z = noise(state["count"], next(counter), clipped.numel())
            return (clipped + sigma * z.reshape(clipped.shape).to(t.dtype)) / denominator

        return tree_map(noisy_mean, grads), {"count": state["count"] + 1}

    return GradientTransformation(init, update)
