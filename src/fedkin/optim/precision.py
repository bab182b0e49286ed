"""Low-precision optimizers: weights and optimizer state kept in bf16, updates rounded
stochastically (Ozkara, Yu, Park, AISTATS 2025, arXiv 2502.20566) or to nearest.

Per step (AdamW math in fp32 on upcast copies, as the paper's BF16+SR recipe):

    θ₃₂, g₃₂, s₃₂ = float(θ), float(g), float(s);  (u, s₃₂') = tx.update(g₃₂, s₃₂, θ₃₂);
    θ' = R(θ₃₂ + u);  s' = R(s₃₂')

R is round-to-nearest-even ('nearest') or unbiased stochastic rounding ('stochastic'):
bf16 is the top 16 bits of fp32, so adding a uniform r ∈ [0, 2¹⁶) to the low 16 bits and
truncating rounds away from zero with probability (low bits)/2¹⁶ — E[R(x)] = x. With nearest,
any update below half a bf16 ulp of |θ| (2⁻⁹|θ| … 2⁻⁸|θ|) is lost, so training stalls once
updates get small; stochastic rounding keeps them in expectation.

The random bits are counter-based (:mod:`fedkin.core.rng`): a hash of (seed, step, leaf,
element, the fp32 bits being rounded), so they need no generator state, vmap, and differ
between clients whose values differ.

**Storage.** Optimizer states are bf16 tensors (2 bytes/element; 0-d step counts stay exact).
The optimizer's ``dtype`` is bf16, so the local solver
(:meth:`~fedkin.algorithms.base.Algorithm.local_solve`, vmapped over the cohort) rounds the
received weights to nearest bf16 once, holds them as bf16 tensors across its steps and returns
them upcast to the received dtype (exact: every bf16 value is an fp32 value) — the server,
population and client stores stay fp32, and FedAvg's message is the fp32 delta. Forward and
backward run in bf16 (the inputs are cast too; PyTorch's CPU matmul, convolution and
reduction kernels accumulate in fp32 and round their outputs to bf16), so the gradient is
bf16; only the update arithmetic above is fp32, on transient copies. A caller that steps fp32
weights itself (e.g. a server optimizer) gets bf16 *values* in fp32 tensors back. Zeroth-order
optimizers (:mod:`fedkin.optim.zeroth`) with a bf16 precision keep that form too (their
optimizer has no ``dtype``): SPSA's ε-perturbations (~1e-3) are below a bf16 ulp of most weights.
"""

from __future__ import annotations

from typing import Literal

import torch

from fedkin.core.rng import hash_counters
from fedkin.core.tree import Tree, tree_leaves, tree_map
from fedkin.optim.optimizer import Optimizer
from fedkin.optim.transform import GradientTransformation

Rounding = Literal["stochastic", "nearest"]


#: elements rounded per hash evaluation: bounds the int64 hash temporaries (~40 bytes per
#: element) to ~160 kB instead of a multiple of the largest weight matrix (which put SR's
#: measured step peak above fp32's); smaller chunks cost Python-level ops per step
CHUNK = 2**12


def stochastic_round_bf16(
    x: torch.Tensor, seed: int, *counters, chunk: int = CHUNK
) -> torch.Tensor:
    """Unbiased stochastic rounding of fp32 ``x`` to bf16 with counter-based random bits
    (element i's bits hash (seed, counters, i, its fp32 bits); computed ``chunk`` elements at
    a time, which does not change them)."""
    flat = x.float().reshape(-1)
    parts = []
    for start in range(0, flat.shape[0], chunk):
        bits = flat[start : start + chunk].view(torch.int32)
        idx = torch.arange(start, start + bits.shape[0], device=x.device)
        h = hash_counters(seed, *counters, idx, bits.to(torch.int64) & 0xFFFFFFFF)
        r = (h >> 16).to(torch.int32)
        parts.append(((bits + r) & -65536).view(torch.float32).bfloat16())
    return (parts[0] if len(parts) == 1 else torch.cat(parts)).reshape(x.shape)


def _round(x: torch.Tensor, rounding: Rounding, seed: int, count, leaf: int) -> torch.Tensor:
    if rounding == "nearest":
        return x.bfloat16()
    return stochastic_round_bf16(x, seed, count, leaf)


def _up(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.is_floating_point() else t


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def low_precision(
    transform: GradientTransformation, rounding: Rounding, seed: int = 0, lr: float | None = None
) -> Optimizer:
    """``transform`` with bf16 weights and state (see module doc); ``rounding`` picks R.
    The optimizer's ``dtype`` is bf16 (the local solver holds the weights in it); ``step``
    returns the new weights in the dtype of the ``params`` it was given."""

    def store(count, offset: int, fn, *trees: Tree) -> Tree:
        """R(fn(leaves…)) leaf by leaf (one leaf's fp32 value alive at a time)."""
        leaves = iter(range(offset, offset + len(tree_leaves(trees[0]))))

        def one(*xs: torch.Tensor) -> torch.Tensor:
            i, x = next(leaves), fn(*xs)
            if x.dim() == 0 or not x.is_floating_point():
                return x
            return _round(x.float(), rounding, seed, count, i)

        return tree_map(one, *trees)

    def init(params: Tree) -> Tree:
        zero = torch.zeros((), dtype=torch.int64)
        return {"inner": store(zero, 0, _same, transform.init(params)), "count": zero}

    def step(grads: Tree, state: Tree, params: Tree) -> tuple[Tree, Tree]:
        count = state["count"]
        # fp32 copies live only during the update (not bound here, so freed when it returns)
        updates, inner = transform.update(
            *(tree_map(_up, t) for t in (grads, state["inner"], params))
        )
        new = store(count, 0, lambda p, u: p.float() + u, params, updates)
        del updates
        offset = len(tree_leaves(params))
        return tree_map(lambda w, p: w.to(p.dtype), new, params), {
            "inner": store(count, offset, _same, inner),
            "count": count + 1,
        }

    return Optimizer(init, step, lr, dtype=torch.bfloat16)
