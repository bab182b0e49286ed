"""Attacks: the formulas (and ByzFL's outputs), the Byzantine subset, and what is replaced."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedkin.channel import attacks as A


def messages(k: int = 8, d: int = 5, seed: int = 0) -> torch.Tensor:
    return 1.0 + torch.randn(
        k, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )


BYZ = torch.tensor([False, True, False, False, True, False, False, False])
IDS = torch.arange(100, 108)


def test_omniscient_attacks_equal_byzfl(byzfl):
    x = messages()
    honest = x[~BYZ].numpy()
    cases = [
        (A.SignFlipConfig(), byzfl.SignFlipping()(honest)),
        (A.IpmConfig(tau=2.0), byzfl.InnerProductManipulation(tau=2.0)(honest)),
        (A.AlieConfig(z=1.5), byzfl.ALittleIsEnough(tau=1.5)(honest)),
        (A.MimicConfig(index=2), byzfl.Mimic(epsilon=2)(honest)),
    ]
    for cfg, expected in cases:
        out = cfg.build().apply(x, BYZ, 0, IDS)
        for row in (1, 4):
            np.testing.assert_allclose(out[row].numpy(), expected, rtol=1e-12)
        assert torch.equal(out[~BYZ], x[~BYZ])  # honest rows untouched
    out = A.NonFiniteConfig(value="inf").build().apply(x, BYZ, 0, IDS)
    np.testing.assert_array_equal(out[1].numpy(), byzfl.Inf()(honest))


def test_alie_z_follows_baruch_et_al():
    # n = 25, f = 5: s = ⌊25/2 + 1⌋ − 5 = 8, z = Φ⁻¹(17/25) = 0.4677…
    assert A.alie_z(25, 5) == pytest.approx(0.46769879, abs=1e-7)
    # n = 10, f = 2: s = 6 − 2 = 4, z = Φ⁻¹(0.6)
    assert A.alie_z(10, 2) == pytest.approx(0.25334710, abs=1e-7)
    x = messages()
    out = A.AlieConfig().build().apply(x, BYZ, 0, IDS)
    honest = x[~BYZ]
    z = -A.alie_z(8, 2)
    torch.testing.assert_close(out[1], honest.mean(0) + z * honest.std(0))


def test_ipm_points_against_the_honest_mean():
    x = messages()
    out = A.IpmConfig(tau=0.1).build().apply(x, BYZ, 0, IDS)
    mu = x[~BYZ].mean(0)
    torch.testing.assert_close(out[1], -0.1 * mu)
    assert float(out[1] @ mu) < 0


def test_non_omniscient_attacks_use_the_own_update():
    x = messages()
    out = A.ScaledConfig(scale=-3.0).build().apply(x, BYZ, 0, IDS)
    torch.testing.assert_close(out[BYZ], -3.0 * x[BYZ])
    out = A.SignFlipConfig(reference="own").build().apply(x, BYZ, 0, IDS)
    torch.testing.assert_close(out[BYZ], -x[BYZ])
    out = A.SignFlipConfig(scale=5.0).build().apply(x, BYZ, 0, IDS)
    torch.testing.assert_close(out[BYZ], (-5.0 * x[~BYZ].mean(0)).expand_as(out[BYZ]))
    lf = A.LabelFlipConfig().build()
    assert lf.poisons_labels and torch.equal(lf.apply(x, BYZ, 0, IDS), x)
    assert not A.IpmConfig().build().poisons_labels
    assert torch.isnan(A.NonFiniteConfig().build().apply(x, BYZ, 0, IDS)[BYZ]).all()


def test_gaussian_is_keyed_by_round_and_client():
    x = messages(d=2000)
    g = A.GaussianConfig(mu=0.5, sigma=2.0).build(seed=3)
    out = g.apply(x, BYZ, 7, IDS)
    assert abs(float(out[1].mean()) - 0.5) < 0.2 and abs(float(out[1].std()) - 2.0) < 0.15
    assert not torch.equal(out[1], out[4])  # different clients, different draws
    torch.testing.assert_close(g.apply(x.flip(0), BYZ.flip(0), 7, IDS.flip(0)).flip(0), out)
    assert not torch.equal(g.apply(x, BYZ, 8, IDS)[1], out[1])


def test_byzantine_subset_is_fixed_seeded_and_sized():
    a = A.byzantine_clients(0, 100, 0.2)
    assert int(a.sum()) == 20 and torch.equal(a, A.byzantine_clients(0, 100, 0.2))
    assert not torch.equal(a, A.byzantine_clients(1, 100, 0.2))
    assert (A.byzantine_clients(0, 100, 0.1) <= a).all()  # nested: 10% ⊂ 20%
    assert int(A.byzantine_clients(0, 100, 0.0).sum()) == 0


def test_label_flip_hook():
    y = torch.tensor([0, 3, 9])
    assert torch.equal(A.flip_labels(y, 10), torch.tensor([9, 6, 0]))


def test_no_honest_message_leaves_omniscient_attacks_inert():
    x = messages(k=3)
    all_byz = torch.ones(3, dtype=torch.bool)
    assert torch.equal(A.AlieConfig().build().apply(x, all_byz, 0, IDS[:3]), x)
    torch.testing.assert_close(A.ScaledConfig().build().apply(x, all_byz, 0, IDS[:3]), 10 * x)
