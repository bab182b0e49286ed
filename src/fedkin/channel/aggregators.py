"""Aggregation rules for stacked client messages ``x ∈ ℝ^{n×d}`` with weights ``w ∈ ℝ^n``.

The math lives in plain functions of tensors (one per rule, checked against ByzFL in the tests);
each rule also has a pydantic config whose ``build(seed)`` returns an :class:`Aggregator` — an
``init``/``apply`` pair with the rule's state passed in and returned (never held), so it can be
checkpointed. ``f`` is the declared number of Byzantine messages among the ``n`` received.

Rows with zero weight (e.g. rejected as non-finite) are dropped before any rule runs; robust
rules then ignore the weights (every accepted message counts once), as in the literature.
Pre-aggregations (NNM, bucketing, trusted-direction projection) map ``n`` messages to ``n'``
messages and compose with any rule through the ``pre`` option; a stateful one (trusted-direction
projection, ``channel/trusted.py``) returns a :class:`StatefulPre`, whose state lives in the
rule's state under ``pre<i>/`` keys.
"""

from __future__ import annotations

import itertools
import math
from abc import abstractmethod
from collections.abc import Callable
from typing import Literal, NamedTuple

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from fedkin.core.rng import Stream
from fedkin.registry import (
    AGGREGATOR_REGISTRY,
    PREAGGREGATOR_REGISTRY,
    register_aggregator,
    register_preaggregator,
)

AggState = dict[str, torch.Tensor]


class Aggregator(NamedTuple):
    """``init(d)`` gives the rule's starting state; ``apply(x [n, d], w [n], state, round)``
    returns ``(aggregate [d], new state, metrics)``."""

    init: Callable[[int], AggState]
    apply: Callable[
        [torch.Tensor, torch.Tensor, AggState, int],
        tuple[torch.Tensor, AggState, dict[str, float]],
    ]


# ---------------------------------------------------------------------------------------------
# The rules as plain functions


def _check_f(n: int, f: int, rule: str) -> None:
    if 2 * f >= n:
        raise ValueError(f"{rule} needs 2f < n messages; got f={f}, n={n}")


def _distances(x: torch.Tensor) -> torch.Tensor:
    """Pairwise Euclidean distances ``[n, n]`` computed directly (not via the Gram matrix, whose
    cancellation error would break ties differently from the reference)."""
    return torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist")


def mean(x: torch.Tensor) -> torch.Tensor:
    """(1/n) Σ_i x_i."""
    return x.mean(dim=0)


