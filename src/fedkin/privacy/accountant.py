"""Differential-privacy accounting: a JSON-able ledger of noise events, composed by dp-accounting.

Every private computation in fedkin (a private estimate, each round of DP-FedAvg) records what
it released as a :class:`PrivacyEvent`: a Gaussian (or Laplace) mechanism with *noise
multiplier* ``z`` (noise std / L2 sensitivity), optionally applied to a sampled cohort, repeated
``count`` times. :class:`PrivacyAccountant` keeps these events in a ledger and asks the
dp-accounting library for the (ε, δ) of their composition:

* ``"pld"`` (default): privacy-loss distributions, numerically tight
  (``dp_accounting.pld.PLDAccountant``);
* ``"rdp"``: Rényi DP, a looser but fast upper bound, used as a cross-check and the only backend
  for fixed-size cohorts (``dp_accounting.rdp.RdpAccountant``).

Sampling of users each round:

* ``sampling="none"``: every user takes part (one-shot releases, cross-silo rounds);
* ``"poisson"``: each user joins independently with probability ``q``
  (``PoissonSampledDpEvent``; add/remove-one neighbours, sensitivity of a sum clipped at C is C);
* ``"fixed_size"``: a cohort of exactly ``cohort_size`` out of ``population`` without
  replacement (``SampledWithoutReplacementDpEvent``; replace-one neighbours, so a sum clipped at
  C has sensitivity 2C; RDP only).

A ledger with fixed-size cohorts is accounted under the replace-one relation, every other ledger
under add/remove-one; the noise multipliers you record must be relative to the sensitivity
under that relation. Composition is commutative, so identical events are merged and composed
once with their total count (PLD self-composition by FFT is far cheaper than composing one round
at a time). The ledger is plain data: :meth:`PrivacyAccountant.state_dict` returns it and
:meth:`PrivacyAccountant.load_state_dict` re-composes it, so a resumed run reports the same ε.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import dp_accounting as dpa
from dp_accounting import pld, rdp

from fedkin.core.errors import ConfigError, UserError

AccountantKind = Literal["pld", "rdp"]
Mechanism = Literal["gaussian", "laplace"]
Sampling = Literal["none", "poisson", "fixed_size"]
_STATE_VERSION = 1


class UnsupportedAccountingError(ConfigError):
    """The chosen accountant cannot compose this combination of events."""


class BudgetExceededError(UserError):
    """Recording an event would spend more than the accountant's (ε, δ) budget."""


@dataclass(frozen=True)
class PrivacyBudget:
    """An (ε, δ) budget: ε > 0 and 0 < δ < 1."""

    epsilon: float
    delta: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.epsilon) and self.epsilon > 0):
            raise ConfigError(f"privacy budget epsilon must be finite and > 0, got {self.epsilon}")
        if not 0 < self.delta < 1:
            raise ConfigError(f"privacy budget delta must be in (0, 1), got {self.delta}")


