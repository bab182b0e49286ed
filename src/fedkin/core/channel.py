"""The path client messages travel to the server: a pipeline of steps, then an aggregator.

Each step is a pure function of the stacked messages ``[K, …]`` and per-client weights
``[K]`` that returns new messages and weights plus metrics (e.g. how many were rejected).
The foundation ships the non-finite filter and (weighted) mean aggregation; clipping,
compression, attacks and DP noise plug in as further steps.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fedkin.core.tree import Tree, tree_leaves, tree_map

Step = Callable[[Tree, torch.Tensor], tuple[Tree, torch.Tensor, dict[str, float]]]


def finite_rows(tree: Tree, size: int) -> torch.Tensor:
    """Bool ``[K]``: True where every entry of client k's message is finite."""
    ok = torch.ones(size, dtype=torch.bool)
    for leaf in tree_leaves(tree):
        ok &= torch.isfinite(leaf.reshape(size, -1)).all(dim=1)
    return ok


def reject_nonfinite(messages: Tree, weights: torch.Tensor) -> tuple[Tree, torch.Tensor, dict]:
    """Give zero weight to messages containing NaN/Inf and zero them so they cannot leak in."""
    ok = finite_rows(messages, len(weights))
    if ok.all():
        return messages, weights, {"rejected_updates": 0.0}
    cleaned = tree_map(
        lambda t: torch.where(ok.reshape(-1, *([1] * (t.dim() - 1))), t, torch.zeros_like(t)),
        messages,
    )
    return cleaned, weights * ok, {"rejected_updates": float((~ok).sum())}


def weighted_mean(messages: Tree, weights: torch.Tensor) -> Tree:
    """Σ_k p_k m_k with p = weights / Σ weights (zero if every weight is zero)."""
    total = weights.sum()
    p = weights / total if total > 0 else torch.zeros_like(weights)
    return tree_map(lambda t: torch.tensordot(p.to(t.dtype), t, dims=1), messages)


class Channel:
    """Runs the steps in order, then the aggregator; collects the steps' metrics."""

    def __init__(
        self,
        steps: list[Step] | None = None,
        aggregator: Callable[[Tree, torch.Tensor], Tree] = weighted_mean,
    ) -> None:
        self.steps = [reject_nonfinite] if steps is None else steps
        self.aggregator = aggregator

    def __call__(self, messages: Tree, weights: torch.Tensor) -> tuple[Tree, dict[str, float]]:
        metrics: dict[str, float] = {}
        for step in self.steps:
            messages, weights, m = step(messages, weights)
            metrics.update(m)
        metrics["accepted_updates"] = float((weights > 0).sum())
        return self.aggregator(messages, weights), metrics
