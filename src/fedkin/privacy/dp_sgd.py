"""Example-level ε of DP-SGD inside clients (accounting only; the mechanism is the transformation
:meth:`fedkin.algorithms.base.Algorithm.dp_aggregate` inside the shared local solver).

In each round it trains, client i draws every local batch by Poisson sampling — each of its n_i
examples independently with probability q_i = min(1, B/n_i) — and computes r ≥ 1 clipped,
noised gradients on that batch (r = 1 for plain DP-SGD; Ditto's global and personal solves
share their batches, r = 2; pFedMe's inner steps reuse one batch). The r Gaussian releases on
one sampled batch compose adaptively to exactly a Gaussian with multiplier σ/√r, and Poisson
sampling amplifies that composition, so one batch costs

    PoissonSampled(q_i, Gaussian(σ/√r)),

under add/remove-one neighbouring datasets (q_i = 1: no amplification). A client composes these
over the batches of one ``client_update`` and over its p_i participations. ε grows with q_i and
with p_i, so the largest ε over clients is attained on the Pareto frontier of (q_i, p_i); this
module composes exactly those clients (RDP, dp-accounting) and reports their maximum. n_i (and
with it q_i) is treated as public, as Opacus treats its sample rate.

The uses r per batch come from the clients themselves: every ``client_update`` under DP-SGD
returns the metric ``dp_steps`` (``[S]``: how many clipped, noised gradients it computed on each
of its S batches, :meth:`~fedkin.algorithms.base.Algorithm.with_dp_steps`), which
:func:`batch_uses` turns into the ledger's ``uses``. It is a function of the config only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch.nn.functional import pad

from fedkin.privacy.accountant import PrivacyAccountant, PrivacyEvent


def client_events(
    noise_multiplier: float, q: float, participations: int, uses: Sequence[int]
) -> list[PrivacyEvent]:
    """The ledger of one client: for each batch of a ``client_update`` used ``r`` times
    (``uses``), ``participations`` Poisson(q)-subsampled Gaussians with multiplier σ/√r."""
    return [
        PrivacyEvent.gaussian(
            noise_multiplier / math.sqrt(r),
            sampling_prob=None if q >= 1 else q,
            count=participations,
        )
        for r in uses
    ]


def batch_uses(dp_steps: torch.Tensor, previous: Sequence[int] = ()) -> list[int]:
    """The ``uses`` of :func:`example_epsilon` (sorted) from a cohort's ``dp_steps`` metric
    (``[K, S]``: client k's DP-SGD gradients on each of its S batches) and the ``previous``
    ledger: with each ledger sorted in decreasing order, their elementwise maximum, unused
    batches (0) dropped. Every client's row is the same (the counts follow from the config); the
    maximum is a ledger that dominates each of them (the cost of a batch grows with r). Rows with
    a non-finite entry (clients lost on the way) are skipped."""
    rows = dp_steps.detach().to("cpu").reshape(len(dp_steps), -1)
    rows = rows[torch.isfinite(rows).all(1)].round().long().sort(1, descending=True).values
    ledger = torch.tensor(sorted(previous, reverse=True), dtype=torch.long)
    width = max(rows.shape[1], len(ledger))
    ledger = pad(ledger, (0, width - len(ledger)))
    if len(rows):
        ledger = torch.maximum(ledger, pad(rows, (0, width - rows.shape[1])).amax(0))
    return sorted(int(r) for r in ledger if r > 0)


def example_epsilon(
    noise_multiplier: float,
    delta: float,
    batch_size: int,
    train_sizes: torch.Tensor,
    participations: torch.Tensor,
    uses: Sequence[int],
) -> float:
    """Largest example-level ε over clients (0 if none trained): client i has ``train_sizes[i]``
    examples, took part in ``participations[i]`` rounds, and each ``client_update`` used its
    batches ``uses`` times (one entry per batch)."""
    seen = participations > 0
    if not bool(seen.any()) or not uses:
        return 0.0
    q = (batch_size / train_sizes[seen].to(torch.float64)).clamp(max=1.0)
    p = participations[seen]
    pairs = sorted({(float(a), int(b)) for a, b in zip(q, p, strict=True)}, reverse=True)
    frontier, most = [], 0  # clients no other client dominates in both q and p
    for qi, pi in pairs:
        if pi > most:
            frontier.append((qi, pi))
            most = pi
    epsilons = []
    for qi, pi in frontier:
        accountant = PrivacyAccountant("rdp")
        for event in client_events(noise_multiplier, qi, pi, uses):
            accountant.record(event)
        epsilons.append(accountant.epsilon(delta))
    return max(epsilons)
