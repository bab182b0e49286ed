"""Compressors: exact wire bytes, round trips, unbiasedness, error feedback telescoping."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedkin.channel import compressors as C
from fedkin.channel.flat import flatten, unflatten

D = 1000


def vec(seed: int = 0, d: int = D) -> torch.Tensor:
    return torch.randn(d, generator=torch.Generator().manual_seed(seed))


def expected_bytes(cfg, d: int) -> int:
    """The wire size each format promises, written out independently of the encoders."""
    k = max(1, math.ceil(getattr(cfg, "density", 1.0) * d))
    return {
        "none": 4 * d,
        "top_k": k * (2 + 4),  # uint16 index (d ≤ 65536) + float32 value
        "random_k": 4 * k,  # values only: the server regenerates the indices
        "qsgd": 4 + math.ceil(d * math.ceil(math.log2(2 * getattr(cfg, "levels", 1) + 1)) / 8),
        "sign": 4 + math.ceil(d / 8),
        "int8": 8 + d,
        "bf16": 2 * d,
    }[cfg.name]


FIXED = [
    C.NoneConfig(),
    C.TopKConfig(density=0.05),
    C.RandomKConfig(density=0.05),
    C.QsgdConfig(levels=4),
    C.QsgdConfig(levels=100),
    C.SignConfig(),
    C.Int8Config(),
    C.Bf16Config(),
]


@pytest.mark.parametrize("cfg", FIXED, ids=lambda c: f"{c.name}")
@pytest.mark.parametrize("d", [D, 70_001])
def test_wire_bytes_are_the_buffer_and_decode_inverts_encode(cfg, d):
    comp = cfg.build(seed=1)
    x = vec(d=d)
    out = comp.compress(x, None, round_=3, client=7)
    assert isinstance(out.buffer, bytes)
    if cfg.name == "top_k":  # indices need 4 bytes once d > 65536
        k = math.ceil(0.05 * d)
        assert len(out.buffer) == k * ((2 if d <= 2**16 else 4) + 4)
    else:
        assert len(out.buffer) == expected_bytes(cfg, d)
    torch.testing.assert_close(comp.decode(out.buffer, d, 3, 7), out.sent)
    assert comp.encode(x, 3, 7) == out.buffer  # reproducible


def test_exact_round_trips():
    x = vec()
    assert torch.equal(C.NoneConfig().build().compress(x, None, 0, 0).sent, x)
    assert torch.equal(C.TopKConfig(density=1.0).build().compress(x, None, 0, 0).sent, x)
    bf = C.Bf16Config().build().compress(x, None, 0, 0).sent
    assert torch.equal(bf, x.to(torch.bfloat16).float())
    i8 = C.Int8Config().build().compress(x, None, 0, 0).sent
    assert (i8 - x).abs().max() <= (x.max() - x.min()) / 255 / 2 + 1e-6
    sign = C.SignConfig().build().compress(x, None, 0, 0).sent
    torch.testing.assert_close(sign, x.abs().mean() * torch.where(x >= 0, 1.0, -1.0))


def test_top_k_keeps_the_largest_magnitudes():
    x = torch.tensor([0.1, -5.0, 0.2, 3.0, -0.3, 0.0, 4.0, 0.05, 0.0, 0.0])
    sent = C.TopKConfig(density=0.3, error_feedback=False).build().compress(x, None, 0, 0).sent
    assert torch.equal(sent, torch.tensor([0, -5.0, 0, 3.0, 0, 0, 4.0, 0, 0, 0]))


def test_random_k_indices_come_from_the_shared_stream_and_differ_per_client():
    comp = C.RandomKConfig(density=0.1).build(seed=2)
    x = vec()
    a = comp.compress(x, None, 0, 0).sent.nonzero().squeeze(1)
    b = comp.compress(x, None, 0, 1).sent.nonzero().squeeze(1)
    assert len(a) == 100 and not torch.equal(a, b)
    torch.testing.assert_close(comp.compress(x, None, 0, 0).sent[a], x[a])


def test_qsgd_and_rescaled_random_k_are_unbiased():
    """Mean of 1500 independent draws (different rounds) within 4 standard errors of x."""
    x = vec(d=50)
    draws = 1500
    for cfg in (
        C.QsgdConfig(levels=2),
        C.RandomKConfig(density=0.2, rescale=True, error_feedback=False),
    ):
        comp = cfg.build(seed=5)
        samples = torch.stack([comp.compress(x, None, r, 3).sent for r in range(draws)]).double()
        se = samples.std(0) / math.sqrt(draws)
        z = ((samples.mean(0) - x.double()) / se.clamp(min=1e-12)).abs()
        assert z.max() < 4.5, (cfg.name, z.max())
        assert not torch.allclose(samples[0], x.double())  # it does compress


def test_qsgd_variance_bound():
    """E‖Q(v) − v‖² ≤ min(d/s², √d/s)·‖v‖² (Alistarh et al., Lemma 3.1)."""
    x = vec(d=200)
    s = 3
    comp = C.QsgdConfig(levels=s).build(seed=0)
    err = torch.stack([(comp.compress(x, None, r, 0).sent - x).pow(2).sum() for r in range(300)])
    bound = min(200 / s**2, math.sqrt(200) / s) * x.pow(2).sum()
    assert err.mean() <= bound
    assert err.mean() > 0


@pytest.mark.parametrize(
    "cfg",
    [
        C.TopKConfig(density=0.02),
        C.RandomKConfig(density=0.02),
        C.SignConfig(),
        C.FedZipConfig(density=0.05),
        C.QsgdConfig(levels=16, error_feedback=True),
    ],
    ids=lambda c: c.name,
)
def test_error_feedback_telescopes(cfg):
    """Σ_t sent_t + e_T = Σ_t x_t: error feedback delays mass but never loses it."""
    comp = cfg.build(seed=0)
    residual = torch.zeros(D)
    total_in, total_sent = torch.zeros(D, dtype=torch.float64), torch.zeros(D, dtype=torch.float64)
    for r in range(20):
        x = vec(seed=r)
        out = comp.compress(x, residual, r, 0)
        residual = out.residual
        total_in += x.double()
        total_sent += out.sent.double()
    torch.testing.assert_close(total_sent + residual.double(), total_in, atol=1e-4, rtol=0)
    assert residual.abs().sum() > 0  # the residual really carries something


def test_without_error_feedback_the_residual_is_zero_and_ignored():
    comp = C.TopKConfig(density=0.1, error_feedback=False).build()
    out = comp.compress(vec(), torch.ones(D), 0, 0)
    assert torch.equal(out.residual, torch.zeros(D))
    assert torch.equal(out.sent, comp.compress(vec(), None, 0, 0).sent)


def test_fedzip_sends_cluster_centres_at_top_k_positions_and_compresses():
    x = vec(d=20_000)
    cfg = C.FedZipConfig(density=0.01, clusters=3, error_feedback=False)
    comp = cfg.build(seed=0)
    out = comp.compress(x, None, 0, 0)
    k = 200
    top = C.top_k_indices(x, k)
    assert torch.equal(out.sent.nonzero().squeeze(1), top)
    centres = out.sent[top].unique()
    assert len(centres) == 3
    # every kept value went to its nearest centre (the k-means assignment)
    nearest = centres[(x[top, None] - centres[None]).abs().argmin(1)]
    torch.testing.assert_close(out.sent[top], nearest)
    # far fewer bytes than top-k's 6 bytes per kept value (indices + float32)
    assert len(out.buffer) < 0.7 * k * 6
    assert 4 * x.numel() / len(out.buffer) > 100
    torch.testing.assert_close(comp.decode(out.buffer, x.numel(), 0, 0), out.sent)


def test_bit_packing_round_trips():
    g = np.random.default_rng(0)
    for bits in (1, 3, 7, 12):
        v = g.integers(0, 2**bits, size=101)
        buf = C.pack_bits(v, bits)
        assert len(buf) == math.ceil(101 * bits / 8)
        np.testing.assert_array_equal(C.unpack_bits(buf, bits, 101), v)


def test_flatten_round_trips_a_stacked_tree():
    tree = {"a": torch.randn(4, 2, 3), "b": {"c": torch.randn(4, 5), "d": torch.randn(4)}}
    flat, spec = flatten(tree)
    assert flat.shape == (4, 6 + 5 + 1) and spec.size == 12
    back = unflatten(flat, spec)
    assert torch.equal(back["a"], tree["a"])
    assert torch.equal(back["b"]["c"], tree["b"]["c"]) and torch.equal(
        back["b"]["d"], tree["b"]["d"]
    )
    one = unflatten(flat[1], spec)
    assert one["a"].shape == (2, 3) and torch.equal(one["a"], tree["a"][1])
