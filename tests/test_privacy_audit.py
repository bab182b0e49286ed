"""Auditing the user-level DP aggregation — tests, not claims.

1. Sensitivity: one client (with an adversarially huge update) moves the clipped sum, and the
   released aggregate, by at most C (add/remove) or 2C (replace-one).
2. Noise: the central noise on the sum has std z·C (within 1%, tolerance from the sample size),
   mean 0, a normal shape, and no correlation across rounds.
3. Monte-Carlo distinguishing: one round of the clients' ``UserLevelDP.device_release`` and the
   server's ``noisy_mean`` with and without a canary client (update 10⁶·e₁), many trials (one
   ``vmap`` over the round counter, so each trial draws fresh counter-based noise through the
   real code); the empirical ε lower bound (Clopper–Pearson, Bonferroni over thresholds) must
   not exceed the accountant's ε, and deliberately broken mechanisms (noise std / 2, / 10, no
   clipping) must be caught: their ε_lb exceeds the ε the accountant claims for the nominal
   noise.

All noise is counter-based in a fixed seed, so every number here is deterministic.
"""

from __future__ import annotations

import math

import dp_accounting as dpa
import numpy as np
import pytest
import torch
from dp_accounting import rdp
from scipy import stats
from torch.func import vmap

from conftest import dp_channel
from fedkin.bench.privacy import canary_audit, epsilon_lower_bound, local_canary_audit
from fedkin.channel.runtime import ChannelState
from fedkin.core.tree import tree_leaves, tree_map
from fedkin.privacy.config import AdaptiveClipConfig, PrivacyConfig
from fedkin.privacy.federated import UserLevelDP

DELTA = 1e-5


def central(z=1.0, clip=1.0, population=100, cohort=10, sampling="poisson", **kw) -> UserLevelDP:
    accountant = "rdp" if sampling == "fixed" else "pld"
    cfg = PrivacyConfig(
        mechanism="central", noise_multiplier=z, clip=clip, accountant=accountant, **kw
    )
    return UserLevelDP(
        cfg, population=population, cohort_size=cohort, sampling=sampling, rounds=1, seed=11
    )


def norm(tree) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tree_leaves(tree)))


# ----- the estimator itself ----------------------------------------------------------------------


def test_epsilon_lower_bound_is_sound_and_has_power_on_exact_gaussians():
    """N(0,1) vs N(1,1) is exactly 1-GDP (a Gaussian mechanism with z = 1): the bound must stay
    below its ε and still find most of it; identical worlds give (almost) nothing."""
    gen = torch.Generator().manual_seed(0)
    n = 200_000
    null = torch.randn(n, generator=gen, dtype=torch.float64).numpy()
    alt = 1.0 + torch.randn(n, generator=gen, dtype=torch.float64).numpy()
    grid = np.linspace(-8, 9, 401)
    exact = dpa.get_epsilon_gaussian(1.0, DELTA)  # 4.377
    lb = epsilon_lower_bound(null, alt, DELTA, grid)["epsilon_lb"]
    assert 2.0 < lb <= exact
    same = torch.randn(n, generator=gen, dtype=torch.float64).numpy()
    assert epsilon_lower_bound(null, same, DELTA, grid)["epsilon_lb"] < 0.1


# ----- 1. sensitivity ----------------------------------------------------------------------------


def _cohort(k: int, gen: torch.Generator) -> dict:
    """Client updates with norms spread from 1e-3 to 1e3 around C = 1."""
    scale = 10 ** (6 * torch.rand(k, generator=gen) - 3)
    return {
        "w": torch.randn(k, 4, 3, generator=gen) * scale[:, None, None],
        "b": {"v": torch.randn(k, 5, generator=gen) * scale[:, None]},
    }


def _released(dp: UserLevelDP, messages, round_: int):
    """The clipped sum and the released aggregate of one round through the channel's halves."""
    k = len(tree_leaves(messages)[0])
    channel, ok = dp_channel(dp, k), torch.ones(k, dtype=torch.bool)
    up = channel.client_half(messages, torch.arange(k), ok, round_, clip=dp.clip)
    total = tree_map(lambda t: t.sum(0), up.messages)
    state = ChannelState(clip=dp.clip)
    out, _, _ = channel.server_half(up.messages, ok.float(), up.was_clipped, k, round_, state)
    return total, out


