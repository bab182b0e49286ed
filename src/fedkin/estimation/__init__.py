"""Personalized estimation: each client estimates its own quantity, borrowing from the rest.

Model: ``θ_i ~ N(μ, τ²)``, ``x_ij ~ N(θ_i, σ²)``; the empirical-Bayes estimate is the posterior
mean with ``μ, τ²`` (and ``σ²`` when unknown) estimated from all clients. 0/1 data use a
Beta–Bernoulli model. :func:`estimate` is the entry point; :class:`PrivacyConfig` makes the
population statistics user-level differentially private.
"""

from fedkin.estimation.api import EstimationResult, estimate
from fedkin.estimation.data import ClientData
from fedkin.estimation.io import read_samples_csv, write_estimates_csv
from fedkin.estimation.private import PrivacyConfig, PrivacyReport

__all__ = [
    "ClientData",
    "EstimationResult",
    "PrivacyConfig",
    "PrivacyReport",
    "estimate",
    "read_samples_csv",
    "write_estimates_csv",
]