@dataclass(frozen=True)
class PrivacyEvent:
    """``count`` applications of one (optionally subsampled) noise mechanism.

    ``noise_multiplier`` is noise std / L2 sensitivity (Gaussian) or Laplace scale / L1
    sensitivity (Laplace). ``label`` is free text for the ledger (e.g. ``"round"``).
    """

    noise_multiplier: float
    mechanism: Mechanism = "gaussian"
    sampling: Sampling = "none"
    sampling_prob: float = 1.0
    population: int = 0
    cohort_size: int = 0
    count: int = 1
    label: str = ""

    def __post_init__(self) -> None:
        if self.mechanism not in ("gaussian", "laplace"):
            raise ConfigError(f"mechanism must be 'gaussian' or 'laplace', got {self.mechanism!r}")
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise ConfigError(f"noise_multiplier must be > 0, got {self.noise_multiplier}")
        if not (isinstance(self.count, int) and self.count >= 1):
            raise ConfigError(f"count must be a positive integer, got {self.count!r}")
        if self.sampling == "none":
            if self.sampling_prob != 1.0 or self.population or self.cohort_size:
                raise ConfigError("sampling='none' takes no sampling_prob/population/cohort_size")
        elif self.sampling == "poisson":
            if not 0 < self.sampling_prob <= 1:
                raise ConfigError(f"sampling_prob must be in (0, 1], got {self.sampling_prob}")
        elif self.sampling == "fixed_size":
            if self.mechanism != "gaussian":
                raise ConfigError("fixed-size cohorts support the Gaussian mechanism only")
            if not 0 < self.cohort_size <= self.population:
                raise ConfigError(
                    f"need 0 < cohort_size <= population, got {self.cohort_size}, {self.population}"
                )
        else:
            raise ConfigError(
                f"sampling must be 'none', 'poisson' or 'fixed_size', got {self.sampling!r}"
            )

    @classmethod
    def gaussian(
        cls,
        noise_multiplier: float,
        *,
        sampling_prob: float | None = None,
        count: int = 1,
        label: str = "",
    ) -> PrivacyEvent:
        """Gaussian mechanism, Poisson-sampled with probability ``sampling_prob`` if given."""
        if sampling_prob is None:
            return cls(noise_multiplier, count=count, label=label)
        return cls(
            noise_multiplier,
            sampling="poisson",
            sampling_prob=sampling_prob,
            count=count,
            label=label,
        )

    @classmethod
    def fixed_cohort_gaussian(
        cls,
        noise_multiplier: float,
        population: int,
        cohort_size: int,
        *,
        count: int = 1,
        label: str = "",
    ) -> PrivacyEvent:
        """Gaussian mechanism on a uniformly drawn cohort of exactly ``cohort_size`` users."""
        return cls(
            noise_multiplier,
            sampling="fixed_size",
            population=population,
            cohort_size=cohort_size,
            count=count,
            label=label,
        )

    def one(self, noise_multiplier: float | None = None) -> dpa.DpEvent:
        """The dp-accounting event for a single application (``count`` is applied by the caller).

        ``noise_multiplier`` overrides the event's own (calibration searches over it, from 0).
        """
        z = self.noise_multiplier if noise_multiplier is None else noise_multiplier
        base: dpa.DpEvent = (
            dpa.GaussianDpEvent(z) if self.mechanism == "gaussian" else dpa.LaplaceDpEvent(z)
        )
        if self.sampling == "poisson" and self.sampling_prob < 1:
            return dpa.PoissonSampledDpEvent(self.sampling_prob, base)
        if self.sampling == "fixed_size":
            return dpa.SampledWithoutReplacementDpEvent(self.population, self.cohort_size, base)
        return base

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PrivacyEvent:
        return cls(**data)

    def _group_key(self) -> PrivacyEvent:
        return dataclasses.replace(self, count=1, label="")


def _relation(events: Iterable[PrivacyEvent]) -> dpa.NeighboringRelation:
    kinds = {e.sampling for e in events}
    if "fixed_size" in kinds and "poisson" in kinds:
        raise UnsupportedAccountingError(
            "cannot compose Poisson-sampled and fixed-size cohorts in one ledger: they use "
            "different neighbouring relations (add/remove-one vs replace-one)"
        )
    if "fixed_size" in kinds:
        return dpa.NeighboringRelation.REPLACE_ONE
    return dpa.NeighboringRelation.ADD_OR_REMOVE_ONE


def _fresh(
    kind: AccountantKind, relation: dpa.NeighboringRelation, pld_discretization: float
) -> dpa.PrivacyAccountant:
    if kind == "pld":
        if relation is dpa.NeighboringRelation.REPLACE_ONE:
            raise UnsupportedAccountingError(
                "the PLD accountant cannot account fixed-size cohorts (sampling without "
                "replacement); use accountant='rdp' or Poisson sampling"
            )
        return pld.PLDAccountant(relation, value_discretization_interval=pld_discretization)
    if kind == "rdp":
        return rdp.RdpAccountant(neighboring_relation=relation)
    raise ConfigError(f"accountant must be 'pld' or 'rdp', got {kind!r}")


