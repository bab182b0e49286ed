"""Robust aggregators: equal to ByzFL's on random inputs, closed forms, and the research notes'
oracle values (shared/research/privacy_robust_comm.md §2)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedkin.channel import aggregators as agg

X = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])


def t(a):
    return torch.as_tensor(a, dtype=torch.float64)


def random_inputs(seed: int, n: int = 9, d: int = 6) -> np.ndarray:
    g = np.random.default_rng(seed)
    x = g.normal(size=(n, d))
    x[: n // 4] += g.normal(scale=5.0, size=(n // 4, d))  # a few outliers, no ties
    return x


@pytest.mark.parametrize("seed", range(5))
def test_rules_equal_byzfl_on_random_inputs(byzfl, seed):
    x = random_inputs(seed)
    f = 2
    cases = [
        (agg.mean(t(x)), byzfl.Average()(x)),
        (agg.coordinate_median(t(x)), byzfl.Median()(x)),
        (agg.coordinate_median(t(x[:-1])), byzfl.Median()(x[:-1])),  # even n
        (agg.trimmed_mean(t(x), f), byzfl.TrMean(f=f)(x)),
        (agg.krum(t(x), f), byzfl.Krum(f=f)(x)),
        (agg.multi_krum(t(x), f), byzfl.MultiKrum(f=f)(x)),
        (agg.geometric_median(t(x), 0.1, 3), byzfl.GeometricMedian(nu=0.1, T=3)(x)),
        (agg.geometric_median(t(x), 0.5, 7), byzfl.GeometricMedian(nu=0.5, T=7)(x)),
        (
            agg.centered_clipping(t(x), torch.zeros(6, dtype=torch.float64), 1.5, 3),
            byzfl.CenteredClipping(L=3, tau=1.5)(x),
        ),
        (agg.minimum_diameter_average(t(x), f), byzfl.MDA(f=f)(x)),
        (agg.nearest_neighbour_average(t(x), t(x[3]), f), byzfl.MoNNA(f=f, idx=3)(x)),
        (agg.nearest_neighbour_mixing(t(x), f), byzfl.NNM(f=f)(x)),
    ]
    for ours, theirs in cases:
        np.testing.assert_allclose(ours.numpy(), theirs, rtol=1e-10, atol=1e-12)


def test_bucketing_equals_byzfl_given_the_same_permutation(byzfl):
    x = random_inputs(7, n=7)
    np.random.seed(3)
    perm = np.random.permutation(7)
    np.random.seed(3)  # ByzFL shuffles with numpy's global RNG: replay its permutation
    expected = byzfl.Bucketing(s=3)(x)
    out, w = agg.bucketing(t(x), torch.ones(7), 3, torch.as_tensor(np.argsort(perm)))
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-12)
    assert w.tolist() == [3.0, 3.0, 1.0]


def test_research_note_oracle_values():
    x = t(X)
    np.testing.assert_allclose(agg.mean(x), [4, 5, 6])
    np.testing.assert_allclose(agg.coordinate_median(x), [4, 5, 6])
    np.testing.assert_allclose(agg.trimmed_mean(x, 1), [4, 5, 6])
    np.testing.assert_allclose(
        agg.geometric_median(x), [3.78788764, 4.78788764, 5.78788764], rtol=1e-8
    )
    np.testing.assert_allclose(
        agg.centered_clipping(x, torch.zeros(3, dtype=x.dtype), 100.0), [4, 5, 6]
    )
    np.testing.assert_allclose(agg.minimum_diameter_average(x, 1), [2.5, 3.5, 4.5])
    np.testing.assert_allclose(agg.nearest_neighbour_mixing(x, 1)[0], [2.5, 3.5, 4.5])


@pytest.mark.parametrize(
    "name",
    ["mean", "weighted_mean", "median", "trimmed_mean", "multi_krum", "geometric_median", "mda"],
)
def test_permutation_invariant_and_translation_equivariant(name):
    cfg = agg.AGGREGATORS[name]()
    rule = cfg.build(seed=0)
    x = t(random_inputs(3))
    w = torch.ones(len(x), dtype=torch.float64)
    out, _, _ = rule.apply(x, w, rule.init(x.shape[1]), 0)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(1))
    out_p, _, _ = rule.apply(x[perm], w, rule.init(x.shape[1]), 0)
    torch.testing.assert_close(out_p, out)
    if name != "geometric_median":  # starts at 0, so it is not translation-equivariant in T steps
        shift = torch.arange(x.shape[1], dtype=x.dtype)
        out_s, _, _ = rule.apply(x + shift, w, rule.init(x.shape[1]), 0)
        torch.testing.assert_close(out_s, out + shift)


def test_f_zero_reduces_to_the_mean():
    x = t(random_inputs(4))
    m = x.mean(0)
    torch.testing.assert_close(agg.trimmed_mean(x, 0), m)
    torch.testing.assert_close(agg.multi_krum(x, 0), m)
    torch.testing.assert_close(agg.nearest_neighbour_mixing(x, 0), m.expand_as(x))
    torch.testing.assert_close(agg.minimum_diameter_average(x, 0), m)


def test_zero_weight_rows_are_dropped_and_weighted_mean_uses_weights():
    x = t([[1.0, 1.0], [3.0, 5.0], [1e9, -1e9]])
    w = torch.tensor([1.0, 3.0, 0.0])
    wm = agg.WeightedMeanConfig().build()
    out, _, _ = wm.apply(x, w, {}, 0)
    torch.testing.assert_close(out, t([2.5, 4.0]))
    med = agg.MedianConfig().build()
    out, _, _ = med.apply(x, w, {}, 0)
    torch.testing.assert_close(out, t([2.0, 3.0]))


def test_too_many_byzantine_is_a_clear_error():
    with pytest.raises(ValueError, match="2f < n"):
        agg.trimmed_mean(t(X), 2)
    with pytest.raises(ValueError, match="subsets"):
        agg.minimum_diameter_average(torch.randn(40, 2), 10, max_subsets=1000)


def test_centered_clipping_carries_its_centre_as_state():
    rule = agg.CenteredClippingConfig(tau=0.5).build()
    x = t([[10.0, 0.0], [10.0, 0.0]])
    state = rule.init(2)
    out1, state, _ = rule.apply(x, torch.ones(2), state, 0)
    out2, state, _ = rule.apply(x, torch.ones(2), state, 1)
    torch.testing.assert_close(out1.double(), t([0.5, 0.0]))  # one step of radius τ from 0
    torch.testing.assert_close(out2.double(), t([1.0, 0.0]))  # the next starts where it ended


def test_pre_aggregation_composes_with_any_rule():
    x = t(random_inputs(5))
    w = torch.ones(len(x))
    rule = agg.TrimmedMeanConfig(f=2, pre=[{"name": "nnm", "f": 2}]).build()
    out, _, _ = rule.apply(x, w, {}, 0)
    torch.testing.assert_close(out, agg.trimmed_mean(agg.nearest_neighbour_mixing(x, 2), 2))
    bucketed = agg.MeanConfig(pre=[{"name": "bucketing", "s": 3}]).build(seed=4)
    b1, _, _ = bucketed.apply(x, w, {}, 0)
    torch.testing.assert_close(b1, x.mean(0))  # equal buckets: mean of bucket means = mean
    med = agg.MedianConfig(pre=[{"name": "bucketing", "s": 2}]).build(seed=4)
    r0, _, _ = med.apply(x, w, {}, 0)
    r0b, _, _ = med.apply(x, w, {}, 0)
    torch.testing.assert_close(r0, r0b)  # seeded per round: reproducible


def _sim(attack: str, rule, seed: int = 0, n: int = 25, f: int = 5, d: int = 100):
    """§2.4's setting: honest x_i ~ N(1, I); f Byzantine copies of the attack vector."""
    g = torch.Generator().manual_seed(seed)
    honest = 1.0 + torch.randn(n - f, d, generator=g, dtype=torch.float64)
    mu = honest.mean(0)
    bad = {
        "signflip": -mu,
        "gauss": 200.0 * torch.randn(d, generator=g, dtype=torch.float64),
        "alie": mu - 0.468 * honest.std(0),
    }[attack]
    x = torch.cat([honest, bad.expand(f, d)])
    out, _, _ = rule.apply(x, torch.ones(n), rule.init(d), 0)
    return float(torch.linalg.vector_norm(out - mu))