@pytest.mark.parametrize("trial", range(5))
def test_one_client_moves_the_clipped_sum_by_at_most_c(trial):
    clip = 0.7
    dp = central(clip=clip)
    gen = torch.Generator().manual_seed(trial)
    base = _cohort(12, gen)
    huge = {"w": torch.randn(1, 4, 3, generator=gen) * 1e6, "b": {"v": torch.full((1, 5), -1e6)}}
    for extra in (huge, _cohort(1, gen)):
        with_client = tree_map(lambda a, b: torch.cat([a, b]), base, extra)
        sum_d, out_d = _released(dp, base, trial)
        sum_d1, out_d1 = _released(dp, with_client, trial)  # same round: same noise
        change = norm(tree_map(torch.sub, sum_d1, sum_d))
        assert change <= clip * (1 + 1e-5)
        if extra is huge:
            assert change == pytest.approx(clip, rel=1e-5)  # clipped to exactly C
        # the release moves by at most C/m, whatever the rest of the cohort
        moved = norm(tree_map(torch.sub, out_d1, out_d))
        assert moved <= clip / dp.cohort_size * (1 + 1e-4)
    # removing each client in turn
    total, _ = _released(dp, base, trial)
    for i in range(12):
        rest = tree_map(lambda t, i=i: torch.cat([t[:i], t[i + 1 :]]), base)
        assert norm(tree_map(torch.sub, total, _released(dp, rest, trial)[0])) <= clip * (1 + 1e-5)


def test_replacing_one_client_moves_the_clipped_sum_by_at_most_2c():
    clip = 0.7
    dp = central(clip=clip, population=13, cohort=13, sampling="fixed")
    gen = torch.Generator().manual_seed(7)
    base = _cohort(13, gen)
    plus = tree_map(lambda t: t.clone(), base)
    minus = tree_map(lambda t: t.clone(), base)
    plus["w"][0], minus["w"][0] = 1e6, -1e6
    plus["b"]["v"][0], minus["b"]["v"][0] = 1e6, -1e6
    moved = norm(tree_map(torch.sub, _released(dp, plus, 0)[0], _released(dp, minus, 0)[0]))
    assert moved == pytest.approx(2 * clip, rel=1e-5)  # the worst case is attained
    assert dp.round_event().noise_multiplier == pytest.approx(dp.noise_multiplier / 2)


def test_nonfinite_update_is_rejected_before_the_noisy_sum():
    """A NaN update that reaches the server (a client that sent it anyway) must not reach the
    sum: the server half's non-finite filter drops it, and the release is the one without it."""
    dp = central()
    gen = torch.Generator().manual_seed(3)
    base = _cohort(6, gen)
    bad = tree_map(lambda t: t.clone(), base)
    bad["w"][2] = float("nan")
    channel, ids, ok = dp_channel(dp, 6), torch.arange(6), torch.ones(6, dtype=torch.bool)
    state = ChannelState(clip=dp.clip)
    up = channel.client_half(bad, ids, ok, 0, clip=dp.clip)
    out, _, metrics = channel.server_half(up.messages, torch.ones(6), up.was_clipped, 6, 0, state)
    assert metrics["rejected_updates"] == 1 and metrics["accepted_updates"] == 5
    without = torch.ones(6)
    without[2] = 0.0
    clean = channel.client_half(base, ids, ok, 0, clip=dp.clip)
    expected, _, _ = channel.server_half(clean.messages, without, clean.was_clipped, 5, 0, state)
    assert all(torch.isfinite(t).all() for t in tree_leaves(out))
    pairs = zip(tree_leaves(out), tree_leaves(expected), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)


# ----- 2. noise calibration ----------------------------------------------------------------------


def _noise_on_sum(dp: UserLevelDP, rounds: int, dim: int) -> np.ndarray:
    """The noise the release adds to the sum, [rounds, dim]: zero updates, many rounds."""
    k = 8
    zeros = {"a": torch.zeros(k, dim - 4), "b": {"c": torch.zeros(k, 4)}}
    clipped, _ = dp.device_release(zeros, torch.ones(k, dtype=torch.bool), 0, torch.arange(k))
    w = torch.ones(k)
    out = vmap(lambda r: dp.noisy_mean(clipped, w, r, dp.clip))(torch.arange(rounds))
    flat = torch.cat([out["a"], out["b"]["c"]], dim=1).double() * dp.cohort_size
    return flat.numpy()


