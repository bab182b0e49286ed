"""Tiny pytree helpers for nested ``dict[str, Tensor]`` parameter trees.

Algorithms see parameters as plain nested dicts (what ``torch.func.functional_call`` takes and
what ``vmap`` maps over); storage and stacking use ``TensorDict`` (see ``engine``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils import _pytree

Tree = dict[str, Any]


def to_device(tree: Any, device: str | torch.device) -> Any:
    """Every tensor of a nested container (dicts, lists, tuples, named tuples) on ``device``;
    other leaves unchanged (a no-op for tensors already there)."""
    return _pytree.tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, tree)


def tree_map(fn: Callable[..., torch.Tensor], tree: Tree, *rest: Tree) -> Tree:
    """Apply ``fn`` leafwise to ``tree`` and structurally identical ``rest``."""
    return {
        k: tree_map(fn, v, *(r[k] for r in rest))
        if isinstance(v, dict)
        else fn(v, *(r[k] for r in rest))
        for k, v in tree.items()
    }


def tree_device(tree: Tree) -> torch.device:
    """The device of a tree's first tensor (the CPU for an empty tree): where state that goes
    with it (step counters) is made."""
    leaves = tree_leaves(tree)
    return leaves[0].device if leaves else torch.device("cpu")


def tree_leaves(tree: Tree) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    for v in tree.values():
        out.extend(tree_leaves(v) if isinstance(v, dict) else [v])
    return out


def tree_add(a: Tree, b: Tree, scale: float | torch.Tensor = 1.0) -> Tree:
    """a + scale·b"""
    return tree_map(lambda x, y: x + scale * y, a, b)


def tree_sub(a: Tree, b: Tree) -> Tree:
    return tree_map(torch.sub, a, b)


def tree_scale(a: Tree, s: float | torch.Tensor) -> Tree:
    return tree_map(lambda x: x * s, a)


def tree_zeros_like(a: Tree) -> Tree:
    return tree_map(torch.zeros_like, a)


def tree_sqnorm(a: Tree) -> torch.Tensor:
    """‖a‖² summed over all leaves (a scalar; batched under vmap)."""
    return sum(x.pow(2).sum() for x in tree_leaves(a))


def tree_dot(a: Tree, b: Tree) -> torch.Tensor:
    return sum((x * y).sum() for x, y in zip(tree_leaves(a), tree_leaves(b), strict=True))


def tree_detach(a: Tree) -> Tree:
    return tree_map(torch.Tensor.detach, a)
