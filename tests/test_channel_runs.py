"""The channel in runs: config keys and their errors, bytes in the records, label poisoning,
and that robust rules and attacks change what the population learns."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny, tiny_config
from fedkin.config import load_config
from fedkin.core.errors import ConfigError
from fedkin.core.tree import tree_leaves
from fedkin.experiment import Experiment

CHANNEL = ("channel.compress.name=top_k", "channel.compress.density=0.1")


def run(exp: Experiment, rounds: int) -> list[dict]:
    return [exp.run_round() for _ in range(rounds)]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["channel.aggregator.name=medain"], "channel.aggregator.name: 'medain' is not one of"),
        (["channel.compress.name=top_k", "channel.compress.density=2"], "channel.compress"),
        (["attack.name=alie", "attack.fraction=1.5"], "attack"),
        (
            [
                "channel.aggregator.name=krum",
                "privacy.mechanism=central",
                "privacy.noise_multiplier=1",
                "cohort.weighting=uniform",
                "privacy.delta=1e-3",
            ],
            "channel.aggregator.name=krum: its sensitivity",
        ),
        (
            [
                "channel.compress.name=sign",
                "privacy.mechanism=local",
                "privacy.noise_multiplier=1",
                "cohort.weighting=uniform",
                "privacy.delta=1e-3",
            ],
            "privacy.mechanism=local",
        ),
        (["channel.aggregator.name=median", "algorithm.name=ifca"], "masked by cluster"),
        (
            [
                "attack.name=ipm",
                "backend.name=flower",
                "privacy.mechanism=central",
                "privacy.noise_multiplier=1",
                "cohort.weighting=uniform",
                "privacy.delta=1e-3",
            ],
            "attack.name=ipm sees the round's honest messages",
        ),
    ],
)
def test_bad_channel_configs_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, tiny(*overrides))
    text = str(info.value)
    assert message in text and "\n" not in text.strip()


def test_default_channel_counts_the_float32_message_and_model():
    """Uncompressed, a round costs the real float32 sizes: K messages up, K copies of Γ down."""
    exp = Experiment(tiny_config())
    assert exp.channel.default and not exp.channel.error_feedback
    population = exp.population
    record, second = exp.run_round(), exp.run_round()
    d = sum(t.numel() for t in population["global"].values())  # FedAvg sends its delta only
    gamma = sum(t.numel() for t in tree_leaves(population))
    assert record["uplink_bytes"] == 5 * 4 * d
    assert record["downlink_bytes"] == 5 * 4 * gamma
    assert second["uplink_bytes_total"] == 2 * 5 * 4 * d


def test_bytes_per_round_and_cumulative():
    exp = Experiment(tiny_config(*CHANNEL))
    records = run(exp, 2)
    d = sum(t.numel() for t in exp.population["global"].values())
    k = -(-d // 10)  # ⌈0.1·d⌉ kept coordinates: uint16 index + float32 value each
    assert records[0]["uplink_bytes"] == 5 * 6 * k
    assert records[0]["downlink_bytes"] == 5 * 4 * d
    assert records[1]["uplink_bytes_total"] == 2 * 5 * 6 * k
    assert records[1]["downlink_bytes_total"] == 2 * 5 * 4 * d


def test_label_flip_poisons_only_the_byzantine_clients_batches():
    exp = Experiment(tiny_config("attack.name=label_flip", "attack.fraction=0.5"))
    cohort = torch.arange(8)
    x, y = torch.zeros(2, 8, 3, 1), torch.arange(3).repeat(2, 8, 1)
    _, flipped = exp.channel.poison((x, y), cohort)
    bad = exp.channel.byzantine[cohort]
    assert bad.any() and (~bad).any()
    assert torch.equal(flipped[:, bad], 9 - y[:, bad])
    assert torch.equal(flipped[:, ~bad], y[:, ~bad])
    mask = torch.ones(2, 8, 3, dtype=torch.bool)  # DP-SGD's Poisson batches carry a mask
    poisoned = exp.channel.poison((x, y, mask), cohort)
    assert len(poisoned) == 3 and poisoned[2] is mask and torch.equal(poisoned[1], flipped)


def test_nonfinite_attack_is_rejected_and_counted():
    exp = Experiment(tiny_config("attack.name=nonfinite", "attack.fraction=0.3"))
    records = run(exp, 3)
    byz = exp.channel.byzantine
    assert sum(r["rejected_updates"] for r in records) > 0
    assert all(torch.isfinite(t).all() for t in exp.population["global"].values())
    assert 0 < int(byz.sum()) == 6


def test_robust_rule_resists_the_attack_that_breaks_the_mean():
    """IPM (τ = 5) from 30% Byzantine clients: the mean then moves against the honest update
    (0.7μ − 0.3·5μ < 0) and the train loss rises; the median's keeps falling. Same cohorts,
    batches and attackers in both runs. (Measured: mean 2.33 → 2.53, median 2.33 → 2.10,
    no attack 2.33 → 1.92 over 6 rounds.)"""
    base = (
        "rounds=6",
        "cohort.clients_per_round=10",
        "client.local_steps=5",
        "client.optimizer.lr=0.3",
    )
    attack = ("attack.name=ipm", "attack.tau=5.0", "attack.fraction=0.3")

    def losses(*extra):
        return [r["train_loss"] for r in run(Experiment(tiny_config(*base, *extra)), 6)]

    mean = losses(*attack, "channel.aggregator.name=mean")
    median = losses(*attack, "channel.aggregator.name=median")
    clean = losses("channel.aggregator.name=mean")
    assert mean[-1] > mean[0] + 0.1  # the attack bites
    assert median[-1] < median[0] - 0.1  # the robust rule still learns
    assert clean[-1] < median[-1]  # at a cost against the clean run


def test_progress_line_shows_bytes_readably():
    from fedkin.tracking import _bytes

    assert [_bytes(512), _bytes(3_400), _bytes(12e6), _bytes(1.5e9)] == [
        "512 B",
        "3.4 kB",
        "12.0 MB",
        "1.5 GB",
    ]


def test_compression_under_central_dp_runs_and_its_bytes_stay_inside():
    """Compression composes with central DP (the server clips the decoded messages); the byte
    counts — data-dependent for FedZip — are not in DP's release allow-list, so not recorded."""
    exp = Experiment(
        tiny_config(
            *CHANNEL,
            "privacy.mechanism=central",
            "privacy.noise_multiplier=1.0",
            "privacy.delta=1e-3",
            "privacy.accountant=rdp",
            "cohort.weighting=uniform",
        )
    )
    records = run(exp, 2)
    assert exp.channel_state.uplink_total > 0
    assert all("uplink_bytes" not in r and "epsilon" in r for r in records)