def _check_normal(noise: np.ndarray, expected: float) -> None:
    """std within 1% (5 standard errors, which the sample size makes < 1%), mean 0, normal
    shape (Kolmogorov–Smirnov), no correlation between consecutive rounds (rows)."""
    n = noise.size
    se = 1 / math.sqrt(2 * n)  # relative standard error of a normal sample's std
    assert 5 * se < 0.01  # enough draws to resolve 1% decisively
    assert abs(float(noise.std()) / expected - 1) < 5 * se
    assert abs(float(noise.mean())) < 5 * expected / math.sqrt(n)
    assert stats.kstest(noise.reshape(-1) / expected, "norm").pvalue > 1e-3
    lag = np.corrcoef(noise[:-1].reshape(-1), noise[1:].reshape(-1))[0, 1]
    assert abs(lag) < 5 / math.sqrt(n - noise.shape[1])


@pytest.mark.parametrize(
    ("z", "clip", "sampling"), [(1.0, 1.0, "poisson"), (0.7, 2.5, "poisson"), (1.3, 0.4, "fixed")]
)
def test_central_noise_std_is_z_times_c(z, clip, sampling):
    """Fixed cohorts too: the *noise* is z·C; the accountant then uses z/2 (sensitivity 2C)."""
    dp = central(z=z, clip=clip, sampling=sampling)
    _check_normal(_noise_on_sum(dp, 4000, 50), z * clip)


def test_adaptive_clip_update_noise_is_z_delta_times_current_clip():
    """With adaptive clipping the update gets z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2) > z times the clip
    norm *of that round*, so that (update, count) together cost one Gaussian with multiplier z."""
    z, sigma_b = 1.0, 2.0
    dp = central(z=z, adaptive_clip=AdaptiveClipConfig(count_noise=sigma_b))
    assert dp.update_noise == pytest.approx((z**-2 - (2 * sigma_b) ** -2) ** -0.5)
    k, dim = 8, 1000
    zeros = {"a": torch.zeros(k, dim)}
    channel, ids, ok = dp_channel(dp, k), torch.arange(k), torch.ones(k, dtype=torch.bool)
    state = ChannelState(clip=dp.clip)
    rows, clips = [], []
    for r in range(200):
        clip_now = state.clip  # the round's clip norm, passed in; the next one comes back
        clips.append(clip_now)
        up = channel.client_half(zeros, ids, ok, r, clip=clip_now)
        out, state, _ = channel.server_half(up.messages, ok.float(), up.was_clipped, k, r, state)
        rows.append((out["a"].double() * dp.cohort_size / clip_now).numpy())
    assert len(set(clips)) > 100  # the clip norm moved every round (all updates unclipped)
    _check_normal(np.stack(rows), dp.update_noise)


def test_noise_differs_between_rounds_and_repeats_within_a_round():
    dp = central()
    noise = _noise_on_sum(dp, 3, 20)
    again = _noise_on_sum(dp, 3, 20)
    assert np.array_equal(noise, again)  # counter-based: a resumed run adds the same noise
    assert not np.allclose(noise[0], noise[1])


# ----- 3. Monte-Carlo distinguishing audit -------------------------------------------------------


TRIALS = 200_000  # per world; decisive for a 2x under-noised mechanism (see the bench results)


@pytest.fixture(scope="module")
def honest():
    return canary_audit(1.0, trials=TRIALS)


def test_honest_mechanism_epsilon_lb_below_accountant(honest):
    assert honest["claimed_epsilon"] == pytest.approx(
        dpa.get_epsilon_gaussian(1.0, DELTA), rel=0.01
    )
    assert honest["epsilon_lb"] <= honest["claimed_epsilon"]
    # the audit has power: it certifies more than half of the claimed ε
    assert honest["epsilon_lb"] > 0.5 * honest["claimed_epsilon"]


@pytest.mark.parametrize(("scale", "trials"), [(0.5, TRIALS), (0.1, 20_000)])
def test_under_noised_mechanism_is_caught(honest, scale, trials):
    broken = canary_audit(1.0, trials=trials, noise_scale=scale)
    assert broken["claimed_epsilon"] == honest["claimed_epsilon"]  # the accountant is fooled
    assert broken["epsilon_lb"] > broken["claimed_epsilon"]  # … the audit is not