def test_ordering_of_the_research_note_simulation():
    """§2.4 ordering (ζ = 0): the Gaussian attack wrecks the mean (> 100) but no robust rule
    (< 10); every robust rule stays < 12 under every attack."""
    f = 5
    robust = [
        agg.MedianConfig(),
        agg.TrimmedMeanConfig(f=f),
        agg.KrumConfig(f=f),
        agg.MultiKrumConfig(f=f),
        agg.GeometricMedianConfig(iterations=10),
        agg.CenteredClippingConfig(tau=1.0, iterations=3),
        agg.MonnaConfig(f=f),
        agg.TrimmedMeanConfig(f=f, pre=[{"name": "nnm", "f": f}]),
    ]
    assert _sim("gauss", agg.MeanConfig().build()) > 100
    for cfg in robust:
        rule = cfg.build()
        assert _sim("gauss", rule) < 10, cfg
        for attack in ("signflip", "alie"):
            assert _sim(attack, rule) < 12, (cfg, attack)


def test_edit_zeroes_outliers_after_warmup_and_weights_small_updates():
    cfg = agg.EditConfig(warmup=20, clip=None)
    rule = cfg.build()
    state = rule.init(3)
    g = torch.Generator().manual_seed(0)
    for r in range(10):  # 10 rounds × 4 clients of norm ≈ 1
        x = torch.nn.functional.normalize(torch.randn(4, 3, generator=g), dim=1)
        x = x * (1 + 0.01 * torch.randn(4, 1, generator=g))
        _, state, m = rule.apply(x, torch.ones(4), state, r)
        assert m["edit_outliers"] == 0
    assert int(state["count"]) == 40
    x = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [100.0, 0, 0]])
    out, state2, m = rule.apply(x, torch.ones(3), state, 10)
    assert m["edit_outliers"] == 1 and int(state2["count"]) == 42
    torch.testing.assert_close(out, torch.tensor([0.5, 0.5, 0.0]))  # equal norms: equal weights
    # softmax(−norm): a norm-2 update weighs e^{-2}/(e^{-1}+e^{-2}) against a norm-1 one
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    out, _, _ = agg.EditConfig().build().apply(x, torch.ones(2), agg.ewma_init()._asdict(), 0)
    p = torch.softmax(torch.tensor([-1.0, -2.0]), 0)
    torch.testing.assert_close(out, torch.tensor([p[0], 2 * p[1]]))


def test_edit_clips_the_averaged_update_and_its_ewma_follows_the_formula():
    out, _, _ = (
        agg.EditConfig(clip=0.1)
        .build()
        .apply(torch.tensor([[3.0, 4.0]]), torch.ones(1), agg.ewma_init()._asdict(), 0)
    )
    torch.testing.assert_close(torch.linalg.vector_norm(out), torch.tensor(0.1), atol=1e-6, rtol=0)
    s = agg.ewma_init()
    s = agg.ewma_update(s, torch.tensor(2.0, dtype=torch.float64), 0.5, 100)
    s = agg.ewma_update(s, torch.tensor(4.0, dtype=torch.float64), 0.5, 100)
    # mean: 0 → 1 → 2.5; M2: 0.5·(0 + 0.5·2·1) = 0.5 → 0.5·(0.5 + 0.5·3·1.5) = 1.375
    assert float(s.mean) == 2.5 and float(s.m2) == 1.375 and int(s.count) == 2
