"""Low-precision optimizers: weights and optimizer state kept in bf16, updates rounded
stochastically (Ozkara, Yu, Park, AISTATS 2025, arXiv 2502.20566) or to nearest.

Per step (AdamW math in fp32 on upcast copies, as the paper's BF16+SR recipe):

    s₃₂ = float(s_bf16);  (u, s₃₂') = tx.update(g, s₃₂, θ);  θ' = R(θ + u);  s' = R(s₃₂')

R is round-to-nearest-even ('nearest') or unbiased stochastic rounding ('stochastic'):
bf16 is the top 16 bits of fp32, so adding a uniform r ∈ [0, 2¹⁶) to the low 16 bits and
truncating rounds away from zero with probability (low bits)/2¹⁶ — E[R(x)] = x. With nearest,
any update below half a bf16 ulp of |θ| (2⁻⁹|θ| … 2⁻⁸|θ|) is lost, so training stalls once
updates get small; stochastic rounding keeps them in expectation.

The random bits are counter-based (:mod:`fedkin.core.rng`): a hash of (seed, step, leaf,
element, the fp32 bits being rounded), so they need no generator state, vmap, and differ
between clients whose values differ. Optimizer states are bf16 tensors (2 bytes/element);
0-d states (step counts) stay exact. The weights are bf16 *values* — every entry is exactly
representable in bf16 — held in the model's fp32 tensors so the fp32 model runs unchanged;
a bf16 deployment stores them in 2 bytes (this module does not change the model's dtype).
"""

from __future__ import annotations

from typing import Literal

import torch

from fedkin.core.rng import hash_counters
from fedkin.core.tree import Tree, tree_leaves, tree_map
from fedkin.optim.optimizer import Optimizer
from fedkin.optim.transform import GradientTransformation

Rounding = Literal["stochastic", "nearest"]


def stochastic_round_bf16(x: torch.Tensor, seed: int, *counters) -> torch.Tensor:
    """Unbiased stochastic rounding of fp32 ``x`` to bf16 with counter-based random bits."""
    bits = x.float().view(torch.int32)
    idx = torch.arange(x.numel()).reshape(x.shape)
    h = hash_counters(seed, *counters, idx, bits.to(torch.int64) & 0xFFFFFFFF)
    r = (h >> 16).to(torch.int32)
    return ((bits + r) & -65536).view(torch.float32).bfloat16()


def _round(x: torch.Tensor, rounding: Rounding, seed: int, count, leaf: int) -> torch.Tensor:
    if rounding == "nearest":
        return x.bfloat16()
    return stochastic_round_bf16(x, seed, count, leaf)


def low_precision(
    transform: GradientTransformation, rounding: Rounding, seed: int = 0, lr: float | None = None
) -> Optimizer:
    """``transform`` with bf16 weights and state (see module doc); ``rounding`` picks R."""

    def store(tree: Tree, count, offset: int) -> Tree:
        leaves = iter(range(offset, offset + len(tree_leaves(tree))))

        def one(x: torch.Tensor) -> torch.Tensor:
            i = next(leaves)
            if x.dim() == 0 or not x.is_floating_point():
                return x
            return _round(x.float(), rounding, seed, count, i)

        return tree_map(one, tree)

    def init(params: Tree) -> Tree:
        zero = torch.zeros((), dtype=torch.int64)
        return {"inner": store(transform.init(params), zero, 0), "count": zero}

    def step(grads: Tree, state: Tree, params: Tree) -> tuple[Tree, Tree]:
        count = state["count"]
        inner = tree_map(lambda s: s.float() if s.is_floating_point() else s, state["inner"])
        updates, inner = transform.update(grads, inner, params)
        new = store(tree_map(torch.add, params, updates), count, 0)
        offset = len(tree_leaves(params))
        return tree_map(lambda w, p: w.to(p.dtype), new, params), {
            "inner": store(inner, count, offset),
            "count": count + 1,
        }

    return Optimizer(init, step, lr)