def test_ignoring_the_sensitivity_is_caught():
    broken = canary_audit(1.0, trials=2000, clip_canary=False)
    assert broken["epsilon_lb"] > broken["claimed_epsilon"]


def test_poisson_sampled_round_honest_and_under_noised():
    honest_q = canary_audit(1.0, trials=100_000, sampling="poisson")
    ref = dpa.PoissonSampledDpEvent(0.5, dpa.GaussianDpEvent(1.0))
    assert honest_q["claimed_epsilon"] < dpa.get_epsilon_gaussian(1.0, DELTA)  # amplification
    assert honest_q["epsilon_lb"] <= honest_q["claimed_epsilon"]
    broken = canary_audit(1.0, trials=20_000, sampling="poisson", noise_scale=0.1)
    assert broken["epsilon_lb"] > broken["claimed_epsilon"]
    acc = rdp.RdpAccountant()
    acc.compose(ref)
    assert honest_q["claimed_epsilon"] <= acc.get_epsilon(DELTA)  # PLD is tighter than RDP


def test_fixed_cohort_replace_one_needs_the_factor_two():
    """Replace-one moves the sum by 2C: the audit stays under the (z/2) claim and certifies more
    than a sensitivity-C accounting, Gaussian(z), would claim."""
    audit = canary_audit(1.0, trials=100_000, sampling="fixed")
    assert audit["epsilon_lb"] <= audit["claimed_epsilon"]
    acc = rdp.RdpAccountant()
    acc.compose(dpa.GaussianDpEvent(1.0))
    assert audit["epsilon_lb"] > acc.get_epsilon(DELTA)


def test_local_dp_message_audit_zero_out_neighbours():
    """fedkin claims the replace-one ε (sensitivity 2C); a zero-out neighbour moves a message by
    at most C, so the audit lands near the Gaussian(z) value, below the claim."""
    audit = local_canary_audit(1.0, trials=TRIALS, neighbour="zero")
    assert audit["epsilon_lb"] <= audit["claimed_epsilon"]
    assert audit["epsilon_lb"] > 0.5 * dpa.get_epsilon_gaussian(1.0, DELTA)


def test_local_dp_message_audit_replace_one_fixed_cohorts():
    audit = local_canary_audit(1.0, trials=TRIALS, neighbour="replace", sampling="fixed")
    assert audit["epsilon_lb"] <= audit["claimed_epsilon"]


def test_local_dp_message_audit_replace_one_poisson_cohorts():
    audit = local_canary_audit(1.0, trials=TRIALS, neighbour="replace", sampling="poisson")
    assert audit["epsilon_lb"] <= audit["claimed_epsilon"]


# ----- the bench that reports these numbers ------------------------------------------------------


def test_bench_privacy_quick(tmp_path, capsys):
    import json

    from fedkin.cli.main import main

    assert main(["bench", "privacy", "--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "fedkin bench privacy --quick" in out and "| algorithm |" in out
    result = json.loads((tmp_path / "privacy_quick.json").read_text())
    assert (tmp_path / "privacy_quick.md").read_text() in out
    assert (tmp_path / "privacy_quick.png").read_bytes()[:4] == b"\x89PNG"
    rows = {(r["algorithm"], r["target_epsilon"]) for r in result["accuracy"]}
    assert rows == {(a, e) for a in ("fedavg", "ditto") for e in (1.0, None)}
    for r in result["accuracy"]:
        if r["target_epsilon"] is not None:
            assert 0.99 <= r["epsilon_spent"] <= 1.0
    # the reported accuracy is that of the bench's configuration, run through `fedkin.run`
    from fedkin import run
    from fedkin.bench.privacy import _config, quick_spec

    fedavg = next(r for r in result["accuracy"] if r["algorithm"] == "fedavg")
    epsilon = fedavg["target_epsilon"] or float("inf")
    summary = run(_config(quick_spec(), "fedavg", epsilon, []), tmp_path / "rerun")
    assert fedavg["personal_acc"] == summary["personal_acc_mean"]
    assert result["dp_sgd_overhead"]["ratio"] > 0
    assert [a["noise_scale"] for a in result["audit"]] == [1.0, 0.5, 0.1]
    assert result["audit"][0]["epsilon_lb"] <= result["audit"][0]["claimed_epsilon"]
