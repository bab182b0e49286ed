"""The privacy accountant against dp-accounting's own numbers, plus the noise mechanisms."""

from __future__ import annotations

import json
import math

import dp_accounting as dpa
import pytest
import torch
from dp_accounting import pld, rdp

from fedkin.core.errors import ConfigError
from fedkin.core.rng import Stream
from fedkin.privacy.accountant import (
    BudgetExceededError,
    PrivacyAccountant,
    PrivacyBudget,
    PrivacyEvent,
    UnsupportedAccountingError,
    calibrate_noise_multiplier,
)
from fedkin.privacy.mechanisms import (
    add_gaussian_noise,
    clip_box,
    clip_l2,
    gaussian_noise,
    gaussian_sigma,
)

Q, Z, T, DELTA = 0.01, 1.0, 1000, 1e-5


def reference_epsilon(kind: str, event: dpa.DpEvent, count: int, delta: float) -> float:
    """ε straight from dp-accounting, built without fedkin's code."""
    acc = pld.PLDAccountant() if kind == "pld" else rdp.RdpAccountant()
    acc.compose(event, count)
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("kind", ["pld", "rdp"])
def test_poisson_gaussian_matches_dp_accounting(kind: str) -> None:
    ref = reference_epsilon(kind, dpa.PoissonSampledDpEvent(Q, dpa.GaussianDpEvent(Z)), T, DELTA)
    acc = PrivacyAccountant(kind)
    acc.record(PrivacyEvent.gaussian(Z, sampling_prob=Q, count=T))
    assert acc.epsilon(DELTA) == pytest.approx(ref, rel=1e-3)
    # The published dp-accounting values for this setting (research notes, run with 0.6.0).
    assert acc.epsilon(DELTA) == pytest.approx({"pld": 1.8282, "rdp": 2.1014}[kind], abs=1e-3)


def test_rdp_cross_check_is_an_upper_bound_of_pld() -> None:
    acc = PrivacyAccountant()
    acc.record(PrivacyEvent.gaussian(Z, sampling_prob=Q, count=T))
    assert acc.epsilon(DELTA) < acc.epsilon(DELTA, accountant="rdp")


def test_one_event_per_round_equals_one_batched_event() -> None:
    per_round = PrivacyAccountant()
    for _ in range(T):
        per_round.record(PrivacyEvent.gaussian(Z, sampling_prob=Q, label="round"))
    assert len(per_round.ledger) == 1 and per_round.ledger[0].count == T
    batched = PrivacyAccountant()
    batched.record(PrivacyEvent.gaussian(Z, sampling_prob=Q, count=T))
    assert per_round.epsilon(DELTA) == pytest.approx(batched.epsilon(DELTA), rel=1e-9)


def test_heterogeneous_ledger_matches_composed_reference() -> None:
    acc = PrivacyAccountant()
    acc.record(PrivacyEvent.gaussian(1.0, sampling_prob=0.01, count=300))
    acc.record(PrivacyEvent.gaussian(2.0))
    acc.record(PrivacyEvent.gaussian(1.0, sampling_prob=0.01, count=200))
    ref_acc = pld.PLDAccountant()
    ref_acc.compose(dpa.PoissonSampledDpEvent(0.01, dpa.GaussianDpEvent(1.0)), 500)
    ref_acc.compose(dpa.GaussianDpEvent(2.0))
    assert acc.epsilon(DELTA) == pytest.approx(ref_acc.get_epsilon(DELTA), rel=1e-3)
    assert acc.delta(1.0) == pytest.approx(ref_acc.get_delta(1.0), rel=1e-3)


def test_laplace_event_matches_dp_accounting() -> None:
    acc = PrivacyAccountant()
    acc.record(PrivacyEvent(2.0, mechanism="laplace", count=3))
    ref = reference_epsilon("pld", dpa.LaplaceDpEvent(2.0), 3, DELTA)
    assert acc.epsilon(DELTA) == pytest.approx(ref, rel=1e-3)


