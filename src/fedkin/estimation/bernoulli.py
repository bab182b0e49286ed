"""Bernoulli personalized estimation (0/1 data, e.g. per-client success rates): Beta–Binomial.

Model, per coordinate (each 0/1 column gets its own prior)::

    θ_i ~ Beta(α, β),   x_ij | θ_i ~ Bernoulli(θ_i),   k_i = Σ_j x_ij,   p̂_i = k_i / n_i.

With ``κ = α + β`` and prior mean ``p = α/κ``, the posterior is ``Beta(α + k_i, β + n_i − k_i)``
with mean ``θ̂_i = (α + k_i)/(κ + n_i) = p + b_i (p̂_i − p)``, ``b_i = n_i/(κ + n_i)``, and
variance ``θ̂_i(1 − θ̂_i)/(κ + n_i + 1)``. Its Bayes risk is ``αβ/(κ(κ + 1)(κ + n))``.

Empirical Bayes by the method of moments. The prior variance is ``V = p(1 − p)/(κ + 1)`` and
``Var p̂_i = V(1 − 1/n_i) + p(1 − p)/n_i``, so with ``S`` the spread of the ``p̂_i`` and
``h̄ = mean 1/n_i`` (:mod:`fedkin.estimation.moments`)::

    p̂ = mean p̂_i,   V̂ = (S − p̂(1 − p̂) h̄) / (1 − h̄),   κ̂ = p̂(1 − p̂)/V̂ − 1.

Fallbacks for degenerate moments (stated in the notes): ``V̂ ≤ 0`` (less spread than binomial
noise alone, or all rates 0 or all 1) gives ``κ̂ = ∞``: every client gets ``p̂``;
``V̂ ≥ p̂(1 − p̂)`` (more spread than any Beta allows) gives ``κ̂ = 0``: the local rates. When
every client has a single sample (``h̄ = 1``) heterogeneity is not identifiable and empirical
Bayes refuses. Under privacy noise ``V̂`` is raised by ``2·sd(V̂)`` plus the noise variance of
``p̂`` — as in the Gaussian case, this moves clients toward their own rates.

``local`` returns ``p̂_i`` with the binomial standard error ``√(p̂_i(1 − p̂_i)/n_i)``;
``global`` returns ``p̂``; ``james-stein`` applies the Gaussian James–Stein rule to the rates
with ``s_i² = p̂(1 − p̂)/n_i`` (:func:`fedkin.estimation.gaussian.fit_gaussian`).
"""

from __future__ import annotations

import dataclasses

import torch

from fedkin.core.errors import DataError
from fedkin.estimation.data import ClientData
from fedkin.estimation.gaussian import NOISE_CONFIDENCE, fit_gaussian
from fedkin.estimation.moments import Moments
from fedkin.estimation.result import Fit


def fit_bernoulli(data: ClientData, mom: Moments, method: str) -> Fit:
    """Estimates for every client by ``method`` (see module docstring)."""
    p_hat, n = data.means, data.counts[:, None]
    p = mom.mean.clamp(0.0, 1.0)
    c = p * (1 - p)
    if method == "local":
        return Fit(p_hat.clone(), torch.sqrt(p_hat * (1 - p_hat) / n), "std_error")
    if method == "global":
        return Fit(p.expand_as(p_hat).clone(), hyper={"p": p.tolist()})
    if method == "james-stein":
        binomial = dataclasses.replace(mom, mean=p, sigma2=c)
        return fit_gaussian(data, binomial, "james-stein", pooled=False)
    if method != "empirical-bayes":
        raise ValueError(f"unknown method {method!r}")

    one_minus_h = 1.0 - mom.inv_n
    if mom.inv_n_noise_sd == 0 and one_minus_h <= 0:
        raise DataError(
            "every client has a single 0/1 sample, so between-client variation cannot be told "
            "apart from sampling noise; use --method global or local"
        )
    notes = []
    if one_minus_h <= 0:  # only reachable through privacy noise in h̄
        v_raw = torch.full_like(p, float("inf"))
        noise_sd = torch.zeros_like(p)
    else:
        v_raw = (mom.spread - c * mom.inv_n) / one_minus_h
        noise_sd = torch.sqrt(
            (mom.spread_noise_sd / one_minus_h) ** 2
            + ((1 - 2 * p) * mom.inv_n / one_minus_h) ** 2 * mom.mean_noise_var
            + ((mom.spread - c) / one_minus_h**2 * mom.inv_n_noise_sd) ** 2
        )
    v = v_raw.clamp(min=0.0)
    prior_var = v + NOISE_CONFIDENCE * noise_sd + mom.mean_noise_var
    kappa = torch.where(
        prior_var > 0, (c / prior_var - 1).clamp(min=0.0), torch.full_like(c, float("inf"))
    )
    if bool((prior_var <= 0).any()):
        notes.append(
            "no between-client variation detected (V̂ ≤ 0): κ = ∞, every client gets the pooled rate"
        )
    if bool((c > 0).all()) and bool((prior_var >= c).any()):
        notes.append(
            "spread exceeds any Beta prior (V̂ ≥ p̂(1 − p̂)): κ = 0, local rates"
            if bool((v >= c).any())
            else "privacy noise dominates the population statistics: κ = 0, local rates"
        )
    b = torch.where(torch.isinf(kappa), torch.zeros_like(p_hat), n / (kappa + n))
    est = p + b * (p_hat - p)
    post_var = torch.where(
        torch.isinf(kappa), torch.zeros_like(est), est * (1 - est) / (kappa + n + 1)
    )
    v_p = (v * one_minus_h + c * mom.inv_n) / mom.m if one_minus_h > 0 else c / mom.m
    sd = torch.sqrt(post_var + (1 - b) ** 2 * v_p)
    hyper = {"p": p.tolist(), "prior_var": prior_var.tolist(), "kappa": kappa.tolist()}
    return Fit(est, sd, "posterior_sd", hyper, tuple(notes))
