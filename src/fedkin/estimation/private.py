"""User-level differentially private population moments for personalized estimation.

Threat model and guarantee. ``m`` clients (the number is public) each hold a dataset ``D_i``.
Neighbouring inputs differ in **one client's entire dataset** (replace-one, user level). The
server sees only the Gaussian-noised sums below, which are (ε, δ)-DP; each client then combines
that release with its *own* data on its own side. So the population statistics are DP, and
each client's output is DP with respect to every *other* client (it is a post-processing of
the release and of data the client already holds).

Clipping. Each coordinate ``k`` has a public range ``[lo_k, hi_k]`` with centre ``c_k`` and
half-width ``h_k``. Client ``i`` clamps its mean into the range and centres it,
``a_i = clamp(x̄_i, lo, hi) − c``, so ``|a_ik| ≤ h_k``. The range must not be read from the
data: ``clip_range="data"`` does so for convenience, is flagged in the report, and voids the
guarantee. Defaults: ``[0, 1]`` for Bernoulli data (exact), ``[−10, 10]`` for Gaussian data
(sensible for roughly standardized values; say so when it is not).

Releases (Gaussian mechanism; replace-one L2 sensitivities ``Δ``)::

    S1 = Σ_i a_i          + N(0, ς1² I_d)   Δ1 = 2‖h‖₂        (for μ)
    S2 = Σ_i a_i²         + N(0, ς2² I_d)   Δ2 = ‖h²‖₂        (second moment, for τ²)
    S3 = Σ_i 1/n_i        + N(0, ς3²)       Δ3 = 1            (h̄; n_i is private too)
    S4 = Σ_i e_i v_i      + N(0, ς4² I_d)   Δ4 = ‖h²‖₂        (only if σ² is unknown)
    S5 = Σ_i e_i          + N(0, ς5²)       Δ5 = 1            (only if σ² is unknown)

with ``e_i = 1[n_i ≥ 2]`` and ``v_i = clamp(W_i/(n_i − 1), 0, h²)`` the client's within
variance. ``global`` needs only S1. Release ``j`` uses ``ς_j = Δ_j z/√w_j`` with budget
shares ``w_j`` summing to 1, so the releases compose *exactly* to one Gaussian mechanism with
noise multiplier ``z`` (Gaussian composition adds ``1/z_j²``); ``z`` is calibrated to the target
(ε, δ) and every release is recorded in a :class:`~fedkin.privacy.accountant.PrivacyAccountant`,
whose ε (PLD by default) is what is reported, never above the target.

Post-processing (unbiased for the clipped statistics)::

    μ̂ = c + S1/m,                                  Var(noise) = ς1²/m²
    S = (S2 − (S1² − ς1²)/m) / (m − 1)              (E S1² = (Σa)² + ς1²)
    sd(S) ≈ √(ς2² + (4 S1² ς1² + 2 ς1⁴)/m²) / (m − 1)
    h̄ = clamp(S3/m, 0, 1),  σ̂² = clamp(S4 / max(S5, 1), 0, h²).

Graceful degradation. The families shrink with prior variance ``T = τ̂² + 2 sd(τ̂²) + ς1²/m²``
instead of ``τ̂²``. For a client with ``s² = σ²/n`` and shrinkage ``a = T/(T + s²)`` toward
``μ̂`` whose error ``θ − μ̂`` has variance ``V`` (``τ²`` + noise + sampling), the MSE is
``a² s² + (1 − a)² V``, which is ``≤ s²`` (the local MSE) exactly when ``V ≤ 2T + s²``. The
upper confidence bound and the added noise variance keep ``T ≥ V/2`` with high probability, so
the private estimate is never worse than the local one by more than sampling error: at small ε
the noise terms dominate ``T``, ``a → 1`` and the estimate becomes the local mean; as ε grows
the noise terms vanish and the estimator becomes the non-private one.

Randomness comes from the passed generator. For a real release its seed must be secret
(anyone who knows it can subtract the noise), and floating-point Gaussian sampling is not
hardened against the attacks on least-significant bits; this module simulates the protocol.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal

import torch

from fedkin.core.errors import ConfigError
from fedkin.estimation.data import ClientData
from fedkin.estimation.moments import Moments
from fedkin.privacy.accountant import (
    AccountantKind,
    PrivacyAccountant,
    PrivacyBudget,
    PrivacyEvent,
    calibrate_noise_multiplier,
)
from fedkin.privacy.mechanisms import clip_box, gaussian_noise, gaussian_sigma

DEFAULT_CLIP_RANGE = {"gaussian": (-10.0, 10.0), "bernoulli": (0.0, 1.0)}

# Budget shares w_j of the releases (see module docstring).
SHARES_MEAN = (("mean", 1.0),)
SHARES_KNOWN_SIGMA = (("mean", 0.5), ("second moment", 0.4), ("inverse counts", 0.1))
SHARES_UNKNOWN_SIGMA = (
    ("mean", 0.4),
    ("second moment", 0.3),
    ("inverse counts", 0.1),
    ("within variance", 0.15),
    ("multi-sample count", 0.05),
)
Shares = tuple[tuple[str, float], ...]


@dataclass(frozen=True)
class PrivacyConfig:
    """Target (ε, δ), clipping range (``None``: the family default; ``"data"``: read from the
    data, which leaks) and accountant backend."""

    epsilon: float
    delta: float
    clip_range: tuple[float, float] | Literal["data"] | None = None
    accountant: AccountantKind = "pld"

    def __post_init__(self) -> None:
        PrivacyBudget(self.epsilon, self.delta)
        if isinstance(self.clip_range, tuple):
            lo, hi = self.clip_range
            if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
                raise ConfigError(f"clip range needs finite LO < HI, got [{lo}, {hi}]")
        elif self.clip_range not in (None, "data"):
            raise ConfigError(
                f"clip_range must be (lo, hi), 'data' or None, got {self.clip_range!r}"
            )


@dataclass(frozen=True)
class PrivacyReport:
    """What was spent: ε at δ by the accountant (whose ledger lists every release), the noise
    multiplier of the equivalent single Gaussian release, and the clipping range."""

    epsilon: float
    delta: float
    epsilon_spent: float
    noise_multiplier: float
    accountant: PrivacyAccountant
    clip_low: list[float]
    clip_high: list[float]
    clip_from_data: bool


def pld_discretization(epsilon: float) -> float:
    """PLD loss-grid step ``1e-4 · max(1, ε)``: the cost of PLD grows with ε/step, while a
    coarser grid stays a valid upper bound that moves ε by ~1e-6 relative."""
    return 1e-4 * max(1.0, epsilon)


@functools.lru_cache(maxsize=64)
def noise_plan(
    epsilon: float, delta: float, shares: Shares, kind: AccountantKind
) -> tuple[float, tuple[PrivacyEvent, ...], float]:
    """``(z, events, ε spent)`` for releases with budget ``shares`` at target (ε, δ).

    ``z`` starts from the single-Gaussian calibration and is raised until the accountant's ε
    for the recorded releases is within the target (PLD discretization can add a hair).
    """
    disc = pld_discretization(epsilon)
    z = calibrate_noise_multiplier(epsilon, delta, accountant=kind, pld_discretization=disc)
    while True:
        events = tuple(
            PrivacyEvent.gaussian(z / math.sqrt(w), label=f"estimation: {name}")
            for name, w in shares
        )
        acc = PrivacyAccountant(kind, pld_discretization=disc)
        for e in events:
            acc.record(e)
        spent = acc.epsilon(delta)
        if spent <= epsilon:
            return z, events, spent
        z *= 1 + 1e-4


def _clip_bounds(
    data: ClientData, config: PrivacyConfig, family: str
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    d = data.d
    if config.clip_range == "data":
        lo, hi = data.means.min(dim=0).values, data.means.max(dim=0).values
        pad = torch.where(hi > lo, torch.zeros_like(lo), torch.full_like(lo, 0.5))
        lo, hi = lo - pad, hi + pad
        note = (
            "warning: the clip range was read from the data "
            f"({_fmt_range(lo, hi)}); this leaks information about the clients and voids the "
            "(ε, δ) guarantee: pass a public range instead"
        )
        return lo, hi, [note]
    lo_hi = config.clip_range or DEFAULT_CLIP_RANGE[family]
    lo = torch.full((d,), float(lo_hi[0]), dtype=torch.float64)
    hi = torch.full((d,), float(lo_hi[1]), dtype=torch.float64)
    notes = []
    if config.clip_range is None and family == "gaussian":
        notes.append(
            f"clip range [{lo_hi[0]:g}, {lo_hi[1]:g}] is the default for Gaussian data; client "
            "means outside it are clamped (set a public bound on your values with --clip-range)"
        )
    return lo, hi, notes


def _fmt_range(lo: torch.Tensor, hi: torch.Tensor) -> str:
    return ", ".join(f"[{a:.4g}, {b:.4g}]" for a, b in zip(lo.tolist(), hi.tolist(), strict=True))


def private_moments(
    data: ClientData,
    config: PrivacyConfig,
    *,
    family: str,
    need: Literal["mean", "full"],
    sigma2: float | None,
    generator: torch.Generator,
) -> tuple[Moments, PrivacyReport, list[str]]:
    """Noisy :class:`Moments` from the releases in the module docstring, the privacy report,
    and notes (clip range used, fallbacks). ``sigma2`` is a known within-client variance (then
    S4, S5 are not released); Bernoulli data never need σ²."""
    m, d = data.m, data.d
    lo, hi, notes = _clip_bounds(data, config, family)
    center, half = (lo + hi) / 2, (hi - lo) / 2
    need_sigma = need == "full" and family == "gaussian" and sigma2 is None
    shares = (
        SHARES_MEAN
        if need == "mean"
        else (SHARES_UNKNOWN_SIGMA if need_sigma else SHARES_KNOWN_SIGMA)
    )
    z, events, spent = noise_plan(config.epsilon, config.delta, shares, config.accountant)
    accountant = PrivacyAccountant(
        config.accountant, pld_discretization=pld_discretization(config.epsilon)
    )
    for e in events:
        accountant.record(e)
    multipliers = [e.noise_multiplier for e in events]
    h_norm = float(torch.linalg.vector_norm(half))
    h2_norm = float(torch.linalg.vector_norm(half**2))

    a = clip_box(data.means, lo, hi) - center
    sd1 = gaussian_sigma(2 * h_norm, multipliers[0])
    s1 = a.sum(dim=0) + gaussian_noise((d,), sd1, generator)
    mean = center + s1 / m
    nan = torch.full((d,), float("nan"), dtype=torch.float64)
    mom = Moments(
        m=m,
        mean=mean,
        spread=nan,
        inv_n=float("nan"),
        sigma2=None,
        mean_noise_var=torch.full((d,), (sd1 / m) ** 2, dtype=torch.float64),
        spread_noise_sd=nan,
    )
    if need == "full":
        sd2 = gaussian_sigma(h2_norm, multipliers[1])
        sd3 = gaussian_sigma(1.0, multipliers[2])
        s2 = (a**2).sum(dim=0) + gaussian_noise((d,), sd2, generator)
        s3 = float((1.0 / data.counts).sum() + gaussian_noise((1,), sd3, generator))
        dof = max(m - 1, 1)
        spread = (s2 - (s1**2 - sd1**2) / m) / dof
        spread_sd = torch.sqrt(sd2**2 + (4 * s1**2 * sd1**2 + 2 * sd1**4) / m**2) / dof
        sig2: torch.Tensor | None = None
        sig2_sd: torch.Tensor | None = None
        if sigma2 is not None:
            sig2 = torch.full((d,), float(sigma2), dtype=torch.float64)
            sig2_sd = torch.zeros(d, dtype=torch.float64)
        elif need_sigma:
            sig2, sig2_sd, note = _private_sigma2(data, half, h2_norm, multipliers[3:], generator)
            notes.extend(note)
        mom = Moments(
            m=m,
            mean=mean,
            spread=spread,
            inv_n=min(max(s3 / m, 0.0), 1.0),
            sigma2=sig2,
            mean_noise_var=mom.mean_noise_var,
            spread_noise_sd=spread_sd,
            inv_n_noise_sd=sd3 / m,
            sigma2_noise_sd=sig2_sd,
        )
    report = PrivacyReport(
        epsilon=config.epsilon,
        delta=config.delta,
        epsilon_spent=spent,
        noise_multiplier=z,
        accountant=accountant,
        clip_low=lo.tolist(),
        clip_high=hi.tolist(),
        clip_from_data=config.clip_range == "data",
    )
    return mom, report, notes


def _private_sigma2(
    data: ClientData,
    half: torch.Tensor,
    h2_norm: float,
    multipliers: list[float],
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """σ̂² from S4, S5 and the sd of its noise; fully uncertain (sd = h²) if S5 < 1."""
    multi = data.counts >= 2
    v = data.within_ss / torch.clamp(data.counts - 1, min=1)[:, None]
    v = torch.minimum(v, half**2) * multi[:, None]
    sd4 = gaussian_sigma(h2_norm, multipliers[0])
    sd5 = gaussian_sigma(1.0, multipliers[1])
    s4 = v.sum(dim=0) + gaussian_noise((data.d,), sd4, generator)
    s5 = float(multi.sum() + gaussian_noise((1,), sd5, generator))
    denom = max(s5, 1.0)
    sig2 = torch.minimum(torch.clamp(s4 / denom, min=0.0), half**2)
    if s5 < 1:
        note = (
            "the noisy count of clients with ≥ 2 samples is below 1, so σ̂² is a guess "
            "inside the clip range; estimates fall back toward the local means"
        )
        return sig2, half**2, [note]
    return sig2, torch.sqrt(sd4**2 + (sig2 * sd5) ** 2) / denom, []