def test_fixed_size_cohorts_use_rdp_replace_one() -> None:
    acc = PrivacyAccountant("rdp")
    acc.record(PrivacyEvent.fixed_cohort_gaussian(1.5, population=1000, cohort_size=50, count=100))
    ref = rdp.RdpAccountant(neighboring_relation=dpa.NeighboringRelation.REPLACE_ONE)
    ref.compose(dpa.SampledWithoutReplacementDpEvent(1000, 50, dpa.GaussianDpEvent(1.5)), 100)
    assert acc.epsilon(DELTA) == pytest.approx(ref.get_epsilon(DELTA), rel=1e-3)
    with pytest.raises(UnsupportedAccountingError, match="PLD"):
        acc.epsilon(DELTA, accountant="pld")
    acc.record(PrivacyEvent.gaussian(1.0, sampling_prob=0.1))
    with pytest.raises(UnsupportedAccountingError, match="neighbouring relations"):
        acc.epsilon(DELTA)


def test_state_dict_round_trips_through_json() -> None:
    acc = PrivacyAccountant(budget=PrivacyBudget(5.0, DELTA))
    acc.record(PrivacyEvent.gaussian(Z, sampling_prob=Q, count=400, label="round"))
    acc.record(PrivacyEvent.gaussian(3.0, label="final release"))
    state = json.loads(json.dumps(acc.state_dict()))
    restored = PrivacyAccountant("rdp")
    restored.load_state_dict(state)
    assert restored.kind == "pld"
    assert restored.ledger == acc.ledger
    assert restored.budget == acc.budget
    assert restored.epsilon(DELTA) == acc.epsilon(DELTA)
    with pytest.raises(ConfigError, match="version"):
        restored.load_state_dict({**state, "version": 99})


def test_budget_refuses_and_leaves_ledger_intact() -> None:
    acc = PrivacyAccountant(budget=PrivacyBudget(1.0, DELTA))
    event = PrivacyEvent.gaussian(Z, sampling_prob=Q, count=100)
    assert acc.epsilon(DELTA) == 0.0
    assert not acc.would_exceed(event)
    acc.record(event)
    spent = acc.epsilon(DELTA)
    assert 0 < spent <= 1.0
    big = PrivacyEvent.gaussian(Z, sampling_prob=Q, count=5000)
    assert acc.would_exceed(big)
    with pytest.raises(BudgetExceededError, match="budget"):
        acc.record(big)
    assert acc.ledger == (event,) and acc.epsilon(DELTA) == spent
    assert not PrivacyAccountant().would_exceed(big)  # no budget, nothing to exceed
    assert acc.would_exceed(event, PrivacyBudget(spent, DELTA))


@pytest.mark.parametrize(("kind", "expected"), [("pld", 2.2477), ("rdp", 2.4224)])
def test_calibration_matches_dp_accounting(kind: str, expected: float) -> None:
    z = calibrate_noise_multiplier(2.0, 1e-5, sampling_prob=0.1, steps=100, accountant=kind)
    assert z == pytest.approx(expected, abs=1e-4)  # dp-accounting's calibration (research notes)

    def reference(noise: float) -> float:
        event = dpa.PoissonSampledDpEvent(0.1, dpa.GaussianDpEvent(noise))
        return reference_epsilon(kind, event, 100, 1e-5)

    # Tight: within the budget at z, over it 1e-3 below z.
    assert reference(z) <= 2.0 < reference(z - 1e-3)


