"""Mapped arguments: trees of tensors carrying the client dimension at ``in_dims[j]``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from fedkin.core.tree import tree_map


def _leafwise(arg: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply ``fn`` to every tensor of an argument (a tensor, a tuple of tensors or a dict tree)."""
    if isinstance(arg, dict):
        return tree_map(fn, arg)
    if isinstance(arg, tuple):
        return tuple(_leafwise(a, fn) for a in arg)
    return fn(arg)


def _narrow(arg: Any, dim: int | None, start: int, length: int) -> Any:
    return arg if dim is None else _leafwise(arg, lambda t: t.narrow(dim, start, length))


def _select(arg: Any, dim: int | None, index: int) -> Any:
    return arg if dim is None else _leafwise(arg, lambda t: t.select(dim, index))


def _combine(parts: list[Any], op: Callable[..., torch.Tensor]) -> Any:
    first = parts[0]
    if isinstance(first, dict):
        return {k: _combine([p[k] for p in parts], op) for k in first}
    if isinstance(first, tuple):
        return tuple(_combine([p[i] for p in parts], op) for i in range(len(first)))
    return op(parts)


def _cohort_size(args: Sequence[Any], in_dims: Sequence[int | None]) -> int:
    for arg, dim in zip(args, in_dims, strict=True):
        if dim is None:
            continue
        first = arg if isinstance(arg, torch.Tensor) else next(iter(_tensors(arg)), None)
        if first is not None:
            return first.shape[dim]
    raise ValueError("no argument carries the client dimension")


def _client_device(args: Sequence[Any], in_dims: Sequence[int | None]) -> torch.device:
    """Where the cohort's per-client inputs live (the stores' and the data's device)."""
    for arg, dim in zip(args, in_dims, strict=True):
        first = next(iter(_tensors(arg)), None) if dim is not None else None
        if first is not None:
            return first.device
    raise ValueError("no argument carries the client dimension")


def _tensors(arg: Any):
    if isinstance(arg, dict):
        for v in arg.values():
            yield from _tensors(v)
    elif isinstance(arg, tuple):
        for v in arg:
            yield from _tensors(v)
    else:
        yield arg
