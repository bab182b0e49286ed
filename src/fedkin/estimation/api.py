"""`estimate`: personalized estimates for every client, optionally with user-level DP.

The model (Gaussian family): ``θ_i ~ N(μ, τ²)``, ``x_ij ~ N(θ_i, σ²)``. Each client wants
``θ_i``. ``local`` uses only its own mean, ``global`` only the population mean, and
``empirical-bayes`` (default) the posterior mean ``μ̂ + τ̂²/(τ̂² + σ̂²/n_i) (x̄_i − μ̂)`` with
``μ, τ²`` (and ``σ²`` when unknown) estimated from all clients; ``james-stein`` is the
positive-part James–Stein estimator toward the grand mean. For 0/1 data the Bernoulli family
uses a Beta prior instead (:mod:`fedkin.estimation.bernoulli`); the family is detected
automatically when every value is 0 or 1. With ``privacy``, only noisy population statistics
are released (:mod:`fedkin.estimation.private`) and the ε actually spent is reported.

Example::

    data = ClientData.from_samples(client_index, values, clients)
    result = estimate(data, privacy=PrivacyConfig(epsilon=1.0, delta=1e-6))
    result.estimates, result.sd, result.privacy.epsilon_spent
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from typing import Literal

import torch

from fedkin.core.errors import ConfigError, DataError
from fedkin.estimation.bernoulli import fit_bernoulli
from fedkin.estimation.data import ClientData
from fedkin.estimation.gaussian import fit_gaussian
from fedkin.estimation.moments import exact_moments
from fedkin.estimation.private import PrivacyConfig, PrivacyReport, private_moments

Method = Literal["local", "global", "empirical-bayes", "james-stein"]
Family = Literal["auto", "gaussian", "bernoulli"]
METHODS: tuple[str, ...] = ("local", "global", "empirical-bayes", "james-stein")
FAMILIES: tuple[str, ...] = ("auto", "gaussian", "bernoulli")


@dataclass(frozen=True)
class EstimationResult:
    """Per-client estimates (``[m, d]``), their sd (``posterior_sd`` or ``std_error``, NaN where
    undefined, ``None`` for methods without one), the fitted population parameters, the notes
    stating every fallback taken, and the privacy report when private."""

    clients: tuple[str, ...]
    columns: tuple[str, ...]
    counts: torch.Tensor
    method: str
    family: str
    family_detected: bool
    estimates: torch.Tensor
    sd: torch.Tensor | None
    sd_name: str
    hyper: dict[str, list[float]]
    notes: tuple[str, ...]
    privacy: PrivacyReport | None


def resolve_family(data: ClientData, family: Family) -> tuple[str, bool]:
    """``(family, detected)``: ``auto`` means Bernoulli iff every value is 0 or 1."""
    if family not in FAMILIES:
        raise ConfigError(f"family must be one of {', '.join(FAMILIES)}; got {family!r}")
    if family == "auto":
        return ("bernoulli" if data.binary else "gaussian"), True
    if family == "bernoulli" and not data.binary:
        raise DataError("--family bernoulli needs every value to be 0 or 1")
    return family, False


def estimate(
    data: ClientData,
    *,
    method: Method = "empirical-bayes",
    family: Family = "auto",
    sigma2: float | None = None,
    pooled: bool = True,
    privacy: PrivacyConfig | None = None,
    generator: torch.Generator | None = None,
) -> EstimationResult:
    """Personalized estimates for every client of ``data``.

    ``sigma2`` is a known within-client variance (Gaussian family; pooled from the data when
    ``None``). ``pooled`` shares ``τ²`` and ``σ²`` across coordinates of vector data (isotropic
    model); ``False`` fits each coordinate separately (Bernoulli always does). ``privacy``
    releases the population statistics with user-level (ε, δ)-DP; its noise comes from
    ``generator`` (default: a secret random seed).
    """
    if method not in METHODS:
        raise ConfigError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    fam, detected = resolve_family(data, family)
    if sigma2 is not None and not (math.isfinite(sigma2) and sigma2 > 0):
        raise ConfigError(f"sigma2 must be a finite number > 0, got {sigma2}")
    notes: list[str] = []
    report = None
    if privacy is None:
        mom = exact_moments(data, sigma2)
    else:
        if method in ("local", "james-stein"):
            raise ConfigError(
                "local estimation shares nothing, so it needs no privacy budget"
                if method == "local"
                else "james-stein has no private variant; use --method empirical-bayes"
            )
        if generator is None:  # a secret 63-bit seed: the noise must not be reproducible
            generator = torch.Generator().manual_seed(secrets.randbits(63))
        mom, report, notes = private_moments(
            data,
            privacy,
            family=fam,
            need="mean" if method == "global" else "full",
            sigma2=sigma2 if fam == "gaussian" else None,
            generator=generator,
        )
    fit = (
        fit_gaussian(data, mom, method, pooled)
        if fam == "gaussian"
        else fit_bernoulli(data, mom, method)
    )
    singles = int((data.counts == 1).sum())
    if 0 < singles < data.m and fam == "gaussian" and sigma2 is None and method != "global":
        notes.append(
            f"{singles} client(s) have a single sample: they still get an estimate, using the "
            "within-client variance σ̂² pooled from the clients with ≥ 2 samples"
        )
    if data.m == 1 and method != "local":
        notes.append("only one client: there is no population to borrow from")
    return EstimationResult(
        clients=data.clients,
        columns=data.columns,
        counts=data.counts,
        method=method,
        family=fam,
        family_detected=detected,
        estimates=fit.estimates,
        sd=fit.sd,
        sd_name=fit.sd_name,
        hyper=fit.hyper,
        notes=tuple(notes) + fit.notes,
        privacy=report,
    )