def weighted_mean(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Σ_i p_i x_i with p = w / Σ w (zero if every weight is zero)."""
    total = w.sum()
    p = w / total if total > 0 else torch.zeros_like(w)
    return p.to(x.dtype) @ x


def coordinate_median(x: torch.Tensor) -> torch.Tensor:
    """Per coordinate the median; for even n the mean of the two middle values (numpy's)."""
    s = x.sort(dim=0).values
    n = len(x)
    return 0.5 * (s[(n - 1) // 2] + s[n // 2])


def trimmed_mean(x: torch.Tensor, f: int) -> torch.Tensor:
    """Per coordinate drop the f largest and f smallest values and average the n − 2f rest."""
    n = len(x)
    _check_f(n, f, "trimmed_mean")
    return x.sort(dim=0).values[f : n - f].mean(dim=0)


def krum_scores(x: torch.Tensor, f: int) -> torch.Tensor:
    """score_i = mean of the squared distances from x_i to its n − f − 1 nearest other messages.

    This is ByzFL's variant (it needs only 2f < n); Blanchard et al. sum over n − f − 2
    neighbours and need n > 2f + 2."""
    n = len(x)
    _check_f(n, f, "krum")
    d2 = _distances(x) ** 2
    return d2.sort(dim=1).values[:, 1 : n - f].mean(dim=1)


def krum(x: torch.Tensor, f: int) -> torch.Tensor:
    """The message with the lowest Krum score."""
    return x[krum_scores(x, f).argmin()]


def multi_krum(x: torch.Tensor, f: int, m: int | None = None) -> torch.Tensor:
    """Mean of the m messages with the lowest Krum scores (m = n − f by default)."""
    m = len(x) - f if m is None else m
    order = krum_scores(x, f).argsort(stable=True)
    return x[order[:m]].mean(dim=0)


def geometric_median(x: torch.Tensor, nu: float = 0.1, iterations: int = 3) -> torch.Tensor:
    """Smoothed Weiszfeld from z = 0: repeat β_i = 1/max(ν, ‖x_i − z‖), z = Σ β_i x_i / Σ β_i.

    Rows with a non-finite entry are left out (as ByzFL leaves out rows with ±Inf)."""
    x = x[torch.isfinite(x).all(dim=1)]
    z = torch.zeros(x.shape[1], dtype=x.dtype)
    for _ in range(iterations):
        beta = 1.0 / torch.linalg.vector_norm(x - z, dim=1).clamp(min=nu)
        z = (beta @ x) / beta.sum()
    return z


def centered_clipping(
    x: torch.Tensor, center: torch.Tensor, tau: float, iterations: int = 1
) -> torch.Tensor:
    """Karimireddy et al. (2021): repeat v ← v + (1/n) Σ_i (x_i − v)·min(1, τ/‖x_i − v‖)."""
    v = center
    for _ in range(iterations):
        diff = x - v
        scale = (tau / torch.linalg.vector_norm(diff, dim=1)).clamp(max=1.0)
        v = v + (diff * scale[:, None]).mean(dim=0)
    return v


def minimum_diameter_average(x: torch.Tensor, f: int, max_subsets: int = 200_000) -> torch.Tensor:
    """MDA: the mean of the (n − f)-subset with the smallest diameter max_{i,j∈S} ‖x_i − x_j‖.

    Exhaustive over C(n, f) subsets (ties: the first in lexicographic order, like ByzFL)."""
    n = len(x)
    _check_f(n, f, "mda")
    k = n - f
    if math.comb(n, k) > max_subsets:
        raise ValueError(
            f"mda enumerates C(n, f) = {math.comb(n, k)} subsets (n={n}, f={f}); "
            f"at most {max_subsets} are allowed"
        )
    dist = _distances(x)
    subsets = torch.tensor(list(itertools.combinations(range(n), k)))
    diameters = torch.cat(
        [
            dist[s[:, :, None], s[:, None, :]].amax(dim=(1, 2))
            for s in subsets.split(max(1, 2**22 // (k * k)))
        ]
    )
    return x[subsets[diameters.argmin()]].mean(dim=0)


def nearest_neighbour_average(x: torch.Tensor, pivot: torch.Tensor, f: int) -> torch.Tensor:
    """Mean of the n − f messages closest (L2) to ``pivot`` — MoNNA's averaging step."""
    _check_f(len(x), f, "monna")
    dist = torch.linalg.vector_norm(x - pivot, dim=1)
    return x[dist.topk(len(x) - f, largest=False).indices].mean(dim=0)


def nearest_neighbour_mixing(x: torch.Tensor, f: int) -> torch.Tensor:
    """NNM (Allouah et al. 2023): replace each x_i by the mean of its n − f nearest neighbours
    (itself included)."""
    n = len(x)
    if not 0 <= f < n:
        raise ValueError(f"nnm needs f < n messages; got f={f}, n={n}")
    idx = _distances(x).topk(n - f, dim=1, largest=False).indices
    return x[idx].mean(dim=1)


def bucketing(
    x: torch.Tensor, w: torch.Tensor, s: int, keys: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shuffle (order of ``keys``), then average consecutive buckets of s messages (the last one
    may be smaller); a bucket's weight is the sum of its members' weights."""
    perm = keys.argsort()
    x, w = x[perm], w[perm]
    starts = range(0, len(x), s)
    return (
        torch.stack([x[i : i + s].mean(dim=0) for i in starts]),
        torch.stack([w[i : i + s].sum() for i in starts]),
    )


class EwmaState(NamedTuple):
    """EDiT's ``OnlineDynamicEWMA`` of update norms: mean, M2, count, recent z-scores."""

    mean: torch.Tensor
    m2: torch.Tensor
    count: torch.Tensor
    window: torch.Tensor


def ewma_init() -> EwmaState:
    z = torch.zeros((), dtype=torch.float64)
    return EwmaState(z, z, torch.zeros((), dtype=torch.int64), torch.zeros(0, dtype=torch.float64))


def ewma_z(state: EwmaState, value: torch.Tensor, warmup: int) -> torch.Tensor:
    """z = (value − mean)/√M2; 0 during warm-up or while the spread is 0 (or count < 2)."""
    std = state.m2.sqrt() if state.count >= 2 else torch.zeros((), dtype=torch.float64)
    if std == 0 or state.count < warmup:
        return torch.zeros((), dtype=torch.float64)
    return (value - state.mean) / std


def ewma_is_outlier(state: EwmaState, value: torch.Tensor, warmup: int, threshold: float) -> bool:
    """After warm-up: z > threshold · max(1, std of the recent z-scores)."""
    if state.count < warmup:
        return False
    spread = state.window.std() if len(state.window) >= 2 else torch.ones(())
    return bool(ewma_z(state, value, warmup) > threshold * max(1.0, float(spread)))


def ewma_update(state: EwmaState, value: torch.Tensor, alpha: float, warmup: int) -> EwmaState:
    """mean ← mean + α δ; M2 ← (1 − α)(M2 + α δ δ') with δ, δ' the deviations before/after."""
    delta = value - state.mean
    mean_ = state.mean + alpha * delta
    m2 = (1 - alpha) * (state.m2 + alpha * delta * (value - mean_))
    new = EwmaState(mean_, m2, state.count + 1, state.window)
    window = torch.cat([state.window, ewma_z(new, value, warmup).reshape(1)])[-warmup:]
    return new._replace(window=window)


def pseudo_gradient_penalty(
    x: torch.Tensor,
    state: EwmaState,
    *,
    alpha: float,
    warmup: int,
    threshold: float,
    temperature: float,
    clip: float | None,
) -> tuple[torch.Tensor, EwmaState, int]:
    """EDiT's pseudo-gradient penalty (Cheng et al., ICLR 2025), applied to n client updates.

    1. Anomaly elimination: with n_i = ‖x_i‖, updates whose norm is an EWMA outlier (see
       :func:`ewma_is_outlier`) are zeroed and their norm raised by 10⁶; the others update the
       EWMA (in ascending norm order, so the result does not depend on the cohort's order).
    2. Weighted averaging: Δ = Σ_i softmax(−n/T)_i x_i, which favours small updates.
    3. Clipping: Δ ← Δ · min(1, φ/(‖Δ‖ + 10⁻⁶)) (as ``torch.nn.utils.clip_grad_norm_``).

    This follows the authors' released implementation (atorch ``local_sgd``: the reducer gets
    ``weight = −‖Δ_i‖`` and normalizes with a softmax of temperature 1 by default). There each
    worker keeps its own detector; clients here join only some rounds, so the server keeps one
    detector over all clients' norms. Returns (aggregate, new state, number of outliers)."""
    norms = torch.linalg.vector_norm(x.to(torch.float64), dim=1)
    outlier = torch.tensor([ewma_is_outlier(state, v, warmup, threshold) for v in norms])
    for v in norms[~outlier].sort().values:
        state = ewma_update(state, v, alpha, warmup)
    x = torch.where(outlier[:, None], torch.zeros_like(x), x)
    p = torch.softmax(-(norms + 1e6 * outlier) / temperature, dim=0)
    agg = p.to(x.dtype) @ x
    if clip is not None:
        agg = agg * (clip / (torch.linalg.vector_norm(agg) + 1e-6)).clamp(max=1.0)
    return agg, state, int(outlier.sum())


# ---------------------------------------------------------------------------------------------
# Pre-aggregations (n messages → n' messages)

PreAggregation = Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]


class StatefulPre(NamedTuple):
    """A pre-aggregation with state: ``init(d)``, and ``apply(x, w, state, round)`` returning
    ``(x', w', new state, metrics)``."""

    init: Callable[[int], AggState]
    apply: Callable[
        [torch.Tensor, torch.Tensor, AggState, int],
        tuple[torch.Tensor, torch.Tensor, AggState, dict[str, float]],
    ]


#: The server's trusted updates of a round, ``round -> [m, d]`` (``channel/trusted.py``).
TrustedUpdates = Callable[[int], torch.Tensor]


class NnmConfig(BaseModel):
    """Nearest-neighbour mixing: each message becomes the mean of its n − f nearest."""

    model_config = ConfigDict(extra="forbid")
    name: Literal["nnm"] = "nnm"
    f: int = Field(1, ge=0, description="declared Byzantine messages f (mixes n − f neighbours)")

    def build(self, seed: int) -> PreAggregation:
        return lambda x, w, round_: (nearest_neighbour_mixing(x, self.f), w)


class BucketingConfig(BaseModel):
    """Bucketing: shuffle the messages (seeded per round), average buckets of s."""

    model_config = ConfigDict(extra="forbid")
    name: Literal["bucketing"] = "bucketing"
    s: int = Field(2, ge=1, description="bucket size s")

    def build(self, seed: int) -> PreAggregation:
        stream = Stream(seed).child("bucketing")
        return lambda x, w, round_: bucketing(
            x, w, self.s, stream.keys(round_, torch.arange(len(x)))
        )


register_preaggregator(NnmConfig)
register_preaggregator(BucketingConfig)
#: A pre-aggregation's config: any registered one (``fedkin.register_preaggregator``).
PreAggregatorConfig = PREAGGREGATOR_REGISTRY.field
#: name → config class of every registered pre-aggregation.
PREAGGREGATORS = PREAGGREGATOR_REGISTRY


# ---------------------------------------------------------------------------------------------
# Configs (registered by name)

Rule = Callable[
    [torch.Tensor, torch.Tensor, AggState, int], tuple[torch.Tensor, AggState, dict[str, float]]
]


class _AggregatorBase(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pre: list[PreAggregatorConfig] = Field(
        default_factory=list,
        description="pre-aggregations applied in order before the rule, e.g. "
        "[{name: nnm, f: 1}] or [{name: bucketing, s: 2}]",
    )

    @model_validator(mode="after")
    def _check_pre(self) -> _AggregatorBase:
        for i, p in enumerate(self.pre):
            problem = p.problem(f"channel.aggregator.pre.{i}") if hasattr(p, "problem") else None
            if problem:
                raise ValueError(problem)
        return self

    def _init(self, d: int) -> AggState:
        return {}

    @abstractmethod
    def _rule(self, x: torch.Tensor, w: torch.Tensor, state: AggState, round_: int):
        """(aggregate ``[d]``, new state, metrics) of messages ``x`` ``[n, d]``, weights ``w``."""

    def build(self, seed: int = 0, trusted_updates: TrustedUpdates | None = None) -> Aggregator:
        """The rule after its pre-aggregations; ``trusted_updates`` feeds a trusted-direction
        step whose source is the server's trusted data."""
        pres = [
            p.build(seed, trusted_updates)
            if getattr(p, "reads_trusted_updates", False)
            else p.build(seed)
            for p in self.pre
        ]

        def init(d: int) -> AggState:
            state = self._init(d)
            for i, pre in enumerate(pres):
                if isinstance(pre, StatefulPre):
                    state.update({f"pre{i}/{k}": v for k, v in pre.init(d).items()})
            return state

        def apply(x: torch.Tensor, w: torch.Tensor, state: AggState, round_: int):
            keep = w > 0
            if not keep.any():
                return torch.zeros(x.shape[1], dtype=x.dtype), state, {}
            x, w = x[keep], w[keep]
            rule_state = {k: v for k, v in state.items() if "/" not in k}
            pre_state, metrics = {}, {}
            for i, pre in enumerate(pres):
                if isinstance(pre, StatefulPre):
                    prefix = f"pre{i}/"
                    own = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
                    x, w, own, m = pre.apply(x, w, own, round_)
                    pre_state.update({prefix + k: v for k, v in own.items()})
                    metrics.update(m)
                else:
                    x, w = pre(x, w, round_)
            agg, rule_state, m = self._rule(x, w, rule_state, round_)
            return agg, {**rule_state, **pre_state}, {**metrics, **m}

        return Aggregator(init, apply)


class _StatelessRule(_AggregatorBase):
    """A rule without state across rounds: the aggregate is a function of (x, w) alone."""

    @abstractmethod
    def _stateless(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """The aggregate ``[d]`` of messages ``x`` ``[n, d]`` with weights ``w`` ``[n]``."""

    def _rule(self, x: torch.Tensor, w: torch.Tensor, state: AggState, round_: int):
        return self._stateless(x, w), state, {}


class MeanConfig(_StatelessRule):
    """Plain mean (1/n) Σ x_i: every accepted message counts once."""

    name: Literal["mean"] = "mean"

    def _stateless(self, x, w):
        return mean(x)


class WeightedMeanConfig(_StatelessRule):
    """Weighted mean Σ p_i x_i with p ∝ the clients' weights (FedAvg's rule)."""

    name: Literal["weighted_mean"] = "weighted_mean"

    def _stateless(self, x, w):
        return weighted_mean(x, w)


class MedianConfig(_StatelessRule):
    """Coordinate-wise median."""

    name: Literal["median"] = "median"

    def _stateless(self, x, w):
        return coordinate_median(x)


class _WithF(_StatelessRule):
    f: int = Field(1, ge=0, description="declared Byzantine messages per round f (needs 2f < n)")


class TrimmedMeanConfig(_WithF):
    """Coordinate-wise trimmed mean: drop the f largest and f smallest, average the rest."""

    name: Literal["trimmed_mean"] = "trimmed_mean"

    def _stateless(self, x, w):
        return trimmed_mean(x, self.f)


class KrumConfig(_WithF):
    """Krum: the message closest (mean squared distance) to its n − f − 1 nearest others."""

    name: Literal["krum"] = "krum"

    def _stateless(self, x, w):
        return krum(x, self.f)


class MultiKrumConfig(_WithF):
    """Multi-Krum: mean of the m messages with the lowest Krum scores."""

    name: Literal["multi_krum"] = "multi_krum"
    m: int | None = Field(None, ge=1, description="messages averaged m (None: n − f)")

    def _stateless(self, x, w):
        return multi_krum(x, self.f, self.m)


class GeometricMedianConfig(_StatelessRule):
    """Geometric median by smoothed Weiszfeld iterations from 0 (RFA, Pillutla et al.)."""

    name: Literal["geometric_median"] = "geometric_median"
    nu: float = Field(0.1, gt=0, description="smoothing ν: distances below ν count as ν")
    iterations: int = Field(3, ge=1, description="Weiszfeld iterations T")

    def _stateless(self, x, w):
        return geometric_median(x, self.nu, self.iterations)


class CenteredClippingConfig(_AggregatorBase):
    """Centered clipping around the previous aggregate (state), L iterations of radius τ."""

    name: Literal["centered_clipping"] = "centered_clipping"
    tau: float = Field(1.0, gt=0, description="clipping radius τ around the centre")
    iterations: int = Field(1, ge=1, description="clipping iterations L")

    def _init(self, d):
        return {"center": torch.zeros(d)}

    def _rule(self, x, w, state, round_):
        v = centered_clipping(x, state["center"].to(x.dtype), self.tau, self.iterations)
        return v, {"center": v}, {}


class MdaConfig(_WithF):
    """Minimum-diameter averaging: mean of the (n − f)-subset of smallest diameter."""

    name: Literal["mda"] = "mda"

    def _stateless(self, x, w):
        return minimum_diameter_average(x, self.f)


class MonnaConfig(_WithF):
    """MoNNA's nearest-neighbour averaging: mean of the n − f messages closest to a pivot.

    In MoNNA (Farhadkhani et al. 2023) each node's pivot is its own model; a server has none,
    so the pivot is the coordinate-wise median. The client half of MoNNA is the clients' Polyak
    momentum across rounds (``channel.momentum``, :mod:`fedkin.channel.momentum`), which this
    rule implies (β = 0.9 unless set; ``channel.momentum.beta=0`` is the averaging alone)."""

    name: Literal["monna"] = "monna"

    def _stateless(self, x, w):
        return nearest_neighbour_average(x, coordinate_median(x), self.f)


class EditConfig(_AggregatorBase):
    """EDiT's pseudo-gradient penalty: EWMA anomaly elimination on update norms, softmax(−norm)
    weighting, clipping of the averaged update."""

    name: Literal["edit"] = "edit"
    alpha: float = Field(0.02, gt=0, lt=1, description="EWMA rate α of the norm statistics")
    warmup: int = Field(100, ge=1, description="norms seen before outliers are detected")
    threshold: float = Field(3.0, gt=0, description="z-score threshold (× recent z-score std)")
    temperature: float = Field(1.0, gt=0, description="softmax temperature T of the −norm weights")
    clip: float | None = Field(None, gt=0, description="clip norm φ of the averaged update")

    def _init(self, d):
        return ewma_init()._asdict()

    def _rule(self, x, w, state, round_):
        agg, new, outliers = pseudo_gradient_penalty(
            x,
            EwmaState(**state),
            alpha=self.alpha,
            warmup=self.warmup,
            threshold=self.threshold,
            temperature=self.temperature,
            clip=self.clip,
        )
        return agg, new._asdict(), {"edit_outliers": float(outliers)}


for _cls in (
    MeanConfig,
    WeightedMeanConfig,
    MedianConfig,
    TrimmedMeanConfig,
    KrumConfig,
    MultiKrumConfig,
    GeometricMedianConfig,
    CenteredClippingConfig,
    MdaConfig,
    MonnaConfig,
    EditConfig,
):
    register_aggregator(_cls)
#: An aggregation rule's config: any registered one (``fedkin.register_aggregator``).
AggregatorConfig = AGGREGATOR_REGISTRY.field
#: name → config class of every registered aggregation rule.
AGGREGATORS = AGGREGATOR_REGISTRY
