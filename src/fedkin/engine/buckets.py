"""Cohort buckets: a compiled engine pads each cohort to one of a few sizes.

``torch.compile`` specializes its graph to the cohort size, so a run whose cohort size varies
(Poisson sampling, the last chunk of a chunked cohort, evaluation over a different number of
clients) would compile once per distinct size — tens of seconds each. The compiled engine
instead pads a cohort of ``n`` clients to the bucket

    b(n) = min { ⌈L / 2^k⌉ : k ≥ 0, ⌈L / 2^k⌉ ≥ n }   for n ≤ L,      L · 2^⌈log₂(n / L)⌉  above,

where ``L`` is the largest cohort the run plans (:class:`~fedkin.engine.plan.EnginePlan`; the
first cohort seen when there is no plan). A run with fixed-size cohorts compiles its training
function once, and other cohort sizes (evaluation, a chunked cohort's last chunk) at most
double their work. Under Poisson sampling the size varies every round over a range wider than
a factor of two when the mean cohort ``k`` is small, so the plan asks for one bucket instead:
every cohort up to ``L = k + 4σ`` pads to ``L`` (work ×``L/k ≈ 1 + 4/√k`` on average: 1.4 at
``k = 100``, 1.13 at ``k = 1000``) and the run compiles once.

The padding clients are copies of the cohort's first client (valid inputs for any function:
indices stay in range, masks stay non-empty). ``vmap`` computes every client independently,
so they change nothing in the real clients' results — bit for bit, tested — and their outputs
are cut off before anything else sees them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils._pytree import tree_map

from fedkin.engine.args import _leafwise


def bucket_size(n: int, largest: int = 1, halve: bool = True) -> int:
    """The bucket a cohort of ``n ≥ 1`` clients is padded to, given the largest planned
    cohort ``largest`` (see the module docstring); ``halve=False``: one bucket up to
    ``largest``."""
    if n < 1:
        raise ValueError(f"a cohort has at least one client, got {n}")
    largest = max(largest, 1)
    if n > largest:
        return largest * 2 ** math.ceil(math.log2(n / largest))
    size = largest
    if not halve:
        return size
    while math.ceil(size / 2) >= n and size > 1:
        size = math.ceil(size / 2)
    return size


def _pad_tensor(t: torch.Tensor, dim: int, extra: int) -> torch.Tensor:
    first = t.narrow(dim, 0, 1)
    shape = list(t.shape)
    shape[dim] = extra
    return torch.cat([t, first.expand(shape)], dim)


def pad_args(args: Sequence[Any], in_dims: Sequence[int | None], extra: int) -> tuple:
    """``args`` with ``extra`` copies of client 0 appended along each client dimension."""
    if extra == 0:
        return tuple(args)
    return tuple(
        a if d is None else _leafwise(a, lambda t, d=d: _pad_tensor(t, d, extra))
        for a, d in zip(args, in_dims, strict=True)
    )


def unpad(out: Any, n: int) -> Any:
    """The first ``n`` clients of a mapped output (any tree; client dimension leading)."""
    return tree_map(lambda t: t[:n], out)
