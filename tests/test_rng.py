"""Counter-based randomness: statistics, independence of streams, cohort sampling, batches that
depend only on (seed, round, client), reproducible runs and no global RNG side effects."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from conftest import drop_timings, tiny_config
from fedkin.core import rng
from fedkin.core.rng import Stream
from fedkin.experiment import Experiment

N = 200_000
Z = 5.0  # tolerance in standard errors


# ----- raw draws ------------------------------------------------------------------------------


def test_uniform_moments_and_range():
    u = rng.uniform(123, torch.arange(N))
    assert u.dtype == torch.float64 and u.shape == (N,)
    assert (u > 0).all() and (u < 1).all()
    # mean 1/2 with SE sqrt(1/12 / N); variance 1/12 with SE sqrt((1/80 - 1/144) / N)
    assert abs(u.mean().item() - 0.5) < Z * math.sqrt(1 / 12 / N)
    assert abs(u.var().item() - 1 / 12) < Z * math.sqrt((1 / 80 - 1 / 144) / N)
    # a histogram over 10 equal bins: each count is Binomial(N, 0.1)
    counts = torch.histc(u.float(), bins=10, min=0, max=1)
    assert (counts - N / 10).abs().max() < Z * math.sqrt(N * 0.1 * 0.9)


def test_normal_moments():
    z = rng.normal(7, torch.arange(N))
    assert z.dtype == torch.float64 and torch.isfinite(z).all()
    assert abs(z.mean().item()) < Z / math.sqrt(N)
    assert abs(z.var().item() - 1) < Z * math.sqrt(2 / N)
    # fourth moment 3 (Gaussian kurtosis), SE sqrt((105 - 9) / N)
    assert abs(z.pow(4).mean().item() - 3) < Z * math.sqrt(96 / N)
    # P(|z| < 1) = 0.6827
    p = (z.abs() < 1).double().mean().item()
    assert abs(p - 0.682689) < Z * math.sqrt(0.6827 * 0.3173 / N)


def test_draws_are_pure_functions_of_seed_and_counters():
    a = rng.uniform(5, 3, torch.arange(100))
    assert torch.equal(a, rng.uniform(5, 3, torch.arange(100)))
    assert not torch.equal(a, rng.uniform(6, 3, torch.arange(100)))
    assert not torch.equal(a, rng.uniform(5, 4, torch.arange(100)))
    # element i only depends on its own counters, not on the tensor it came in
    assert_close(rng.uniform(5, 3, torch.arange(40, 60)), a[40:60], rtol=0, atol=0)
    assert rng.uniform(5, 3, 17).item() == a[17].item()


def test_counters_broadcast():
    grid = rng.uniform(1, torch.arange(4)[:, None], torch.arange(6)[None, :])
    assert grid.shape == (4, 6)
    assert grid[2, 5].item() == rng.uniform(1, 2, 5).item()
    assert grid.unique().numel() == 24


def test_hash_is_not_symmetric_in_counter_order():
    a = rng.hash_counters(0, torch.arange(1000), 3)
    b = rng.hash_counters(0, 3, torch.arange(1000))
    assert (a != b).float().mean() > 0.99


def test_permutation_keys_give_uniform_permutations():
    """Position of element 0 after argsort is uniform over 0..n-1 across counters."""
    n, trials = 5, 20_000
    keys = rng.permutation_keys(9, torch.arange(trials)[:, None], torch.arange(n)[None, :])
    first = torch.argsort(keys, dim=1)[:, 0]
    counts = torch.bincount(first, minlength=n).double()
    assert (counts - trials / n).abs().max() < Z * math.sqrt(trials * (1 / n) * (1 - 1 / n))


# ----- streams --------------------------------------------------------------------------------


def test_stream_children_are_independent_and_reproducible():
    s = Stream(42)
    a = s.child("cohort").uniform(torch.arange(N))
    b = s.child("batches").uniform(torch.arange(N))
    assert torch.equal(a, Stream(42).child("cohort").uniform(torch.arange(N)))
    assert (a != b).all()
    corr = torch.corrcoef(torch.stack([a, b]))[0, 1].item()
    assert abs(corr) < Z / math.sqrt(N)
    # a child differs from its parent and from the same child of another seed
    assert not torch.equal(a, s.uniform(torch.arange(N)))
    assert not torch.equal(a, Stream(43).child("cohort").uniform(torch.arange(N)))
    # nested children and integer tags
    assert not torch.equal(s.child("a").child("b").keys(0), s.child("b").child("a").keys(0))
    assert not torch.equal(s.child(0).keys(torch.arange(10)), s.child(1).keys(torch.arange(10)))


def test_stream_normal_matches_module_function_with_path():
    s = Stream(3).child("x")
    assert torch.equal(s.normal(1, torch.arange(10)), rng.normal(3, *s.path, 1, torch.arange(10)))


def test_stream_generator_is_seeded_and_leaves_global_state():
    before = torch.get_rng_state()
    g1 = Stream(1).child("init").generator(0)
    g2 = Stream(1).child("init").generator(0)
    g3 = Stream(1).child("init").generator(1)
    a = torch.rand(5, generator=g1)
    assert torch.equal(a, torch.rand(5, generator=g2))
    assert not torch.equal(a, torch.rand(5, generator=g3))
    assert torch.equal(before, torch.get_rng_state())


# ----- cohort sampling and batches --------------------------------------------------------------


@pytest.fixture(scope="module")
def experiment():
    return Experiment(tiny_config("rounds=2", "data.num_clients=20", "cohort.clients_per_round=5"))


def test_cohort_without_replacement_and_of_configured_size(experiment):
    n, k = 20, 5
    cohorts = [experiment.sample_cohort(r) for r in range(400)]
    for c in cohorts:
        assert c.shape == (k,)
        assert c.unique().numel() == k  # without replacement
        assert (c >= 0).all() and (c < n).all()
        assert torch.equal(c, c.sort().values)
    assert torch.equal(experiment.sample_cohort(7), cohorts[7])  # pure in the round
    assert len({tuple(c.tolist()) for c in cohorts}) > 300  # C(20, 5) = 15504 cohorts
    # every client is picked with probability k/n per round
    counts = torch.bincount(torch.cat(cohorts), minlength=n).double()
    p = k / n
    assert (counts - 400 * p).abs().max() < Z * math.sqrt(400 * p * (1 - p))


def test_cohort_depends_on_seed():
    a = Experiment(tiny_config("seed=0"))
    b = Experiment(tiny_config("seed=1"))
    same = sum(torch.equal(a.sample_cohort(r), b.sample_cohort(r)) for r in range(20))
    assert same < 3


def test_client_batches_do_not_depend_on_the_cohort(experiment):
    ds, stream = experiment.dataset, experiment.stream.child("batches")
    steps, bs = 3, 8
    alone_x, alone_y = ds.sample_train_batches(torch.tensor([4]), stream, 2, steps, bs)
    for cohort in ([4, 0, 19], [1, 2, 3, 4, 5], [19, 4]):
        cohort = torch.tensor(cohort)
        xs, ys = ds.sample_train_batches(cohort, stream, 2, steps, bs)
        pos = int((cohort == 4).nonzero())
        assert torch.equal(xs[:, pos], alone_x[:, 0])
        assert torch.equal(ys[:, pos], alone_y[:, 0])
    # but they do depend on the round and on the client
    other_round, _ = ds.sample_train_batches(torch.tensor([4]), stream, 3, steps, bs)
    assert not torch.equal(other_round, alone_x)
    other_client, _ = ds.sample_train_batches(torch.tensor([5]), stream, 2, steps, bs)
    assert not torch.equal(other_client, alone_x)


@pytest.mark.parametrize("engine", ["sequential", "vectorized"])
def test_client_update_does_not_depend_on_the_cohort(monkeypatch, engine):
    """Client 3's trained personal model in round 0 is the same whoever trains beside it."""
    rows = []
    for cohort in ([3, 7, 11, 12, 19], [0, 1, 2, 3, 4]):
        exp = Experiment(tiny_config("algorithm.name=local", f"engine.name={engine}"))
        monkeypatch.setattr(exp, "sample_cohort", lambda r, c=cohort: torch.tensor(c))
        exp.run_round()
        rows.append(exp.store.gather(torch.tensor(3)))
        untouched = exp.store.gather(torch.tensor(10))["params"]
        assert_close(untouched, exp.population["global"], rtol=0, atol=0)
    exact = {"rtol": 0, "atol": 0} if engine == "sequential" else {}
    assert_close(rows[0], rows[1], **exact)
    moved = rows[0]["params"]["net.0.weight"] - exp.population["global"]["net.0.weight"]
    assert moved.abs().max() > 1e-4


