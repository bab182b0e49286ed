"""Client-side Polyak momentum (``channel.momentum``): the recursion, where it sits in the client
half, its per-client state in runs, MoNNA's use of it, config errors and DP."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny, tiny_config
from fedkin.channel.flat import flatten
from fedkin.config import load_config
from fedkin.core.errors import ConfigError
from fedkin.core.tree import tree_leaves
from fedkin.experiment import Experiment

BETA = 0.7
MOMENTUM = (f"channel.momentum.beta={BETA}",)


def deltas(k: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(k, d, generator=torch.Generator().manual_seed(seed))


def test_momentum_step_follows_the_recursion_of_a_hand_loop():
    """Over rounds with changing cohorts and a rejected update, the rows sent and the state kept
    are m ← βm + (1 − β)Δ per client, m = 0 before its first round, unchanged if rejected."""
    channel = Experiment(tiny_config(*MOMENTUM)).channel
    d, hand = 6, {}
    state = torch.zeros(10, d)  # the store, by client id
    cohorts = [[0, 1, 2], [2, 3], [0, 2, 4], [1, 2]]
    for r, cohort in enumerate(cohorts):
        ids = torch.tensor(cohort)
        delta = deltas(len(cohort), d, r)
        ok = torch.tensor([not (r == 2 and c == 2) for c in cohort])  # client 2 rejected in r 2
        sent, kept = channel.momentum_step({"delta": {"w": delta}}, {"momentum": state[ids]}, ok)
        state[ids] = kept["momentum"]
        for j, c in enumerate(cohort):
            m = [
                BETA * a + (1 - BETA) * b
                for a, b in zip(hand.get(c, [0.0] * d), delta[j].tolist(), strict=True)
            ]
            assert sent["delta"]["w"][j].tolist() == pytest.approx(m, rel=1e-6)
            if ok[j]:
                hand[c] = m
    for c, m in hand.items():
        assert state[c].tolist() == pytest.approx(m, rel=1e-6)


def test_only_the_model_delta_gets_momentum():
    channel = Experiment(tiny_config(*MOMENTUM)).channel
    m = {"delta": {"w": torch.ones(2, 3)}, "psi_delta": torch.ones(2)}
    sent, _ = channel.momentum_step(m, {"momentum": torch.zeros(2, 3)}, torch.ones(2, dtype=bool))
    assert torch.equal(sent["psi_delta"], m["psi_delta"])
    assert torch.allclose(sent["delta"]["w"], torch.full((2, 3), 1 - BETA))


def test_momentum_comes_before_the_attack_and_the_compression():
    """Honest rows send their momentum, the omniscient attack (sign flip of the honest mean)
    sees the honest momenta, and error feedback compresses the attacked momentum."""
    exp = Experiment(
        tiny_config(
            *MOMENTUM,
            "attack.name=sign_flip",
            "attack.fraction=0.25",
            "channel.compress.name=top_k",
            "channel.compress.density=0.5",
        )
    )
    channel = exp.channel
    bad, good = channel.byzantine.nonzero()[:1, 0], (~channel.byzantine).nonzero()[:3, 0]
    ids = torch.cat([good[:1], bad, good[1:]])
    byz = channel.byzantine[ids]
    assert byz.tolist() == [False, True, False, False]
    old, delta = deltas(4, 8, 1), deltas(4, 8, 2)
    ok = torch.ones(4, dtype=bool)
    msg, kept = channel.momentum_step({"delta": {"w": delta}}, {"momentum": old}, ok)
    up = channel.client_half(msg, ids, ok, 0, torch.zeros(4, 8))
    momenta = BETA * old + (1 - BETA) * delta
    intended = momenta.clone()
    intended[byz] = -momenta[~byz].mean(0)
    sent, _ = flatten(up.messages["delta"])
    torch.testing.assert_close(sent + up.residuals, intended)  # EF: nothing lost
    torch.testing.assert_close(kept["momentum"], momenta)  # the Byzantine row's own momentum


def test_a_run_sends_each_clients_momentum_kept_across_rounds():
    """In a run with partial cohorts, what each client sends is the hand loop over its deltas,
    and the channel's client-state store holds the last momentum of every client."""
    exp = Experiment(tiny_config(*MOMENTUM, "rounds=4", "channel.aggregator.name=mean"))
    seen = []
    step = exp.channel.momentum_step

    def spy(messages, state, ok):
        sent, kept = step(messages, state, ok)
        seen.append((flatten(messages["delta"])[0], flatten(sent["delta"])[0], ok))
        return sent, kept

    exp.channel.momentum_step = spy
    cohorts = []
    for r in range(4):
        cohorts.append(exp.sample_cohort(r))
        exp.run_round()
    hand: dict[int, torch.Tensor] = {}
    for cohort, (delta, sent, ok) in zip(cohorts, seen, strict=True):
        assert ok.all() and len(cohort) < exp.dataset.num_clients
        for j, c in enumerate(cohort.tolist()):
            hand[c] = BETA * hand.get(c, torch.zeros(delta.shape[1])) + (1 - BETA) * delta[j]
            torch.testing.assert_close(sent[j], hand[c], rtol=1e-6, atol=1e-7)
    store = exp.channel_clients.gather(torch.tensor(sorted(hand)))["momentum"]
    torch.testing.assert_close(store, torch.stack([hand[c] for c in sorted(hand)]))