def _compose(
    events: Sequence[PrivacyEvent], kind: AccountantKind, pld_discretization: float
) -> dpa.PrivacyAccountant:
    """A fresh dp-accounting accountant holding the composition of ``events``."""
    acc = _fresh(kind, _relation(events), pld_discretization)
    totals: Counter[PrivacyEvent] = Counter()
    for e in events:
        totals[e._group_key()] += e.count
    for event, count in sorted(totals.items(), key=lambda kv: repr(kv[0])):
        one = event.one()
        if not acc.supports(one):
            raise UnsupportedAccountingError(
                f"the {kind.upper()} accountant cannot compose a {event.mechanism} mechanism "
                f"with sampling={event.sampling!r}"
            )
        acc.compose(one, count)
    return acc


class PrivacyAccountant:
    """Ledger of :class:`PrivacyEvent` s with (ε, δ) from dp-accounting (PLD default, RDP option).

    ``budget`` (optional) makes :meth:`record` refuse any event that would push ε past
    ``budget.epsilon`` at ``budget.delta`` (:class:`BudgetExceededError`); nothing is recorded
    then. ε for the current ledger is cached, so reading it every round is cheap.
    """

    def __init__(
        self,
        kind: AccountantKind = "pld",
        *,
        budget: PrivacyBudget | None = None,
        pld_discretization: float = 1e-4,
    ) -> None:
        if kind not in ("pld", "rdp"):
            raise ConfigError(f"accountant must be 'pld' or 'rdp', got {kind!r}")
        self.kind: AccountantKind = kind
        self.budget = budget
        self.pld_discretization = pld_discretization
        self._ledger: list[PrivacyEvent] = []
        self._cache: dict[tuple[str, tuple[PrivacyEvent, ...]], dpa.PrivacyAccountant] = {}

    @property
    def ledger(self) -> tuple[PrivacyEvent, ...]:
        return tuple(self._ledger)

    def _accountant(
        self, events: Sequence[PrivacyEvent], kind: AccountantKind | None = None
    ) -> dpa.PrivacyAccountant:
        kind = kind or self.kind
        key = (kind, tuple(events))
        if key not in self._cache:
            if len(self._cache) >= 4:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = _compose(events, kind, self.pld_discretization)
        return self._cache[key]

    def epsilon(self, delta: float, *, accountant: AccountantKind | None = None) -> float:
        """ε of everything recorded so far at ``delta`` (0 for an empty ledger).

        ``accountant`` overrides the backend for this query, e.g. ``"rdp"`` to cross-check PLD.
        """
        if not 0 < delta < 1:
            raise ConfigError(f"delta must be in (0, 1), got {delta}")
        if not self._ledger:
            return 0.0
        return float(self._accountant(self._ledger, accountant).get_epsilon(delta))

    def delta(self, epsilon: float, *, accountant: AccountantKind | None = None) -> float:
        """δ of everything recorded so far at ``epsilon``."""
        if not self._ledger:
            return 0.0
        return float(self._accountant(self._ledger, accountant).get_delta(epsilon))

    def would_exceed(
        self, event: PrivacyEvent | Sequence[PrivacyEvent], budget: PrivacyBudget | None = None
    ) -> bool:
        """Whether recording ``event`` (or events) would spend more than ``budget``.

        ``budget`` defaults to the accountant's own; with neither, nothing can be exceeded.
        """
        budget = budget or self.budget
        if budget is None:
            return False
        extra = [event] if isinstance(event, PrivacyEvent) else list(event)
        acc = self._accountant([*self._ledger, *extra])
        return float(acc.get_epsilon(budget.delta)) > budget.epsilon

    def record(self, event: PrivacyEvent) -> None:
        """Append ``event`` to the ledger, refusing it if it would exceed the budget."""
        if self.would_exceed(event):
            assert self.budget is not None
            spent = self.epsilon(self.budget.delta)
            raise BudgetExceededError(
                f"privacy budget exhausted: {event.label or 'this release'} would raise ε from "
                f"{spent:.4g} past the budget ε={self.budget.epsilon:g} at δ={self.budget.delta:g}"
            )
        last = self._ledger[-1] if self._ledger else None
        if last is not None and dataclasses.replace(last, count=event.count) == event:
            self._ledger[-1] = dataclasses.replace(last, count=last.count + event.count)
        else:
            self._ledger.append(event)

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON-able state: backend, budget and the ledger."""
        return {
            "version": _STATE_VERSION,
            "kind": self.kind,
            "pld_discretization": self.pld_discretization,
            "budget": None if self.budget is None else dataclasses.asdict(self.budget),
            "ledger": [e.to_dict() for e in self._ledger],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the ledger is re-composed on the next query."""
        if state.get("version") != _STATE_VERSION:
            raise ConfigError(f"unknown accountant state version {state.get('version')!r}")
        if state["kind"] not in ("pld", "rdp"):
            raise ConfigError(f"accountant must be 'pld' or 'rdp', got {state['kind']!r}")
        self.kind = state["kind"]
        self.pld_discretization = float(state["pld_discretization"])
        self.budget = None if state["budget"] is None else PrivacyBudget(**state["budget"])
        self._ledger = [PrivacyEvent.from_dict(e) for e in state["ledger"]]
        self._cache.clear()


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sampling_prob: float = 1.0,
    steps: int = 1,
    accountant: AccountantKind = "pld",
    *,
    population: int | None = None,
    cohort_size: int | None = None,
    pld_discretization: float = 1e-4,
) -> float:
    """Smallest noise multiplier ``z`` whose ``steps``-fold composition is (target_ε, δ)-DP.

    Each step is a Gaussian mechanism, Poisson-sampled with ``sampling_prob`` (1 = everyone),
    or, with ``population`` and ``cohort_size``, run on a fixed-size cohort (RDP only).
    Without sampling, ``steps`` Gaussians with multiplier ``z`` are exactly one Gaussian with
    ``z/√steps``, so PLD starts from dp-accounting's analytic Gaussian calibration
    (``get_sigma_gaussian``); otherwise ``dp_accounting.calibrate_dp_mechanism`` searches with
    Brent's method. Either way ``z`` is then raised until the accountant's own ε is
    ``<= target_epsilon`` (with PLD at ``pld_discretization``, the loss-grid step; coarser is
    faster and still a valid, slightly looser, upper bound).
    """
    PrivacyBudget(target_epsilon, delta)
    if not (isinstance(steps, int) and steps >= 1):
        raise ConfigError(f"steps must be a positive integer, got {steps!r}")

    def event(z: float) -> PrivacyEvent:
        if population is not None or cohort_size is not None:
            return PrivacyEvent.fixed_cohort_gaussian(
                z, int(population or 0), int(cohort_size or 0), count=steps
            )
        q = None if sampling_prob == 1 else sampling_prob
        return PrivacyEvent.gaussian(z, sampling_prob=q, count=steps)

    def eps(z: float) -> float:
        return float(_compose([event(z)], accountant, pld_discretization).get_epsilon(delta))

    template = event(1.0)
    relation = _relation([template])
    if template.sampling == "none" and accountant == "pld":
        z = float(dpa.get_sigma_gaussian(target_epsilon, delta)) * math.sqrt(steps)
    else:
        tol = 1e-6
        # z = 0 is non-private (ε = ∞) for every event except sampling without replacement,
        # whose RDP formula divides by z; start that search from a tiny positive multiplier.
        lower = 1e-2 if template.sampling == "fixed_size" else 0.0

        def make_event(z: float) -> dpa.DpEvent:
            return dpa.SelfComposedDpEvent(template.one(z), steps)

        z = tol + float(
            dpa.calibrate_dp_mechanism(
                lambda: _fresh(accountant, relation, pld_discretization),
                make_event,
                target_epsilon,
                delta,
                bracket_interval=dpa.LowerEndpointAndGuess(lower, 1.0),
                tol=tol,
            )
        )
    while eps(z) > target_epsilon:
        z *= 1 + 1e-5
    return z
