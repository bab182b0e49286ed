"""Client-side Polyak momentum: what makes nearest-neighbour averaging (MoNNA) and centered
clipping robust over rounds.

Each client keeps a momentum m_i (its channel state, in the channel's client-state store next
to the error-feedback residual; zero before its first round) and, in every round it takes part
in, sends m_i instead of its model delta Δ_i:

    m_i ← β m_i + (1 − β) Δ_i          (β ∈ [0, 1); β = 0 sends Δ_i and keeps no state)

as ByzFL's ``Client.get_flat_gradients_with_momentum`` (momentum = dampening = β) and MoNNA's
"momentum at the worker" (Farhadkhani et al., ICML 2023); Karimireddy et al. (ICML 2021) show
that centered clipping needs this worker momentum to resist attacks that are small per round.
Averaging over rounds shrinks the honest messages' variance by about (1 − β)/(1 + β), so a
distance-based rule separates honest from Byzantine messages more reliably. A client updates
m_i only in rounds it takes part in; a rejected (non-finite) update leaves it unchanged.

**Where it sits.** It is the first step of the client half, on the model delta only (message
key ``"delta"``; bookkeeping keys are untouched): momentum → attack simulation → compression
(error feedback of the momentum) → the DP release (clip, local noise). Honest clients thus send
their momentum, omniscient attacks see the honest momenta (as in ByzFL, whose attacks see the
honest clients' momentum vectors), and a Byzantine client sends the attack; its own momentum
(of its honestly trained — or label-poisoned — delta) is what ``scaled`` or ``sign_flip`` with
``reference=own`` start from.

**Under DP** it composes. The release clips the momentum, not the delta, so every round's
contribution of a client has norm ≤ C whatever the momentum holds, and m_i itself never leaves
the client. The accounting stays valid although m_i depends on the client's earlier
(secretly sampled) rounds: conditioned on the released history, one round's output is a mixture,
over the client's hidden state, of Poisson-subsampled Gaussians whose means have norm ≤ C, and
both Rényi and hockey-stick divergences are convex in the mixture, so each round is dominated
by the same subsampled Gaussian the accountant composes.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field


class MomentumConfig(BaseModel):
    """Client-side Polyak momentum m ← βm + (1 − β)Δ, sent instead of the model delta Δ."""

    model_config = ConfigDict(extra="forbid")
    name: Literal["momentum"] = "momentum"
    beta: float = Field(
        0.9,
        ge=0,
        lt=1,
        description="momentum β in [0, 1) (0: send Δ unchanged, no state kept)",
    )

    @property
    def stateful(self) -> bool:
        """Whether clients keep a momentum (β > 0)."""
        return self.beta > 0


def polyak_momentum(
    momentum: torch.Tensor, delta: torch.Tensor, beta: float, ok: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """For rows ``[K, d]``: the messages m' = β m + (1 − β) Δ and the new state, which is m'
    where ``ok`` [K] and the old m where the update was rejected."""
    sent = beta * momentum + (1 - beta) * delta
    return sent, torch.where(ok[:, None], sent, momentum)
