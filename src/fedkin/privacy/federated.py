"""User-level DP for federated rounds: clip, noise and account the population messages.

Central (DP-FedAvg, McMahan et al. 2018) with uniform client weights:

    Δ̃ = ( Σ_{i∈S} clip_C(m_i) + N(0, z²C² I) ) / m,     clip_C(v) = v · min(1, C/‖v‖₂),

where m is the *expected* cohort size (fixed denominator, so one client changes the sum by at
most C). Local: each client sends clip_C(m_i) + N(0, z²C² I) and the server averages what it
receives. With adaptive clipping (Andrew et al. 2021) the clip norm follows the γ-quantile of
update norms, C ← C·exp(−η(b̄ − γ)), from a noisy count b̄ of unclipped updates; the two
Gaussian releases are split so that together they cost exactly one Gaussian with multiplier z:
z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2).

Every round records one event in a :class:`~fedkin.privacy.accountant.PrivacyAccountant`
(Poisson sampling with q = m/N, add/remove-one; or a fixed-size cohort, replace-one with
sensitivity 2C). Noise is drawn from the counter-based stream (seed, round, leaf, element), so
a resumed run adds the same noise. Personal models never enter this path.
"""

from __future__ import annotations

import math
import secrets
from typing import Any

import torch

from fedkin.core.errors import ConfigError
from fedkin.core.rng import Stream
from fedkin.core.tree import Tree, tree_leaves, tree_map
from fedkin.privacy.accountant import (
    PrivacyAccountant,
    PrivacyBudget,
    PrivacyEvent,
    calibrate_noise_multiplier,
)
from fedkin.privacy.config import PrivacyConfig

#: PLD loss-grid step: coarser than dp-accounting's default and still a valid upper bound
#: (pessimistic discretization); ~10x faster, equal to 1e-4 grids to 4 digits at typical ε.
PLD_GRID = 1e-3


def row_norms(messages: Tree, size: int) -> torch.Tensor:
    """‖m_i‖₂ over all leaves of each client's message, shape [K]."""
    total = torch.zeros(size, dtype=torch.float64)
    for leaf in tree_leaves(messages):
        total += leaf.reshape(size, -1).to(torch.float64).pow(2).sum(1)
    return total.sqrt()


