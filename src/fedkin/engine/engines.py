"""Engines run one pure per-client function over a cohort.

``engine.map(fn, args, in_dims)`` calls ``fn(*args)`` once per client, where each argument is
a tree of tensors carrying the client dimension at ``in_dims[j]`` (``None``: shared by all
clients), and returns ``fn``'s output trees stacked along a leading client dimension.

* :class:`VectorizedEngine` — one ``torch.func.vmap`` over the whole cohort (optionally in
  chunks of ``chunk_size`` clients to bound memory). No Python loop over clients.
* :class:`SequentialEngine` — the same function one client at a time; the reference in tests
  and the fallback for models that cannot ``vmap``.

Both engines see identical inputs, so the same seed gives the same numbers up to float
reassociation in batched kernels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch.func import vmap

from fedkin.core.tree import tree_map
from fedkin.engine.allocator import retain_freed_memory


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


def _tensors(arg: Any):
    if isinstance(arg, dict):
        for v in arg.values():
            yield from _tensors(v)
    elif isinstance(arg, tuple):
        for v in arg:
            yield from _tensors(v)
    else:
        yield arg


class VectorizedEngine:
    """Trains a cohort with one ``vmap`` (per chunk of ``chunk_size`` clients; 0 = whole cohort).

    ``compile=True`` runs the mapped function through ``torch.compile`` (TorchInductor): the
    whole local solve of a cohort becomes one fused graph. It pays a compile (tens of seconds
    on a cold cache; again for each new cohort size) for a faster steady state; see
    ``fedkin bench peers``.

    ``retain_freed_mb`` > 0 tunes the allocator of the process the engine runs in
    (:mod:`fedkin.engine.allocator`) — on construction, and again in a Ray worker that
    receives the engine.
    """

    name = "vectorized"

    def __init__(self, chunk_size: int = 0, compile: bool = False, retain_freed_mb: int = 0):
        self.chunk_size = chunk_size
        self.compile = compile
        self.retain_freed_mb = retain_freed_mb
        self._compiled: dict[tuple[Callable[..., Any], tuple[int | None, ...]], Any] = {}
        retain_freed_memory(retain_freed_mb)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_compiled": {}}  # compiled code stays in its own process

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        retain_freed_memory(self.retain_freed_mb)

    def _mapped(self, fn: Callable[..., Any], in_dims: tuple[int | None, ...]) -> Any:
        if not self.compile:
            return vmap(fn, in_dims=in_dims, randomness="error")
        key = (fn, in_dims)  # bound methods compare equal per (instance, function)
        if key not in self._compiled:
            self._compiled[key] = torch.compile(vmap(fn, in_dims=in_dims, randomness="error"))
        return self._compiled[key]

    def map(
        self, fn: Callable[..., Any], args: Sequence[Any], in_dims: Sequence[int | None]
    ) -> Any:
        size = _cohort_size(args, in_dims)
        chunk = self.chunk_size or size
        mapped = self._mapped(fn, tuple(in_dims))
        parts = [
            mapped(
                *(
                    _narrow(a, d, start, min(chunk, size - start))
                    for a, d in zip(args, in_dims, strict=True)
                )
            )
            for start in range(0, size, chunk)
        ]
        return parts[0] if len(parts) == 1 else _combine(parts, torch.cat)


class SequentialEngine:
    """Runs the per-client function one client at a time and stacks the results."""

    name = "sequential"

    def map(
        self, fn: Callable[..., Any], args: Sequence[Any], in_dims: Sequence[int | None]
    ) -> Any:
        size = _cohort_size(args, in_dims)
        outs = [
            fn(*(_select(a, d, k) for a, d in zip(args, in_dims, strict=True))) for k in range(size)
        ]
        return _combine(outs, torch.stack)


class EngineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["vectorized", "sequential"] = Field(
        "vectorized",
        description="vectorized: one vmap over the cohort; sequential: a client at a time",
    )
    chunk_size: Annotated[int, Field(ge=0)] = Field(
        0, description="vectorized engine: clients per vmap call (0 = whole cohort)"
    )
    compile: bool = Field(
        False,
        description="vectorized engine: torch.compile the mapped client function (compiles "
        "once per cohort shape, tens of seconds each; for long runs with steady cohorts)",
    )
    retain_freed_mb: Annotated[int, Field(ge=0, le=2047)] = Field(
        1024,
        description="vectorized engine: MiB of freed memory glibc keeps for reuse instead of "
        "unmapping (saves page faults on every cohort-sized tensor; 0 = leave the system "
        "allocator alone)",
    )

    @model_validator(mode="after")
    def _compile_needs_vmap(self) -> EngineConfig:
        if self.compile and self.name != "vectorized":
            raise ValueError("engine.compile=true needs engine.name=vectorized")
        return self

    def build(self) -> VectorizedEngine | SequentialEngine:
        if self.name == "sequential":
            return SequentialEngine()
        return VectorizedEngine(self.chunk_size, self.compile, self.retain_freed_mb)
