"""Hierarchical data generators and the closed-form errors to compare estimators against.

Gaussian: ``θ_i ~ N(μ, τ² I_d)``, ``x_ij ~ N(θ_i, σ² I_d)``, ``n`` samples per client;
write ``s² = σ²/n``. Per coordinate, with ``m`` clients:

* local mean: ``E(x̄_i − θ_i)² = s²``;
* global mean ``μ̂ = (1/m) Σ x̄_j``: ``θ_i − μ̂ = (1 − 1/m)(θ_i − μ) − (1/m) Σ_{j≠i}(θ_j − μ) −
  (1/m) Σ_j ε̄_j``, so ``E(μ̂ − θ_i)² = τ²(1 − 1/m) + s²/m``;
* Bayes oracle (``μ, τ²`` known): the posterior variance ``τ² s²/(τ² + s²)``;
* Bayes shrinkage with ``τ²`` known but ``μ`` estimated by ``μ̂`` (an "EB" idealization):
  ``s² (τ² + s²/m)/(τ² + s²)`` — empirical Bayes approaches it, and the oracle, as ``m`` grows.

Beta–Bernoulli: ``θ_i ~ Beta(α, β)``, ``k_i ~ Binomial(n, θ_i)``; the Bayes risk of the
posterior mean is ``αβ/(κ(κ + 1)(κ + n))`` with ``κ = α + β``.
"""

from __future__ import annotations

import numpy as np
import torch

from fedkin.estimation.data import ClientData


def simulate_gaussian(
    m: int,
    n: int | torch.Tensor,
    *,
    tau2: float,
    sigma2: float,
    mu: float = 0.0,
    d: int = 1,
    generator: torch.Generator,
) -> tuple[ClientData, torch.Tensor]:
    """``(data, θ)`` for ``m`` clients; ``n`` is a count for all or a ``[m]`` tensor of counts."""
    counts = torch.as_tensor(n, dtype=torch.int64).expand(m)
    theta = mu + tau2**0.5 * torch.randn(m, d, generator=generator, dtype=torch.float64)
    index = torch.repeat_interleave(torch.arange(m), counts)
    noise = torch.randn(len(index), d, generator=generator, dtype=torch.float64)
    values = theta[index] + sigma2**0.5 * noise
    columns = ("value",) if d == 1 else tuple(f"value_{k}" for k in range(d))
    clients = tuple(f"c{i}" for i in range(m))
    return ClientData.from_samples(index, values, clients, columns), theta


def simulate_bernoulli(
    m: int, n: int, *, alpha: float, beta: float, rng: np.random.Generator
) -> tuple[ClientData, torch.Tensor]:
    """``(data, θ)`` for ``m`` clients with ``n`` 0/1 samples each, ``θ_i ~ Beta(α, β)``."""
    theta = rng.beta(alpha, beta, size=m)
    values = (rng.random((m, n)) < theta[:, None]).astype(np.float64)
    index = torch.arange(m).repeat_interleave(n)
    clients = tuple(f"c{i}" for i in range(m))
    data = ClientData.from_samples(index, torch.from_numpy(values.reshape(-1, 1)), clients)
    return data, torch.from_numpy(theta)[:, None]


def local_mse(sigma2: float, n: float) -> float:
    """``s² = σ²/n``."""
    return sigma2 / n


def global_mse(tau2: float, sigma2: float, n: float, m: int) -> float:
    """``τ²(1 − 1/m) + s²/m``."""
    return tau2 * (1 - 1 / m) + sigma2 / n / m


def oracle_mse(tau2: float, sigma2: float, n: float) -> float:
    """Bayes-optimal ``τ² s²/(τ² + s²)``."""
    s2 = sigma2 / n
    return tau2 * s2 / (tau2 + s2)


def plugin_mean_mse(tau2: float, sigma2: float, n: float, m: int) -> float:
    """Bayes shrinkage toward the estimated mean: ``s²(τ² + s²/m)/(τ² + s²)``."""
    s2 = sigma2 / n
    return s2 * (tau2 + s2 / m) / (tau2 + s2)


def beta_bernoulli_oracle_mse(alpha: float, beta: float, n: float) -> float:
    """Bayes risk ``αβ/(κ(κ + 1)(κ + n))`` of the Beta–Binomial posterior mean."""
    kappa = alpha + beta
    return alpha * beta / (kappa * (kappa + 1) * (kappa + n))