def test_monna_implies_momentum_and_beta_zero_is_averaging_alone():
    monna = ("channel.aggregator.name=monna", "channel.aggregator.f=1")
    assert load_config(None, tiny(*monna)).channel.momentum.beta == 0.9
    assert load_config(None, tiny(*monna, "channel.momentum.beta=0.5")).channel.momentum.beta == 0.5
    exp = Experiment(tiny_config(*monna, "channel.momentum.beta=0"))
    assert exp.channel.client_keys == ()  # β = 0 sends Δ and keeps no state
    exp.run_round()
    assert exp.channel_clients is None
    assert (
        load_config(None, tiny("channel.aggregator.name=centered_clipping")).channel.momentum
        is None
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["channel.momentum.beta=1"], "channel.momentum.beta: Input should be less than 1"),
        (["channel.momentum.beta=-0.1"], "channel.momentum.beta: Input should be greater than"),
        (["channel.momentum.bta=0.9"], "channel.momentum.bta"),
        (
            ["channel.aggregator.name=monna", "algorithm.name=ifca"],
            "channel.momentum: algorithm.name=ifca sends its model delta masked by cluster",
        ),
        (
            [
                "channel.aggregator.name=monna",
                "privacy.mechanism=central",
                "privacy.noise_multiplier=1",
                "cohort.weighting=uniform",
                "privacy.delta=1e-3",
            ],
            "channel.aggregator.name=monna: its sensitivity",
        ),
    ],
)
def test_bad_momentum_configs_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, tiny(*overrides))
    text = str(info.value)
    assert message in text and "\n" not in text.strip()


def test_list_shows_the_momentum_step(cli, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    assert cli(["list", "client_steps"]) == 0
    out = capsys.readouterr().out
    assert "client_steps (config key: channel.momentum)" in out
    assert "beta = 0.9: momentum β in [0, 1)" in out


DP = (
    "privacy.noise_multiplier=1.0",
    "privacy.delta=1e-3",
    "privacy.accountant=rdp",
    "cohort.weighting=uniform",
)


def test_under_central_dp_the_clip_bounds_the_momentum_so_sensitivity_stays_c():
    """Momentum sits before the release: the client clips its momentum, so a client whose
    momentum is huge moves the pre-noise sum by at most C (neighbouring cohorts with and
    without it), and its state keeps the unclipped momentum on the client."""
    exp = Experiment(tiny_config(*MOMENTUM, *DP, "privacy.mechanism=central"))
    channel, clip = exp.channel, exp.privacy.clip
    ids, ok = torch.arange(4), torch.ones(4, dtype=bool)
    old = deltas(4, 8, 3)
    old[0] *= 1e6  # client 0's momentum: far outside the clip norm
    msg, kept = channel.momentum_step({"delta": {"w": deltas(4, 8, 4)}}, {"momentum": old}, ok)
    up = channel.client_half(msg, ids, ok, 0, clip=clip)
    released = up.messages["delta"]["w"]
    assert (torch.linalg.vector_norm(released, dim=1) <= clip * (1 + 1e-6)).all()
    without = channel.client_half(
        {"delta": {"w": msg["delta"]["w"][1:]}}, ids[1:], ok[1:], 0, clip=clip
    )
    gap = released.sum(0) - without.messages["delta"]["w"].sum(0)
    assert torch.linalg.vector_norm(gap) <= clip * (1 + 1e-6)
    assert torch.linalg.vector_norm(kept["momentum"][0]) > 1e5


@pytest.mark.parametrize("mechanism", ["central", "local"])
def test_momentum_composes_with_dp_and_costs_the_same_epsilon(mechanism):
    """Under both DP mechanisms a momentum run is accounted exactly like the plain run."""
    extra = (*DP, f"privacy.mechanism={mechanism}", "rounds=2")
    plain, with_momentum = (Experiment(tiny_config(*extra, *m)) for m in ((), MOMENTUM))
    records = [[e.run_round() for _ in range(2)] for e in (plain, with_momentum)]
    assert [r["epsilon"] for r in records[0]] == [r["epsilon"] for r in records[1]]
    assert with_momentum.channel_clients is not None
    pairs = zip(tree_leaves(plain.population), tree_leaves(with_momentum.population), strict=True)
    assert not all(torch.equal(a, b) for a, b in pairs)
