"""Gaussian personalized estimation: local, global, James–Stein and empirical Bayes.

Model (per coordinate; ``pooled=True`` shares ``τ²`` and ``σ²`` across the ``d`` coordinates,
i.e. ``θ_i ~ N(μ, τ² I_d)``, ``x_ij ~ N(θ_i, σ² I_d)``; ``pooled=False`` fits each coordinate
separately)::

    θ_i ~ N(μ, τ²),   x_ij | θ_i ~ N(θ_i, σ²),   j = 1..n_i,   x̄_i | θ_i ~ N(θ_i, s_i²),
    s_i² = σ²/n_i.

The Bayes posterior of ``θ_i`` given ``x̄_i`` is ``N(μ + a_i (x̄_i − μ), a_i s_i²)`` with
shrinkage ``a_i = τ²/(τ² + s_i²)``; its mean has the smallest MSE, ``τ² s²/(τ² + s²)``
(= 0.2857 for σ² = 4, τ² = 1, n = 10, against ``s² = 0.4`` for the local mean).

Empirical Bayes plugs in estimates from all clients (:mod:`fedkin.estimation.moments`):

* ``μ̂ = (1/m) Σ x̄_i``;
* ``σ̂²`` pooled within-client variance (or the known ``σ²``);
* ``τ̂² = max(0, S − σ̂² h̄)`` — method of moments from ``E S = τ² + σ² h̄`` (which holds for
  unequal ``n_i``; ``h̄ = mean 1/n_i``), positive part so the variance is never negative.
  ``τ̂² = 0`` means "no heterogeneity detected": every client gets ``μ̂``; when ``τ²`` is large,
  ``a_i → 1`` and the estimate is the client's own mean.

With privacy noise in the moments, the prior variance used for shrinkage is raised to
``T = τ̂² + 2·sd(τ̂²) + Var(μ̂ noise)`` (an upper confidence bound plus the noise in the
shrinkage target), so noisy statistics push every client toward its own mean; see
:mod:`fedkin.estimation.private` for why this never does worse than local. Exact moments have
zero noise and ``T = τ̂²``.

Reported posterior sd: ``√(a_i s_i² + (1 − a_i)² v_μ)`` with ``v_μ = (τ̂² + σ̂² h̄)/m`` the
sampling variance of ``μ̂`` (the plug-in posterior plus the first-order uncertainty of μ̂);
under privacy noise ``σ̂²`` there is raised to its upper bound ``σ̂² + 2·sd(σ̂²)``.

James–Stein (positive part, toward the grand mean): with ``m`` clients, ``d`` coordinates and
``SS = Σ_i ‖x̄_i − μ̂‖²``, ``θ̂_i = μ̂ + (1 − B_i)₊ (x̄_i − μ̂)``, ``B_i = (q − 2) s_i²/SS``, where
``q = (m − 1)·d`` is the dimension left after estimating the d-vector ``μ̂`` (so for equal
``n_i``, ``SS/s² ~ χ²_q(λ)``, ``λ = Σ_i ‖θ_i − θ̄‖²/s²``); ``pooled=False`` shrinks each coordinate
on its own (``d = 1``: ``q − 2 = m − 3``). For equal ``n_i`` the estimator without the positive
part has total risk ``s² [m d − (q − 2)² E 1/χ²_q(λ)]`` (Stein's identity), below the local
means' ``m d s²`` for every θ (Efron–Morris); for unequal ``n_i`` this is the natural extension.
It needs ``q > 2``; otherwise the local means are returned (stated in the notes).
"""

from __future__ import annotations

import torch

from fedkin.core.errors import DataError
from fedkin.estimation.data import ClientData
from fedkin.estimation.moments import Moments
from fedkin.estimation.result import Fit

#: one-sided z-score of the upper confidence bound on τ² under privacy noise (≈ 97.7 %).
NOISE_CONFIDENCE = 2.0

SIGMA2_UNKNOWN = (
    "every client has a single sample, so the within-client variance σ² cannot be estimated; "
    "pass the known noise variance (--sigma2 / sigma2=) or use --method local or global"
)


def _pool(x: torch.Tensor, pooled: bool) -> torch.Tensor:
    return x.mean().expand_as(x).clone() if pooled else x


def _pool_sd(sd: torch.Tensor, pooled: bool) -> torch.Tensor:
    """sd of the coordinate mean of independent noises, broadcast back to ``[d]``."""
    if not pooled:
        return sd
    return (torch.sqrt((sd**2).sum()) / sd.numel()).expand_as(sd).clone()


