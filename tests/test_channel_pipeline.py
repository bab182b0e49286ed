"""The channel's halves over message trees: attack → compress, then aggregate."""

from __future__ import annotations

import torch

from fedkin.channel import pipeline as P
from fedkin.channel.aggregators import MedianConfig, WeightedMeanConfig
from fedkin.channel.attacks import NonFiniteConfig, SignFlipConfig
from fedkin.channel.compressors import NoneConfig, TopKConfig
from fedkin.channel.flat import flatten
from fedkin.core.channel import weighted_mean as core_weighted_mean


def stacked(k: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return {
        "delta": {"w": torch.randn(k, 3, 4, generator=g), "b": torch.randn(k, 4, generator=g)},
        "psi_delta": torch.randn(k, generator=g),
    }


IDS = torch.tensor([3, 8, 11, 12, 40])


def test_default_channel_is_fedavg_and_counts_float32_bytes():
    m, w = stacked(), torch.tensor([1.0, 2.0, 3.0, 0.0, 4.0])
    cfg = P.ChannelConfig()
    half = P.client_half(m, IDS, 0, compressor=cfg.compress.build())
    assert half.uplink_bytes.tolist() == [4.0 * (12 + 4 + 1)] * 5
    agg, _, _ = P.server_half(half.messages, w, 0, aggregator=cfg.aggregator.build(), state={})
    expected = core_weighted_mean(m, w)
    torch.testing.assert_close(agg, expected)


def test_only_the_model_delta_is_robustly_aggregated():
    m, w = stacked(), torch.ones(5)
    agg, _, _ = P.server_half(m, w, 0, aggregator=MedianConfig().build(), state={})
    torch.testing.assert_close(agg["psi_delta"], m["psi_delta"].mean())  # not the median
    torch.testing.assert_close(agg["delta"]["b"], m["delta"]["b"].median(0).values)


def test_attack_then_compress_with_error_feedback_residuals():
    m = stacked()
    comp = TopKConfig(density=0.25).build()
    byz = torch.tensor([False, True, False, False, False])
    half = P.client_half(
        m,
        IDS,
        2,
        compressor=comp,
        residuals=torch.zeros(5, 16),
        attack=SignFlipConfig().build(),
        byzantine=byz,
    )
    flat, _ = flatten(m["delta"])
    attacked = flat.clone()
    attacked[1] = -flat[~byz].mean(0)
    sent, _ = flatten(half.messages["delta"])
    torch.testing.assert_close(sent + half.residuals, attacked)  # EF: nothing lost
    assert ((sent != 0).sum(1) == 4).all()  # k = ⌈0.25 · 16⌉
    assert half.uplink_bytes.tolist() == [4 * (2 + 4) + 4.0] * 5  # 4 (index, value) + ψ
    assert torch.equal(half.messages["psi_delta"], m["psi_delta"])


def test_non_finite_rows_go_out_uncompressed_and_are_rejected_by_the_server():
    m = stacked()
    byz = torch.tensor([False, False, True, False, False])
    half = P.client_half(
        m,
        IDS,
        0,
        compressor=TopKConfig(density=0.25).build(),
        residuals=torch.ones(5, 16),
        attack=NonFiniteConfig().build(),
        byzantine=byz,
    )
    assert half.uplink_bytes[2] == 4 * 16 + 4 and torch.equal(half.residuals[2], torch.ones(16))
    w = torch.ones(5)
    w[2] = 0.0  # the server's non-finite filter (core.channel.reject_nonfinite) zeroes it
    agg, _, _ = P.server_half(half.messages, w, 0, aggregator=MedianConfig().build(), state={})
    assert all(torch.isfinite(t).all() for t in agg["delta"].values())


def test_central_dp_refuses_robust_rules_in_one_line():
    assert P.central_dp_conflict(P.ChannelConfig()) is None
    assert P.central_dp_conflict(P.ChannelConfig(aggregator={"name": "mean"})) is None
    msg = P.central_dp_conflict(P.ChannelConfig(aggregator={"name": "krum"}))
    assert msg and "channel.aggregator.name=krum" in msg and "\n" not in msg
    nnm = P.ChannelConfig(aggregator={"name": "mean", "pre": [{"name": "nnm"}]})
    assert P.central_dp_conflict(nnm)
    assert isinstance(P.ChannelConfig().aggregator, WeightedMeanConfig)
    assert isinstance(P.ChannelConfig().compress, NoneConfig)
