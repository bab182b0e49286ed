"""Flatten parameter trees to vectors and back, for rules that see a message as one vector.

Robust aggregators and compressors act on a client's message as a point in ℝ^d (distances,
norms, top-k over all coordinates), so a stacked tree ``{leaf: [K, *shape]}`` becomes a matrix
``[K, d]`` with the leaves concatenated in tree order; :func:`unflatten` inverts it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from fedkin.core.tree import Tree, tree_leaves


class TreeSpec(NamedTuple):
    """Where each leaf lives in the flat vector: (nested key path, shape) in tree order."""

    leaves: tuple[tuple[tuple[str, ...], tuple[int, ...]], ...]

    @property
    def size(self) -> int:
        return sum(int(torch.Size(s).numel()) for _, s in self.leaves)


def _paths(tree: Tree, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out: list[tuple[str, ...]] = []
    for k, v in tree.items():
        out.extend(_paths(v, (*prefix, k)) if isinstance(v, dict) else [(*prefix, k)])
    return out


def flatten(tree: Tree, batch_dims: int = 1) -> tuple[torch.Tensor, TreeSpec]:
    """``[*batch, d]`` concatenation of the leaves (the first ``batch_dims`` dims are kept)."""
    leaves = tree_leaves(tree)
    batch = leaves[0].shape[:batch_dims]
    shapes = (tuple(t.shape[batch_dims:]) for t in leaves)
    spec = TreeSpec(tuple(zip(_paths(tree), shapes, strict=True)))
    return torch.cat([t.reshape(*batch, -1) for t in leaves], dim=-1), spec


def unflatten(flat: torch.Tensor, spec: TreeSpec) -> Tree:
    """The tree whose :func:`flatten` is ``flat`` (leading dims of ``flat`` become batch dims)."""
    batch = flat.shape[:-1]
    out: Tree = {}
    start = 0
    for path, shape in spec.leaves:
        n = int(torch.Size(shape).numel())
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = flat[..., start : start + n].reshape((*batch, *shape))
        start += n
    return out