@pytest.mark.parametrize("kind", ["pld", "rdp"])
def test_unsampled_calibration_is_tight(kind: str) -> None:
    z = calibrate_noise_multiplier(1.0, 1e-6, steps=4, accountant=kind)
    acc = PrivacyAccountant(kind)
    acc.record(PrivacyEvent.gaussian(z, count=4))
    assert acc.epsilon(1e-6) <= 1.0
    tighter = PrivacyAccountant(kind)
    tighter.record(PrivacyEvent.gaussian(z * 0.999, count=4))
    assert tighter.epsilon(1e-6) > 1.0
    # Analytic Gaussian mechanism (Balle & Wang 2018): 4 steps of z = one step of z/2.
    assert z / 2 == pytest.approx(
        dpa.get_sigma_gaussian(1.0, 1e-6), rel=1e-3 if kind == "pld" else 0.2
    )


def test_calibration_for_fixed_size_cohorts() -> None:
    z = calibrate_noise_multiplier(
        2.0, 1e-5, steps=50, accountant="rdp", population=500, cohort_size=50
    )
    acc = PrivacyAccountant("rdp")
    acc.record(PrivacyEvent.fixed_cohort_gaussian(z, 500, 50, count=50))
    assert 1.99 < acc.epsilon(1e-5) <= 2.0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"noise_multiplier": 0.0},
        {"noise_multiplier": 1.0, "count": 0},
        {"noise_multiplier": 1.0, "sampling": "poisson", "sampling_prob": 0.0},
        {"noise_multiplier": 1.0, "sampling": "fixed_size", "population": 5, "cohort_size": 6},
        {"noise_multiplier": 1.0, "sampling": "sometimes"},
        {"noise_multiplier": 1.0, "mechanism": "exponential"},
        {"noise_multiplier": 1.0, "sampling_prob": 0.5},
    ],
)
def test_invalid_events_are_config_errors(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        PrivacyEvent(**kwargs)


@pytest.mark.parametrize(("eps", "delta"), [(0.0, 1e-5), (-1.0, 1e-5), (1.0, 0.0), (1.0, 1.0)])
def test_invalid_budgets(eps: float, delta: float) -> None:
    with pytest.raises(ConfigError):
        PrivacyBudget(eps, delta)
    with pytest.raises(ConfigError):
        calibrate_noise_multiplier(eps, delta)


def test_gaussian_mechanism_noise_scale_and_reproducibility() -> None:
    assert gaussian_sigma(2.0, 1.5) == 3.0
    with pytest.raises(ValueError):
        gaussian_sigma(-1.0, 1.0)
    n = 200_000
    x = add_gaussian_noise(torch.zeros(n, dtype=torch.float64), 2.0, 1.5, Stream(3).generator())
    # The sample std of n normals has standard error ≈ σ/√(2n); allow 5 standard errors.
    assert abs(float(x.std()) - 3.0) < 5 * 3.0 / math.sqrt(2 * n)
    assert abs(float(x.mean())) < 5 * 3.0 / math.sqrt(n)
    again = add_gaussian_noise(torch.zeros(n, dtype=torch.float64), 2.0, 1.5, Stream(3).generator())
    assert torch.equal(x, again)
    per_coord = gaussian_noise((n, 2), torch.tensor([1.0, 4.0]), Stream(4).generator())
    assert torch.allclose(
        per_coord.std(dim=0), torch.tensor([1.0, 4.0], dtype=torch.float64), rtol=0.02
    )


def test_clipping() -> None:
    x = torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]], dtype=torch.float64)
    clipped = clip_l2(x, 1.0)
    assert torch.allclose(clipped[0], torch.tensor([0.6, 0.8], dtype=torch.float64))
    assert torch.equal(clipped[1:], x[1:])
    centered = clip_l2(x, 1.0, center=torch.tensor([3.0, 3.0]))
    assert torch.allclose(centered[0], torch.tensor([3.0, 4.0], dtype=torch.float64))
    assert torch.linalg.vector_norm(centered - 3.0, dim=1).max() <= 1.0 + 1e-12
    boxed = clip_box(x, torch.tensor([0.0, 0.5]), torch.tensor([1.0, 1.0]))
    assert torch.equal(
        boxed, torch.tensor([[1.0, 1.0], [0.3, 0.5], [0.0, 0.5]], dtype=torch.float64)
    )
