"""Population moments of the client means: what the server learns about the population.

Per coordinate ``k`` (``[d]`` tensors):

* ``mean``   ``μ̂ = (1/m) Σ_i x̄_i`` — every client counts once, whatever its ``n_i``;
* ``spread`` ``S = Σ_i (x̄_i − μ̂)² / (m − 1)``. For independent clients
  ``E Σ_i (x̄_i − μ̂)² = (1 − 1/m) Σ_i Var x̄_i``, so ``E S = (1/m) Σ_i Var x̄_i``: under the
  Gaussian model ``τ² + σ² h̄`` and under the Beta–Bernoulli model ``V(1 − h̄) + p(1 − p) h̄``;
* ``inv_n``  ``h̄ = (1/m) Σ_i 1/n_i`` (a scalar);
* ``sigma2`` the pooled within-client variance ``σ̂² = Σ_i W_i / Σ_i (n_i − 1)``, or the
  known ``σ²`` if given, or ``None`` when every client has a single sample.

The private release (:mod:`fedkin.estimation.private`) produces the same fields with Gaussian
noise added and records the noise levels here, so the families can fall back gracefully; for
exact moments the noise fields are zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedkin.estimation.data import ClientData


@dataclass(frozen=True)
class Moments:
    """Population summaries (see module docstring) and the privacy noise in each of them.

    ``mean_noise_var`` is the variance of the noise in ``mean``; ``spread_noise_sd``,
    ``inv_n_noise_sd`` and ``sigma2_noise_sd`` are standard deviations. All zero when exact.
    """

    m: int
    mean: torch.Tensor
    spread: torch.Tensor
    inv_n: float
    sigma2: torch.Tensor | None
    mean_noise_var: torch.Tensor
    spread_noise_sd: torch.Tensor
    inv_n_noise_sd: float = 0.0
    sigma2_noise_sd: torch.Tensor | None = None


def pooled_within_variance(data: ClientData) -> torch.Tensor | None:
    """``σ̂²_k = Σ_i W_ik / Σ_i (n_i − 1)``; ``None`` if every client has one sample."""
    dof = float((data.counts - 1).sum())
    if dof <= 0:
        return None
    return data.within_ss.sum(dim=0) / dof


def exact_moments(data: ClientData, sigma2: float | None = None) -> Moments:
    """Moments computed from every client's exact statistics (no privacy).

    ``sigma2`` is a known within-client variance; otherwise it is pooled from the data.
    """
    m, d = data.m, data.d
    mean = data.means.mean(dim=0)
    spread = ((data.means - mean) ** 2).sum(dim=0) / max(m - 1, 1)
    s2 = (
        torch.full((d,), float(sigma2), dtype=torch.float64)
        if sigma2 is not None
        else pooled_within_variance(data)
    )
    zeros = torch.zeros(d, dtype=torch.float64)
    return Moments(
        m=m,
        mean=mean,
        spread=spread,
        inv_n=float((1.0 / data.counts).mean()),
        sigma2=s2,
        mean_noise_var=zeros,
        spread_noise_sd=zeros,
        sigma2_noise_sd=None if s2 is None else zeros,
    )
