"""The path client messages travel to the server: a pipeline of steps, then an aggregator.

Each step is a function of the stacked messages ``[K, …]``, per-client weights ``[K]`` and the
round number that returns new messages and weights plus metrics (e.g. how many were
rejected); the aggregator turns them into one message. A run's channel — compression, robust
rules, attacks and DP, with explicit state — is :mod:`fedkin.channel.runtime`, built on the
non-finite filter and the weighted mean here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fedkin.core.tree import Tree, tree_leaves, tree_map

Step = Callable[[Tree, torch.Tensor, int], tuple[Tree, torch.Tensor, dict[str, float]]]
Aggregator = Callable[[Tree, torch.Tensor, int], Tree]


def finite_rows(tree: Tree, size: int) -> torch.Tensor:
    """Bool ``[K]``: True where every entry of client k's message is finite.

    A NaN or ±Inf entry makes its row's sum non-finite, so one reduction clears the usual
    all-finite rows (an elementwise ``isfinite`` pass costs ~25x more); only rows whose sum is
    not finite — a bad entry, or finite entries whose sum overflows — are checked entry by entry.
    """
    leaves = tree_leaves(tree)
    ok = torch.ones(size, dtype=torch.bool, device=leaves[0].device if leaves else "cpu")
    for leaf in leaves:
        rows = leaf.reshape(size, -1)
        leaf_ok = torch.isfinite(rows.sum(dim=1))
        suspects = (~leaf_ok).nonzero().squeeze(1)
        if len(suspects):
            leaf_ok[suspects] = torch.isfinite(rows[suspects]).all(dim=1)
        ok &= leaf_ok
    return ok


def reject_nonfinite(
    messages: Tree, weights: torch.Tensor, round_: int = 0
) -> tuple[Tree, torch.Tensor, dict]:
    """Give zero weight to messages containing NaN/Inf and zero them so they cannot leak in."""
    ok = finite_rows(messages, len(weights))
    if ok.all():
        return messages, weights, {"rejected_updates": 0.0}
    cleaned = tree_map(
        lambda t: torch.where(ok.reshape(-1, *([1] * (t.dim() - 1))), t, torch.zeros_like(t)),
        messages,
    )
    return cleaned, weights * ok, {"rejected_updates": float((~ok).sum())}


def weighted_mean(messages: Tree, weights: torch.Tensor, round_: int = 0) -> Tree:
    """Σ_k p_k m_k with p = weights / Σ weights (zero if every weight is zero)."""
    total = weights.sum()
    p = weights / total if total > 0 else torch.zeros_like(weights)
    return tree_map(lambda t: torch.tensordot(p.to(t.dtype), t, dims=1), messages)


class Channel:
    """Runs the steps in order, then the aggregator; collects the steps' metrics."""

    def __init__(
        self,
        steps: list[Step] | None = None,
        aggregator: Aggregator = weighted_mean,
    ) -> None:
        self.steps = [reject_nonfinite] if steps is None else steps
        self.aggregator = aggregator

    def __call__(
        self, messages: Tree, weights: torch.Tensor, round_: int = 0
    ) -> tuple[Tree, dict[str, float]]:
        metrics: dict[str, float] = {}
        for step in self.steps:
            messages, weights, m = step(messages, weights, round_)
            metrics.update(m)
        metrics["accepted_updates"] = float((weights > 0).sum())
        return self.aggregator(messages, weights, round_), metrics