# ----- reproducibility and global state ---------------------------------------------------------


def _records(seed: int, rounds: int = 2) -> list[dict]:
    exp = Experiment(tiny_config(f"seed={seed}", f"rounds={rounds}"))
    out = []
    for _ in range(rounds):
        out.append(exp.run_round())
    out.append(exp.evaluate())
    return drop_timings(out)


def test_same_seed_same_metrics_different_seed_different():
    a, b, c = _records(0), _records(0), _records(1)
    assert a == b
    assert a != c
    assert a[0]["train_loss"] != c[0]["train_loss"]


def test_experiment_does_not_touch_global_rng():
    torch.manual_seed(1234)
    np.random.seed(99)
    random.seed(7)
    t_state, np_state, py_state = torch.get_rng_state(), np.random.get_state(), random.getstate()
    exp = Experiment(tiny_config("algorithm.name=fedprox"))
    exp.run_round()
    exp.evaluate()
    assert torch.equal(torch.get_rng_state(), t_state)
    after = np.random.get_state()
    assert after[0] == np_state[0] and np.array_equal(after[1], np_state[1])
    assert after[2:] == np_state[2:]
    assert random.getstate() == py_state


def test_global_rng_does_not_change_results():
    torch.manual_seed(0)
    a = _records(3, rounds=1)
    torch.manual_seed(999)
    torch.rand(1000)
    assert _records(3, rounds=1) == a
