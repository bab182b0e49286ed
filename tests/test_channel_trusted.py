"""Trusted-direction projection (``channel/trusted.py``): the projector against numpy's SVD,
exact projection and clipping, the refresh period, composition with rules, config errors, and a
run that reports the drift (withheld under DP)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import tiny, tiny_config
from fedkin.channel import aggregators as agg
from fedkin.channel.trusted import (
    TrustedDirectionConfig,
    clip_orthogonal,
    drift,
    project,
    top_k_basis,
)
from fedkin.config import load_config
from fedkin.core.errors import ConfigError
from fedkin.experiment import Experiment
from fedkin.privacy.release import ReleasePolicy

D = 12


def basis_and_complement(seed: int, k: int = 3):
    """V_kᵀ ``[k, d]`` from 6 random updates, and a vector orthogonal to its span."""
    g = torch.Generator().manual_seed(seed)
    updates = torch.randn(6, D, generator=g, dtype=torch.float64)
    basis = top_k_basis(updates, k)
    r = torch.randn(D, generator=g, dtype=torch.float64)
    return basis, r - basis.T @ (basis @ r)


@pytest.mark.parametrize("k", [1, 3, 6])
def test_basis_spans_the_top_k_singular_directions_of_numpy_svd(k):
    g = np.random.default_rng(k).normal(size=(6, D))
    basis = top_k_basis(torch.as_tensor(g), k).numpy()
    v = np.linalg.svd(g, full_matrices=False)[2][:k]
    np.testing.assert_allclose(basis.T @ basis, v.T @ v, atol=1e-12)  # the same projector P
    np.testing.assert_allclose(basis @ basis.T, np.eye(k), atol=1e-12)


def test_rank_deficient_updates_give_fewer_directions():
    g = torch.tensor([[1.0, 0.0, 0.0], [2.0, 0.0, 0.0]], dtype=torch.float64)
    assert top_k_basis(g, 2).shape == (1, 3)
    assert top_k_basis(torch.zeros(2, 3), 2).shape == (0, 3)


def test_a_vector_in_the_subspace_is_unchanged():
    basis, _ = basis_and_complement(0)
    x = torch.tensor([[0.5, -2.0, 3.0], [1.0, 0.0, 0.0]], dtype=torch.float64) @ basis
    torch.testing.assert_close(project(x, basis), x, rtol=0, atol=1e-12)
    torch.testing.assert_close(clip_orthogonal(x, basis, 0.3), x, rtol=0, atol=1e-12)
    assert drift(x, basis) < 1e-12


def test_the_orthogonal_part_is_removed_or_clipped_exactly():
    basis, r = basis_and_complement(1)
    inside = torch.tensor([1.0, -1.0, 2.0], dtype=torch.float64) @ basis
    big = (3.0 * inside.norm() / r.norm()) * r  # ‖r‖ = 3‖P u‖
    x = torch.stack([inside + big, inside + 0.1 * big])
    torch.testing.assert_close(project(x, basis), torch.stack([inside, inside]))
    clipped = clip_orthogonal(x, basis, 0.5)
    # first row: the orthogonal part shrinks to 0.5‖P u‖ along r; second (0.3‖P u‖) stays
    torch.testing.assert_close(clipped[0], inside + big * (0.5 / 3.0))
    torch.testing.assert_close(clipped[1], x[1])
    assert clip_orthogonal(x, basis, 0.0).allclose(project(x, basis))
    off = torch.tensor([3.0, 0.3]) / torch.tensor([10.0, 1.09]).sqrt()  # ‖r‖/‖u‖ per row
    assert drift(x, basis) == pytest.approx(float(off.mean()))


def counting_source(calls: list[int], k: int = 4):
    g = torch.Generator().manual_seed(7)
    fixed = torch.randn(k, D, generator=g)

    def source(round_: int) -> torch.Tensor:
        calls.append(round_)
        return fixed

    return source


def test_the_basis_is_recomputed_every_refresh_rounds():
    calls: list[int] = []
    step = TrustedDirectionConfig(k=2, updates=4, refresh=3).build(0, counting_source(calls))
    state = step.init(D)
    x = torch.randn(5, D)
    for r in range(10):
        out, _, state, metrics = step.apply(x, torch.ones(5), state, r)
        assert out.shape == x.shape and 0 <= metrics["trusted_drift"] <= 1
    assert calls == [0, 3, 6, 9]
    assert state["basis"].shape == (2, D) and int(state["refreshed"]) == 9


def test_clean_rounds_pass_unchanged_and_then_span_the_basis():
    step = TrustedDirectionConfig(source="clean_rounds", clean_rounds=2, k=1).build(0)
    state = step.init(D)
    direction = torch.zeros(D)
    direction[0] = 1.0
    clean = torch.stack([direction, 2 * direction])
    for r in range(2):
        out, _, state, metrics = step.apply(clean, torch.ones(2), state, r)
        assert torch.equal(out, clean) and metrics == {}
    attacked = torch.ones(3, D)
    out, _, state, _ = step.apply(attacked, torch.ones(3), state, 2)
    torch.testing.assert_close(out, direction.expand(3, D))  # only e_0 survives
    assert len(state["rows"]) == 0


def test_composes_with_any_rule_and_keeps_the_rules_state():
    calls: list[int] = []
    pre = {"name": "trusted_direction", "k": 2, "updates": 4, "mode": "clip", "ratio": 0.5}
    x = torch.randn(7, D, generator=torch.Generator().manual_seed(3))
    median = agg.MedianConfig(pre=[pre]).build(0, counting_source(calls))
    out, state, metrics = median.apply(x, torch.ones(7), median.init(D), 0)
    basis = state["pre0/basis"]
    torch.testing.assert_close(out, agg.coordinate_median(clip_orthogonal(x, basis, 0.5)))
    assert "trusted_drift" in metrics
    cc = agg.CenteredClippingConfig(pre=[pre], tau=0.1).build(0, counting_source(calls))
    state = cc.init(D)
    assert set(state) == {"center", "pre0/basis", "pre0/refreshed"}
    out, state, _ = cc.apply(x, torch.ones(7), state, 0)
    torch.testing.assert_close(state["center"], out)  # the rule's own state still advances


@pytest.mark.parametrize(
    ("pre", "message"),
    [
        ("[{name: trusted_direction, k: 9, updates: 4}]", "channel.aggregator.pre.0.k=9 must be"),
        ("[{name: nnm}, {name: trusted_direction, k: 0}]", "channel.aggregator.pre.1.k:"),
        ("[{name: trusted_direction, mode: proj}]", "channel.aggregator.pre.0.mode:"),
    ],
)
def test_bad_trusted_configs_name_the_dotted_key(pre, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, tiny("channel.aggregator.name=mean", f"channel.aggregator.pre={pre}"))
    assert message in str(info.value) and "\n" not in str(info.value).strip()


TRUSTED = "channel.aggregator.pre=[{name: trusted_direction, k: 2, updates: 4, size: 32}]"


def test_a_run_reports_drift_and_the_trusted_updates_are_the_algorithms():
    exp = Experiment(tiny_config("channel.aggregator.name=mean", TRUSTED, "attack.name=gaussian"))
    records = [exp.run_round() for _ in range(2)]
    assert all(0 < r["trusted_drift"] <= 1 for r in records)
    assert exp.channel_state.aggregator["pre0/basis"].shape[0] == 2
    trusted = exp.channel.trusted_updates  # the server's trusted data through FedAvg's solver
    assert torch.equal(trusted(5), trusted(5))  # seeded: the same round, the same updates
    d = sum(t.numel() for t in exp.population["global"].values())
    assert len(trusted.rows) == 32 and trusted(5).shape == (4, d)
    training = torch.cat(
        [exp.dataset.train_index[c, : exp.dataset.train_sizes[c]] for c in exp.training_clients]
    )
    assert torch.isin(trusted.rows, training).all()


def test_under_dp_the_step_is_refused_and_its_drift_is_never_released():
    dp = ("privacy.mechanism=central", "privacy.noise_multiplier=1", "privacy.delta=1e-3")
    with pytest.raises(ConfigError, match="sensitivity to one client is not bounded"):
        load_config(None, tiny("channel.aggregator.name=mean", TRUSTED, *dp))
    policy = ReleasePolicy(mechanism="central")
    record = {"round": 1, "kind": "train", "trusted_drift": 0.3}
    assert "trusted_drift" not in policy.record(record)
