"""Zeroth-order clients: SPSA estimates the gradient; FedKSeed's seed-scalar messages rebuild
the clients' average delta exactly, packed as float32 scalars and ⌈log₂ K⌉-bit pool indices."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from conftest import tiny_config
from fedkin.algorithms.fedkseed import decode_scalars, encode_scalars, index_bits
from fedkin.core.rng import hash_counters
from fedkin.core.tree import tree_leaves, tree_map, tree_sub
from fedkin.experiment import Experiment
from fedkin.optim.zeroth import reconstruct, seed_direction, spsa_scalar


def test_spsa_estimates_the_gradient_of_a_quadratic():
    a = torch.tensor([1.0, -2.0, 0.5, 3.0])
    params = {"x": torch.tensor([0.3, 0.1, -0.2, 0.4])}

    def loss(p):
        return 0.5 * (a * p["x"] ** 2).sum()

    est = torch.zeros(4)
    n = 4000
    for k in range(n):
        z = seed_direction(params, 0, k)
        p, _ = spsa_scalar(loss, params, z, 1e-3)
        est += p * z["x"] / n
    assert_close(est, a * params["x"], rtol=0, atol=0.06)  # E[zzᵀ]∇L = ∇L


def test_seed_directions_are_reproducible_and_independent():
    params = {"a": torch.zeros(3, 2), "b": {"c": torch.zeros(5)}}
    z1, z2 = seed_direction(params, 1, 7), seed_direction(params, 1, 7)
    assert all(torch.equal(u, v) for u, v in zip(tree_leaves(z1), tree_leaves(z2), strict=True))
    z3 = seed_direction(params, 1, 8)
    assert not torch.equal(z1["a"], z3["a"])
    big = torch.cat(
        [t.flatten() for t in tree_leaves(seed_direction({"w": torch.zeros(20000)}, 2, 0))]
    )
    assert abs(float(big.mean())) < 0.03 and abs(float(big.std()) - 1) < 0.03


def test_fedkseed_server_rebuilds_the_average_client_delta():
    cfg = tiny_config(
        "algorithm.name=fedkseed",
        "algorithm.pool_size=64",
        "algorithm.lr=0.01",
        "client.local_steps=5",
        "rounds=1",
        "eval.holdout_clients=0",
    )
    exp = Experiment(cfg)
    w0 = tree_map(torch.clone, exp.population["global"])
    exp.run_round()
    w1 = exp.population["global"]
    # redo the round's clients one at a time, with their local deltas made explicit
    alg = exp.groups[0].algorithm
    cohort = exp.sample_cohort(0)
    batches = exp.dataset.sample_train_batches(cohort, exp.stream.child("batches"), 0, 5, 8)
    n = (
        exp.dataset.train_counts()[cohort].to(torch.float32)
        if hasattr(exp.dataset, "train_counts")
        else None
    )
    messages = []
    for j, c in enumerate(cohort.tolist()):
        ctx = {"client_id": torch.tensor(c), "round": torch.tensor(0)}
        msg, _, _ = alg.client_update({"global": w0}, {}, (batches[0][:, j], batches[1][:, j]), ctx)
        messages.append(msg["scalars"])
        assert int((msg["scalars"] != 0).sum()) <= 5
    delta = tree_sub(w1, w0)
    assert max(float(t.abs().max()) for t in tree_leaves(delta)) > 0
    # the update lies in the span of the used seeds' directions and equals their combination
    used = torch.stack(messages)
    weights = None if n is None else n / n.sum()
    avg = used.mean(0) if weights is None else (weights[:, None] * used).sum(0)
    rebuilt = reconstruct(w0, cfg.algorithm.pool_seed, avg)
    assert_close(delta, rebuilt, rtol=1e-4, atol=1e-5)
    # one client's pairs rebuild its own ZO-SGD trajectory, redone here step by step
    c = cohort[0]
    theta = w0
    for s in range(5):
        k = hash_counters(cfg.algorithm.pool_seed, 0, int(c), s) % 64
        z = seed_direction(w0, cfg.algorithm.pool_seed, k)
        x, y = batches[0][s, 0], batches[1][s, 0]
        p, _ = spsa_scalar(lambda q, x=x, y=y: alg.data_loss(q, x, y), theta, z, 1e-3)
        theta = tree_map(lambda t, d, p=p: t - 0.01 * p * d, theta, z)
    own = reconstruct(w0, cfg.algorithm.pool_seed, messages[0])
    assert_close(own, tree_sub(theta, w0), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("pool_size", [1, 2, 3, 255, 256, 4096, 5000, 65536, 70000])
def test_wire_buffer_is_the_count_and_decodes_to_the_message(pool_size):
    g = torch.Generator().manual_seed(pool_size)
    b = math.ceil(math.log2(pool_size)) if pool_size > 1 else 1
    assert index_bits(pool_size) == b
    for n in sorted({0, 1, min(7, pool_size), min(10, pool_size)}):
        c = torch.zeros(pool_size)
        idx = torch.randperm(pool_size, generator=g)[:n]
        c[idx] = torch.randn(n, generator=g) * 10.0 ** torch.randint(-8, 3, (n,), generator=g)
        if n:
            c[pool_size - 1] = -3.5  # the largest index uses all b bits
        n_sent = int((c != 0).sum())
        for pairs in (0, 10):  # padded with (0, +0.0) to 10 pairs
            buffer = encode_scalars(c, pool_size, pairs)
            m = max(n_sent, pairs)
            assert len(buffer) == 4 * m + math.ceil(m * b / 8)
            assert torch.equal(decode_scalars(buffer, pool_size), c)  # bit-exact float32
    assert index_bits(4096) == 12 and index_bits(65536) == 16 and index_bits(65537) == 17


def test_the_channel_counts_fedkseed_buffers_and_the_server_gets_the_same_scalars():
    extra = ("algorithm.name=fedkseed", "algorithm.pool_size=4096", "client.local_steps=5")
    exp = Experiment(tiny_config(*extra, "rounds=1", "eval.holdout_clients=0"))
    alg = exp.groups[0].algorithm
    cohort = exp.sample_cohort(0)
    batches = exp.dataset.sample_train_batches(cohort, exp.stream.child("batches"), 0, 5, 8)
    expected = 0
    for j, c in enumerate(cohort.tolist()):
        ctx = {"client_id": torch.tensor(c), "round": torch.tensor(0)}
        w = exp.population["global"]
        msg, _, _ = alg.client_update({"global": w}, {}, (batches[0][:, j], batches[1][:, j]), ctx)
        expected += len(encode_scalars(msg["scalars"], 4096, 5))
    record = exp.run_round()
    # every client sends 5 pairs: 5 float32 + 5 × 12-bit indices
    assert record["uplink_bytes"] == expected == len(cohort) * (4 * 5 + math.ceil(5 * 12 / 8))
    # the codec is lossless, so the run equals one whose channel does not pack the scalars
    plain = Experiment(tiny_config(*extra, "rounds=1", "eval.holdout_clients=0"))
    plain.channel.codecs = {}
    assert plain.run_round()["uplink_bytes"] == len(cohort) * 4 * 4096
    for a, b in zip(tree_leaves(exp.population), tree_leaves(plain.population), strict=True):
        assert torch.equal(a, b)


def test_fedkseed_uplink_is_over_1000x_smaller_than_a_full_delta():
    cfg = tiny_config("algorithm.name=fedkseed", "model.hidden=[128]", "client.local_steps=2")
    exp = Experiment(cfg)
    d = sum(t.numel() for t in tree_leaves(exp.population["global"]))
    per_client = exp.run_round()["uplink_bytes"] / cfg.cohort.clients_per_round
    assert per_client == 2 * 4 + math.ceil(2 * 12 / 8)  # two steps: 2 float32 + 2 × 12 bits
    assert 4 * d / per_client > 1000
