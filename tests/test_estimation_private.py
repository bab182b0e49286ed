"""User-level DP estimation: budget, sensitivity, noise scale and graceful degradation.

Monte-Carlo comparisons use paired per-repetition differences against the non-private
estimators on the same data, with K standard errors of tolerance.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from fedkin.core.errors import ConfigError
from fedkin.core.rng import Stream
from fedkin.estimation import ClientData, PrivacyConfig, estimate
from fedkin.estimation.private import SHARES_UNKNOWN_SIGMA, private_moments
from fedkin.estimation.simulate import simulate_bernoulli, simulate_gaussian
from fedkin.privacy.accountant import PrivacyAccountant, calibrate_noise_multiplier

K = 4.0
SIGMA2, TAU2, N, M = 4.0, 1.0, 10, 1000


def mean_se(values: list[float]) -> tuple[float, float]:
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), float(t.std() / math.sqrt(len(values)))


def mse(est: torch.Tensor, theta: torch.Tensor) -> float:
    return float(((est - theta) ** 2).mean())


def paired(epsilons: list[float], reps: int = 20, seed: int = 0) -> dict[str, list[float]]:
    """Per-repetition MSE of local, EB and private EB at each ε on the same populations."""
    out: dict[str, list[float]] = {}
    for r in range(reps):
        data, theta = simulate_gaussian(
            M, N, tau2=TAU2, sigma2=SIGMA2, generator=Stream(seed).child("d").generator(r)
        )
        out.setdefault("local", []).append(mse(data.means, theta))
        out.setdefault("eb", []).append(mse(estimate(data).estimates, theta))
        for k, eps in enumerate(epsilons):
            result = estimate(
                data,
                privacy=PrivacyConfig(eps, 1e-6),
                generator=Stream(seed).child("noise").generator(r, k),
            )
            out.setdefault(eps, []).append(mse(result.estimates, theta))
    return out


def test_spent_epsilon_is_within_budget_and_ledger_is_complete() -> None:
    data, _ = simulate_gaussian(200, 5, tau2=1, sigma2=1, generator=Stream(0).generator())
    result = estimate(data, privacy=PrivacyConfig(0.7, 1e-6), generator=Stream(1).generator())
    report = result.privacy
    assert report is not None
    assert 0.7 - 1e-3 < report.epsilon_spent <= 0.7
    ledger = report.accountant.ledger
    assert [e.label for e in ledger] == [f"estimation: {n}" for n, _ in SHARES_UNKNOWN_SIGMA]
    # The releases compose to one Gaussian with z: Σ 1/z_j² = 1/z².
    inv = sum(1 / e.noise_multiplier**2 for e in ledger)
    assert inv == pytest.approx(1 / report.noise_multiplier**2, rel=1e-9)
    assert report.noise_multiplier >= calibrate_noise_multiplier(0.7, 1e-6)
    # The accountant re-composes its JSON ledger to the same ε.
    restored = PrivacyAccountant()
    restored.load_state_dict(json.loads(json.dumps(report.accountant.state_dict())))
    assert restored.epsilon(1e-6) == pytest.approx(report.epsilon_spent, abs=1e-9)
    assert report.accountant.epsilon(1e-6, accountant="rdp") >= report.epsilon_spent
    assert not report.clip_from_data
    assert any("default for Gaussian data" in n for n in result.notes)


def test_known_sigma2_and_global_release_fewer_statistics() -> None:
    data, _ = simulate_gaussian(100, 5, tau2=1, sigma2=1, generator=Stream(0).generator())
    known = estimate(data, sigma2=1.0, privacy=PrivacyConfig(1.0, 1e-6))
    assert len(known.privacy.accountant.ledger) == 3 and known.hyper["sigma2"] == [1.0]
    glob = estimate(data, method="global", privacy=PrivacyConfig(1.0, 1e-6))
    assert len(glob.privacy.accountant.ledger) == 1
    assert glob.privacy.accountant.ledger[0].noise_multiplier == glob.privacy.noise_multiplier


def test_replacing_one_client_moves_the_release_by_at_most_the_sensitivity() -> None:
    """With identical noise draws, the released sums differ only by the clipped contributions:
    m·|Δμ̂| ≤ 2h (replace-one sensitivity of the clipped sum) and m·|Δh̄| ≤ 1."""
    data, _ = simulate_gaussian(50, 4, tau2=1, sigma2=1, generator=Stream(0).generator())
    extreme = ClientData(
        data.clients,
        data.columns,
        data.counts.clone().index_fill_(0, torch.tensor([0]), 1.0),
        data.means.clone().index_fill_(0, torch.tensor([0]), 1e9),
        data.within_ss.clone().index_fill_(0, torch.tensor([0]), 0.0),
        False,
    )
    config = PrivacyConfig(1.0, 1e-6, clip_range=(-3.0, 5.0))
    mom_a, _, _ = private_moments(
        data, config, family="gaussian", need="full", sigma2=None, generator=Stream(9).generator()
    )
    mom_b, _, _ = private_moments(
        extreme,
        config,
        family="gaussian",
        need="full",
        sigma2=None,
        generator=Stream(9).generator(),
    )
    h = 4.0
    assert 0 < 50 * abs(float(mom_a.mean - mom_b.mean)) <= 2 * h + 1e-9
    assert abs(50 * (mom_a.inv_n - mom_b.inv_n)) <= 1 + 1e-9


def test_noise_scale_of_the_mean_release() -> None:
    data, _ = simulate_gaussian(100, 5, tau2=1, sigma2=1, generator=Stream(0).generator())
    config = PrivacyConfig(1.0, 1e-6, clip_range=(-2.0, 2.0))
    draws = []
    for r in range(2000):
        mom, report, _ = private_moments(
            data,
            config,
            family="gaussian",
            need="mean",
            sigma2=None,
            generator=Stream(1).generator(r),
        )
        draws.append(float(mom.mean))
    # Gaussian mechanism on the sum: sd = 2h·z with h = 2 (replace-one), divided by m.
    expected = 2 * 2.0 * report.noise_multiplier / 100
    sd = float(np.std(draws, ddof=1))
    assert abs(sd - expected) <= K * expected / math.sqrt(2 * len(draws))
    assert float(mom.mean_noise_var[0]) == pytest.approx(expected**2)


def test_graceful_degradation_and_convergence_to_non_private() -> None:
    eps_small, eps_mid, eps_large = 0.03, 1.0, 30.0
    runs = paired([eps_small, eps_mid, eps_large])
    local, eb = runs["local"], runs["eb"]

    def diff(a: list[float], b: list[float]) -> tuple[float, float]:
        return mean_se([x - y for x, y in zip(a, b, strict=True)])

    # Small ε: never worse than local beyond Monte-Carlo error.
    d, se = diff(runs[eps_small], local)
    assert d <= K * se
    # More budget, less error: strictly ordered beyond the paired standard errors.
    for lo, hi in ((eps_small, eps_mid), (eps_mid, eps_large)):
        d, se = diff(runs[lo], runs[hi])
        assert d > K * se, (lo, hi, d, se)
    # Large ε: within 1 % (plus MC error) of non-private empirical Bayes.
    d, se = diff(runs[eps_large], eb)
    assert abs(d) <= 0.01 * mean_se(eb)[0] + K * se


def test_small_epsilon_estimates_are_almost_local() -> None:
    data, _ = simulate_gaussian(M, N, tau2=TAU2, sigma2=SIGMA2, generator=Stream(3).generator())
    result = estimate(data, privacy=PrivacyConfig(0.01, 1e-6), generator=Stream(4).generator())
    mu = result.hyper["mu"][0]
    a = (result.estimates - mu) / (data.means - mu)  # weight on the client's own mean
    assert float(a.min()) > 0.95


def test_bernoulli_private_degrades_gracefully() -> None:
    reps, excess = 20, []
    for r in range(reps):
        data, theta = simulate_bernoulli(M, N, alpha=2, beta=5, rng=np.random.default_rng(r))
        result = estimate(data, privacy=PrivacyConfig(0.05, 1e-6), generator=Stream(5).generator(r))
        assert result.privacy.clip_low == [0.0] and result.privacy.clip_high == [1.0]
        assert torch.all((result.estimates >= 0) & (result.estimates <= 1))
        excess.append(mse(result.estimates, theta) - mse(data.means, theta))
    d, se = mean_se(excess)
    assert d <= K * se


def test_clip_range_from_data_is_flagged() -> None:
    data, _ = simulate_gaussian(30, 3, tau2=1, sigma2=1, generator=Stream(0).generator())
    result = estimate(data, privacy=PrivacyConfig(1.0, 1e-6, clip_range="data"))
    assert result.privacy.clip_from_data
    assert result.privacy.clip_low[0] == pytest.approx(float(data.means.min()))
    assert any(n.startswith("warning:") and "voids" in n for n in result.notes)


def test_tiny_populations_and_single_samples_do_not_break() -> None:
    data = ClientData.from_samples(torch.arange(2), torch.tensor([1.0, 3.0]), ["a", "b"])
    result = estimate(data, privacy=PrivacyConfig(0.5, 1e-3), generator=Stream(0).generator())
    assert torch.isfinite(result.estimates).all() and torch.isfinite(result.sd).all()
    assert result.privacy.epsilon_spent <= 0.5


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "local"}, "shares nothing"),
        ({"method": "james-stein"}, "no private variant"),
    ],
)
def test_unsupported_private_methods(kwargs: dict, match: str) -> None:
    data, _ = simulate_gaussian(10, 3, tau2=1, sigma2=1, generator=Stream(0).generator())
    with pytest.raises(ConfigError, match=match):
        estimate(data, privacy=PrivacyConfig(1.0, 1e-6), **kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"epsilon": 0.0, "delta": 1e-6},
        {"epsilon": -1.0, "delta": 1e-6},
        {"epsilon": float("inf"), "delta": 1e-6},
        {"epsilon": 1.0, "delta": 0.0},
        {"epsilon": 1.0, "delta": 1.0},
        {"epsilon": 1.0, "delta": 1e-6, "clip_range": (1.0, 1.0)},
        {"epsilon": 1.0, "delta": 1e-6, "clip_range": "everything"},
    ],
)
def test_invalid_privacy_config(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        PrivacyConfig(**kwargs)