def clip_factors(messages: Tree, size: int, clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """[K] float64 factors min(1, clip/‖m_k‖) and the norms ‖m_k‖."""
    norms = row_norms(messages, size)
    return (clip / norms.clamp(min=1e-12)).clamp(max=1.0), norms


def clip_rows(messages: Tree, size: int, clip: float) -> tuple[Tree, torch.Tensor]:
    """Scale each client's message to L2 norm ≤ clip; returns clipped messages and norms."""
    factor, norms = clip_factors(messages, size, clip)
    scaled = tree_map(
        lambda t: t * factor.to(t.dtype).reshape(-1, *([1] * (t.dim() - 1))), messages
    )
    return scaled, norms


def _where_rows(keep: torch.Tensor, tree: Tree, fill: float) -> Tree:
    """Rows of a stacked ``tree`` where ``keep`` [K] is True, ``fill`` elsewhere."""
    return tree_map(
        lambda t: torch.where(
            keep.reshape(-1, *([1] * (t.dim() - 1))), t, torch.full_like(t, fill)
        ),
        tree,
    )


def _map_indexed(fn, tree: Tree, counter: list[int] | None = None) -> Tree:
    """tree_map that also passes each leaf's position in a fixed traversal order."""
    counter = [0] if counter is None else counter
    out: Tree = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out[k] = _map_indexed(fn, v, counter)
        else:
            out[k] = fn(v, counter[0])
            counter[0] += 1
    return out


def central_noise(tree: Tree, stream: Stream, round_: int) -> Tree:
    """N(0, 1) noise shaped like ``tree``, a function of (round, leaf, element)."""
    return _map_indexed(
        lambda t, j: stream.normal(round_, j, torch.arange(t.numel())).reshape(t.shape).to(t.dtype),
        tree,
    )


def client_noise(tree: Tree, stream: Stream, round_: int, clients: torch.Tensor) -> Tree:
    """N(0, 1) noise shaped like a stacked ``tree`` [K, …], a function of (round, leaf, client,
    element) so each client's draw does not depend on the rest of the cohort."""

    def draw(t: torch.Tensor, j: int) -> torch.Tensor:
        idx = torch.arange(t[0].numel())
        z = stream.normal(round_, j, clients[:, None], idx[None, :])
        return z.reshape(t.shape).to(t.dtype)

    return _map_indexed(draw, tree)


class UserLevelDP:
    """Clipping, noise and accounting of population messages, one round at a time.

    The client half (:meth:`device_release`) and the server half (:meth:`server_release`) are
    functions of their arguments: the round's clip norm goes in and adaptive clipping's next one
    comes out (the caller keeps it, :class:`fedkin.channel.runtime.ChannelState`). What this
    object holds between rounds is configuration and the accountant's ledger."""

    def __init__(
        self,
        config: PrivacyConfig,
        *,
        population: int,
        cohort_size: int,
        sampling: str,
        rounds: int,
        seed: int,
    ) -> None:
        self.config = config
        self.population = population
        self.cohort_size = cohort_size
        self.sampling = sampling
        self.q = cohort_size / population
        if config.secret_noise:  # noise and Poisson cohorts unpredictable from the config
            seed = secrets.randbits(62)
        self.seed = seed
        self.stream = Stream(seed).child("dp-noise")
        self.cohort_stream = Stream(seed).child("cohort")
        self.clip = config.clip  # the configured (first round's) clip norm; never updated
        # replace-one neighbours (fixed-size cohorts; and local DP, where the released message is
        # one client's own) double the sensitivity of a clipped sum
        self.sensitivity_factor = 2.0 if sampling == "fixed" or config.mechanism == "local" else 1.0
        self.noise_multiplier = config.noise_multiplier or self._calibrate(rounds)
        self.update_noise = self.noise_multiplier
        if config.adaptive_clip is not None:
            sigma_b = config.adaptive_clip.count_noise or cohort_size / 20
            if 2 * sigma_b <= self.noise_multiplier:
                default = (
                    " (the default: expected cohort size / 20)"
                    if config.adaptive_clip.count_noise is None
                    else ""
                )
                raise ConfigError(
                    f"privacy.adaptive_clip.count_noise={sigma_b:g}{default} is too small for "
                    f"noise multiplier z={self.noise_multiplier:.4g}: set "
                    f"privacy.adaptive_clip.count_noise > z/2 = {self.noise_multiplier / 2:.4g}"
                )
            self.count_noise = sigma_b
            self.update_noise = (self.noise_multiplier**-2 - (2 * sigma_b) ** -2) ** -0.5
        budget = config.budget_epsilon
        self.budget = PrivacyBudget(budget, config.delta) if budget is not None else None
        self.accountant = PrivacyAccountant(config.accountant, pld_discretization=PLD_GRID)
        self._epsilon_memo: dict[int, float] = {}
        planned = self.epsilon_after(rounds)
        if budget is not None and planned > budget * (1 + 1e-6):
            raise ConfigError(
                f"privacy: {rounds} rounds with noise multiplier {self.noise_multiplier:.4g} "
                f"would spend ε={planned:.4g} > budget {budget:g} (δ={config.delta:g}); "
                "raise privacy.noise_multiplier, lower rounds, or raise the budget"
            )
        self.planned_epsilon = planned

    # ----- accounting ---------------------------------------------------------------------------
    def round_event(self, count: int = 1) -> PrivacyEvent:
        z = self.noise_multiplier / self.sensitivity_factor
        if self.config.mechanism == "local":
            return PrivacyEvent.gaussian(z, count=count, label="local")
        if self.sampling == "fixed":
            return PrivacyEvent.fixed_cohort_gaussian(
                z, self.population, self.cohort_size, count=count, label="round"
            )
        return PrivacyEvent.gaussian(z, sampling_prob=self.q, count=count, label="round")

    def epsilon_after(self, rounds: int) -> float:
        """ε after ``rounds`` identical rounds (memoized: each round is the same event)."""
        if rounds not in self._epsilon_memo:
            probe = PrivacyAccountant(self.config.accountant, pld_discretization=PLD_GRID)
            probe.record(self.round_event(rounds))
            self._epsilon_memo[rounds] = probe.epsilon(self.config.delta)
        return self._epsilon_memo[rounds]

    def rounds_accounted(self) -> int:
        return sum(e.count for e in self.accountant.ledger)

    def _calibrate(self, rounds: int) -> float:
        c = self.config
        if c.mechanism == "local":
            z = calibrate_noise_multiplier(
                c.target_epsilon, c.delta, 1.0, rounds, c.accountant, pld_discretization=PLD_GRID
            )
        elif self.sampling == "fixed":
            z = calibrate_noise_multiplier(
                c.target_epsilon,
                c.delta,
                steps=rounds,
                accountant=c.accountant,
                population=self.population,
                cohort_size=self.cohort_size,
            )
        else:
            z = calibrate_noise_multiplier(
                c.target_epsilon, c.delta, self.q, rounds, c.accountant, pld_discretization=PLD_GRID
            )
        return z * self.sensitivity_factor

    def can_run_round(self) -> bool:
        """False if one more round would spend more than the budget."""
        if self.budget is None:
            return True
        return self.epsilon_after(self.rounds_accounted() + 1) <= self.budget.epsilon * (1 + 1e-9)

    def record_round(self, clip: float | None = None) -> dict[str, float]:
        """Account one round; its record: ε so far and the clip norm (the round's ``clip``;
        default this object's)."""
        self.accountant.record(self.round_event())
        clip = self.clip if clip is None else clip
        return {"epsilon": self.epsilon_after(self.rounds_accounted()), "clip_norm": clip}

    def summary(self) -> dict[str, float]:
        """ε spent (main accountant and the RDP cross-check), δ and the noise multiplier."""
        delta = self.config.delta
        return {
            "epsilon": self.accountant.epsilon(delta) if self.rounds_accounted() else 0.0,
            "epsilon_rdp": self.accountant.epsilon(delta, accountant="rdp"),
            "delta": delta,
            "noise_multiplier": self.noise_multiplier,
            "planned_epsilon": self.planned_epsilon,
        }

    # ----- the channel's two halves (pure: every input is an argument) ---------------------------
    def device_release(
        self,
        messages: Tree,
        ok: torch.Tensor,
        round_: int,
        client_ids: torch.Tensor,
        clip: float | None = None,
    ) -> tuple[Tree, torch.Tensor]:
        """What client devices send under DP (a Flower node runs this on its own message;
        in-process the channel computes the same). Returns ``[K, …]`` messages and which were
        clipped. ``ok`` [K]: the client's update passed its non-finite checks.

        * central: clip_C(m_i) to the trusted server; NaN where ``ok`` is False, so the
          server's non-finite filter drops it exactly as the in-process channel does;
        * local: :meth:`release` of m_i, or of 0 where ``ok`` is False — a rejected client
          still sends a noised message, so the untrusted server cannot tell that it failed.

        ``clip``: the round's clip norm as the server broadcast it (default: the configured one).
        """
        clip = self.clip if clip is None else clip
        if self.config.mechanism == "local":
            return self.release(_where_rows(ok, messages, 0.0), round_, client_ids)
        clipped, norms = clip_rows(messages, len(client_ids), clip)
        return _where_rows(ok, clipped, float("nan")), norms > clip

    def release(
        self, messages: Tree, round_: int, client_ids: torch.Tensor
    ) -> tuple[Tree, torch.Tensor]:
        """Local DP, on the clients: m̃_i = clip_C(m_i) + z·C·ξ_i, ξ_i ~ N(0, I) a function of
        (round, leaf, client, element). Returns the released ``[K, …]`` messages and which
        were clipped."""
        clipped, norms = clip_rows(messages, len(client_ids), self.clip)
        noise = client_noise(clipped, self.stream.child("local"), round_, client_ids)
        sigma = self.noise_multiplier * self.clip
        return tree_map(lambda m, n: m + sigma * n, clipped, noise), norms > self.clip

    def server_release(
        self,
        messages: Tree,
        weights: torch.Tensor,
        was_clipped: torch.Tensor,
        accepted: int,
        round_: int,
        clip: float,
    ) -> tuple[Tree, float, dict[str, float]]:
        """The server's half for messages its clients released (:meth:`device_release` ran on
        each of them with the round's clip norm ``clip``): unit weight for every accepted
        message (central; under local DP every received release counts, a rejected client's
        being the release of 0), the noisy aggregate, and the next clip norm (adaptive
        clipping; else ``clip``) from the clients' ``was_clipped`` bits [K] and the
        ``accepted`` count. State in, state out: the caller keeps the returned clip norm."""
        if self.config.mechanism == "local":
            weights = torch.ones_like(weights)
        unit = (weights > 0).to(weights.dtype)  # the clipped sum's sensitivity is C
        noisy = self.noisy_mean(messages, unit, round_, clip)
        unclipped = int((~was_clipped & (unit > 0)).sum())
        fraction = float((was_clipped & (unit > 0)).sum() / max(len(weights), 1))
        next_clip = self.next_clip(round_, unclipped, accepted, clip)
        return noisy, next_clip, {"clipped_fraction": fraction}

    def noisy_mean(self, messages: Tree, weights: torch.Tensor, round_: int, clip: float) -> Tree:
        """The release of the weighted sum Σ_k w_k m_k with the round's clip norm C = ``clip``.

        Central: (Σ_k w_k m_k + z_Δ·C·ξ) / m, ξ ~ N(0, I) a function of (round, leaf, element)
        and m the expected cohort size; local (the messages already carry their noise):
        Σ_k w_k m_k / max(Σ_k w_k, 1). Pure, so ``vmap`` over ``weights`` and ``round_`` draws
        independent trials of the release (the audits do)."""
        total = tree_map(lambda t: torch.tensordot(weights.to(t.dtype), t, dims=1), messages)
        if self.config.mechanism == "local":
            return tree_map(lambda t: t / max(float(weights.sum()), 1.0), total)
        noise = central_noise(total, self.stream.child("central"), round_)
        sigma = self.update_noise * clip
        return tree_map(lambda t, n: (t + sigma * n) / self.cohort_size, total, noise)

    def next_clip(self, round_: int, unclipped: int, accepted: int, clip: float) -> float:
        """Adaptive clipping's next clip norm C·exp(−η(b̄ − γ)) after C = ``clip``, from the
        noisy fraction b̄ of the ``accepted`` updates that were not clipped; C without
        adaptation."""
        a = self.config.adaptive_clip
        if a is None or self.config.mechanism == "local":
            return clip
        centered = float(unclipped) - 0.5 * float(accepted)
        noise = float(self.stream.child("count").normal(round_))
        b = (centered + self.count_noise * noise) / self.cohort_size + 0.5
        return clip * math.exp(-a.learning_rate * (b - a.target_quantile))

    # ----- checkpoints --------------------------------------------------------------------------
    @property
    def central(self) -> bool:
        return self.config.mechanism == "central"

    def state_dict(self) -> dict[str, Any]:
        """The accountant and the noise seed (a run's current clip norm is channel state:
        :class:`fedkin.channel.runtime.ChannelState`)."""
        return {"accountant": self.accountant.state_dict(), "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.accountant.load_state_dict(state["accountant"])
        self.seed = state["seed"]
        self.stream = Stream(self.seed).child("dp-noise")
        self.cohort_stream = Stream(self.seed).child("cohort")