def fit_gaussian(data: ClientData, mom: Moments, method: str, pooled: bool = True) -> Fit:
    """Estimates for every client by ``method`` (see module docstring)."""
    x, n = data.means, data.counts[:, None]
    sigma2 = None if mom.sigma2 is None else _pool(mom.sigma2, pooled)
    if method == "local":
        if sigma2 is None:
            sd = torch.full_like(x, float("nan"))
            return Fit(x.clone(), sd, "std_error", notes=("σ² unknown: no standard errors",))
        return Fit(
            x.clone(),
            torch.sqrt(sigma2 / n).expand_as(x),
            "std_error",
            hyper={"sigma2": sigma2.tolist()},
        )
    if method == "global":
        return Fit(mom.mean.expand_as(x).clone(), hyper={"mu": mom.mean.tolist()})
    if sigma2 is None:
        raise DataError(SIGMA2_UNKNOWN)
    s2 = sigma2 / n
    if method == "james-stein":
        return _james_stein(x, mom, s2, pooled)
    if method != "empirical-bayes":
        raise ValueError(f"unknown method {method!r}")

    raw = _pool(mom.spread - sigma2 * mom.inv_n, pooled)
    tau2 = torch.clamp(raw, min=0.0)
    # sd of the privacy noise in τ̂² (delta method): spread and σ̂² noises are independent per
    # coordinate; the noise in h̄ is shared by all coordinates.
    per_coordinate = torch.sqrt(
        mom.spread_noise_sd**2 + (mom.inv_n * _noise(mom.sigma2_noise_sd, sigma2)) ** 2
    )
    noise_sd = torch.sqrt(
        _pool_sd(per_coordinate, pooled) ** 2 + (sigma2 * mom.inv_n_noise_sd) ** 2
    )
    prior_var = tau2 + NOISE_CONFIDENCE * noise_sd + mom.mean_noise_var
    a = torch.where(prior_var + s2 > 0, prior_var / (prior_var + s2), torch.ones_like(s2))
    est = mom.mean + a * (x - mom.mean)
    # The reported sd takes σ² at its upper confidence bound, so a noisy σ̂² near 0 cannot
    # produce a falsely certain estimate (exact moments: the bound is σ̂² itself).
    s2_hi = (sigma2 + NOISE_CONFIDENCE * _pool_sd(_noise(mom.sigma2_noise_sd, sigma2), pooled)) / n
    a_hi = torch.where(prior_var + s2_hi > 0, prior_var / (prior_var + s2_hi), torch.ones_like(s2))
    v_mu = (tau2 + sigma2 * mom.inv_n) / mom.m
    sd = torch.sqrt(a_hi * s2_hi + (1 - a_hi) ** 2 * v_mu)
    notes = []
    if bool((raw <= 0).any()):
        notes.append(
            "τ̂² ≤ 0 set to 0 (positive part): no heterogeneity detected, so estimates "
            "shrink fully to the population mean"
        )
    hyper = {"mu": mom.mean.tolist(), "tau2": tau2.tolist(), "sigma2": sigma2.tolist()}
    if bool((prior_var > tau2).any()):
        hyper["prior_var"] = prior_var.tolist()
        notes.append(
            "privacy noise raises the prior variance from τ̂² to prior_var (an upper bound), "
            "moving estimates toward each client's own mean"
        )
    return Fit(est, sd, "posterior_sd", hyper, tuple(notes))


def _noise(sd: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if sd is None else sd


def _james_stein(x: torch.Tensor, mom: Moments, s2: torch.Tensor, pooled: bool) -> Fit:
    ss = (mom.m - 1) * mom.spread
    q = (mom.m - 1) * (x.shape[1] if pooled else 1)
    if pooled:
        ss = ss.sum().expand_as(ss)
    hyper = {"mu": mom.mean.tolist()}
    if q <= 2:
        note = (
            f"James–Stein needs (m − 1)·d > 2 deviations from the grand mean (got {q}): "
            "returning the local means"
        )
        return Fit(x.clone(), hyper=hyper, notes=(note,))
    b = torch.where(ss > 0, (q - 2) * s2 / ss, torch.ones_like(s2)).clamp(max=1.0)
    return Fit(mom.mean + (1 - b) * (x - mom.mean), hyper=hyper)
