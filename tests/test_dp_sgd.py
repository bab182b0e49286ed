"""Example-level DP-SGD: Poisson batches, the clipped and noised gradient, ε against dp-accounting
for the sampling actually used, and distinct noise for every draw.

Reference ε values are computed here with dp-accounting directly (never through fedkin).
"""

from __future__ import annotations

import math

import dp_accounting as dpa
import numpy as np
import pytest
import torch
from dp_accounting import rdp

from conftest import drop_timings, tiny_config
from fedkin.core.errors import ConfigError
from fedkin.core.rng import Stream
from fedkin.core.tree import tree_leaves, tree_map
from fedkin.data.federated import FederatedDataset
from fedkin.experiment import Experiment
from fedkin.optim import OPTIMIZERS
from test_privacy_release import flower_identity  # noqa: F401 (a fixture)

SIGMA = 1.1
DP_SGD = ("privacy.dp_sgd.clip=0.5", f"privacy.dp_sgd.noise_multiplier={SIGMA}", "rounds=2")


# ----- Poisson batches ---------------------------------------------------------------------------


def _indexed_dataset(sizes: list[int]) -> FederatedDataset:
    """Clients with the given train sizes; sample i has the feature value i + 1 (0 = padding)."""
    total = 2 * sum(sizes)
    x = torch.arange(1, total + 1, dtype=torch.float32)[:, None]
    y = torch.zeros(total, dtype=torch.int64)
    starts = np.cumsum([0, *sizes])
    train = [np.arange(starts[i], starts[i + 1]) for i in range(len(sizes))]
    test = [sum(sizes) + t for t in train]
    return FederatedDataset.from_parts("indexed", x, y, 2, train, test)


def test_poisson_batches_take_each_example_independently_with_probability_q():
    """Every (round, step, example) is a Bernoulli(q_i) draw, q_i = min(1, B/n_i): inclusion
    frequencies per example, batch-size mean and variance, and independence across steps."""
    sizes, batch, steps, rounds = [5, 12, 40, 80], 8, 4, 300
    ds = _indexed_dataset(sizes)
    clients = torch.arange(len(sizes))
    stream = Stream(7).child("batches")
    taken = torch.zeros(rounds, steps, sum(sizes), dtype=torch.bool)
    for r in range(rounds):
        xs, ys, mask = ds.sample_poisson_batches(clients, stream, r, steps, batch)
        assert xs.shape[:3] == ys.shape == mask.shape and mask.shape[:2] == (steps, len(sizes))
        assert torch.all(xs[..., 0][~mask] == 0)
        ids = xs[..., 0].long() - 1  # the selected train samples, by global row
        for s in range(steps):
            for c in range(len(sizes)):
                rows = ids[s, c][mask[s, c]]
                lo, hi = sum(sizes[:c]), sum(sizes[: c + 1])
                assert torch.all((rows >= lo) & (rows < hi))  # only the client's own samples
                assert len(rows.unique()) == len(rows)  # each at most once per batch
                taken[r, s, rows] = True
    start = 0
    for n in sizes:
        q = min(1.0, batch / n)
        t = taken[:, :, start : start + n].double()
        start += n
        if q == 1:
            assert bool(t.all())  # B ≥ n: every example in every batch, once
            continue
        draws = rounds * steps
        z = (t.sum((0, 1)) - draws * q) / math.sqrt(draws * q * (1 - q))  # per example ~ N(0, 1)
        assert abs(float(z.mean())) < 4 / math.sqrt(n)
        assert float(z.abs().max()) < 4.5
        sizes_drawn = t.sum(2).reshape(-1)  # batch sizes ~ Binomial(n, q)
        assert float(sizes_drawn.mean()) == pytest.approx(n * q, abs=4 * math.sqrt(n * q / draws))
        assert float(sizes_drawn.var()) == pytest.approx(n * q * (1 - q), rel=0.15)
        # independence across consecutive steps of the same example
        a, b = t[:, :-1].reshape(-1), t[:, 1:].reshape(-1)
        corr = float(torch.corrcoef(torch.stack([a, b]))[0, 1])
        assert abs(corr) < 4 / math.sqrt(len(a))


def test_poisson_batches_depend_only_on_seed_round_and_client():
    ds = _indexed_dataset([5, 12, 40, 80])
    stream = Stream(3).child("batches")
    xs, _, mask = ds.sample_poisson_batches(torch.arange(4), stream, 2, 3, 8)
    xs2, _, mask2 = ds.sample_poisson_batches(torch.tensor([2]), stream, 2, 3, 8)
    for s in range(3):
        assert torch.equal(xs[s, 2][mask[s, 2]], xs2[s, 0][mask2[s, 0]])


# ----- the private gradient ----------------------------------------------------------------------


class _ZeroNoise:
    """Stands in for the DP-SGD noise stream: N(0, 1) draws replaced by zeros."""

    def normal(self, *counters):
        return torch.zeros(counters[-1].shape, dtype=torch.float64)


def _dp_sgd_algorithm(clip: float, noise: float, batch_size: int = 8):
    from fedkin.algorithms.fedavg import FedAvg, FedAvgConfig
    from fedkin.models import MlpConfig, build_model
    from fedkin.optim import sgd
    from fedkin.privacy.config import DpSgdConfig

    model = build_model(MlpConfig(hidden=[16]), (64,), None, 10, seed=0).requires_grad_(False)
    alg = FedAvg(FedAvgConfig(), model, sgd(0.1), 2)
    alg.enable_dp_sgd(DpSgdConfig(clip=clip, noise_multiplier=noise), seed=3, batch_size=batch_size)
    return alg


def _ctx(n: float, round_: int = 0, client: int = 0) -> dict:
    return {
        "round": torch.tensor(round_),
        "client_id": torch.tensor(client),
        "num_samples": torch.tensor(n),
    }


def _private_grad(alg, params, x, y, mask, ctx, step: int = 0):
    """One DP-SGD step's gradient as the local solver forms it: per-example gradients through
    the solve's clip-and-noise transformation with step count t = ``step``."""
    per_example, loss = alg.per_example_grads(alg.plain_objective, params, x, y, mask)
    noised, state = alg.dp_aggregate(ctx, 0).update(
        per_example, {"count": torch.tensor(step)}, params
    )
    assert int(state["count"]) == step + 1
    return noised, loss


def _norm(tree) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tree_leaves(tree)))


def test_dp_sgd_clips_each_example_and_divides_by_the_expected_batch_size():
    clip = 0.5
    alg = _dp_sgd_algorithm(clip, 1.0, batch_size=8)
    alg.dp_stream = _ZeroNoise()
    params = alg.initial_params()
    gen = torch.Generator().manual_seed(0)
    x = (
        torch.randn(8, 64, generator=gen)
        * torch.tensor([0.01, 0.01, 1, 1, 10, 10, 100, 100])[:, None]
    )
    y = torch.randint(0, 10, (8,), generator=gen)
    one = torch.ones(1, dtype=torch.bool)
    raw = torch.func.grad(lambda p, xi, yi: alg.plain_objective(p, xi, yi)[0])
    singles = []
    for j in range(8):  # a client with one example: q = 1, expected batch size 1
        g, _ = _private_grad(alg, params, x[j : j + 1], y[j : j + 1], one, _ctx(1.0))
        raw_norm = _norm(raw(params, x[j : j + 1], y[j : j + 1]))
        assert _norm(g) == pytest.approx(min(clip, raw_norm), rel=1e-4)
        singles.append(g)
    assert sum(_norm(raw(params, x[j : j + 1], y[j : j + 1])) > clip for j in range(8)) >= 4
    # n = 100, B = 8: the sum of the clipped gradients of the batch's examples / 8, whatever
    # the realized batch size; masked slots contribute nothing
    mask = torch.tensor([True, False, True, True, False, False, True, False])
    got, _ = _private_grad(alg, params, x, y, mask, _ctx(100.0))
    want = tree_map(lambda *ts: torch.stack(ts)[mask].sum(0) / 8, *singles)
    for a, b in zip(tree_leaves(got), tree_leaves(want), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # n = 3 < B: q = 1 and the expected batch size is n
    got, _ = _private_grad(alg, params, x[:3], y[:3], mask[:3] | True, _ctx(3.0))
    want = tree_map(lambda *ts: torch.stack(ts[:3]).sum(0) / 3, *singles)
    for a, b in zip(tree_leaves(got), tree_leaves(want), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_dp_sgd_noise_std_is_sigma_c_over_expected_batch():
    clip, sigma, batch = 0.5, 1.3, 8
    noisy = _dp_sgd_algorithm(clip, sigma, batch)
    silent = _dp_sgd_algorithm(clip, sigma, batch)
    silent.dp_stream = _ZeroNoise()
    params = noisy.initial_params()
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(batch, 64, generator=gen), torch.randint(0, 10, (batch,), generator=gen)
    mask = torch.ones(batch, dtype=torch.bool)
    draws = []
    for step in range(10):
        ctx = _ctx(50.0, round_=4, client=7)
        a, _ = _private_grad(noisy, params, x, y, mask, ctx, step)
        b, _ = _private_grad(silent, params, x, y, mask, ctx, step)
        draws += [(u - v).reshape(-1) for u, v in zip(tree_leaves(a), tree_leaves(b), strict=True)]
    d = torch.cat(draws).double()
    se = 1 / math.sqrt(2 * len(d))
    assert float(d.std()) == pytest.approx(sigma * clip / batch, rel=5 * se)
    assert abs(float(d.mean())) < 5 * sigma * clip / batch / math.sqrt(len(d))


def test_dp_sgd_vectorized_and_sequential_engines_agree():
    results = {}
    for engine in ("vectorized", "sequential"):
        exp = Experiment(tiny_config(*DP_SGD, f"engine.name={engine}"))
        records = [exp.run_round(), exp.run_round(), exp.evaluate()]
        results[engine] = (drop_timings(records), tree_leaves(exp.population))
    (rec_v, pop_v), (rec_s, pop_s) = results["vectorized"], results["sequential"]
    assert rec_v == rec_s
    assert all(torch.equal(a, b) for a, b in zip(pop_v, pop_s, strict=True))
    assert rec_v[-1]["example_epsilon"] > 0


# ----- ε against dp-accounting -------------------------------------------------------------------


def _reference_epsilon(exp: Experiment, uses_per_batch: int) -> float:
    """The largest ε over clients, composed by dp-accounting's RDP accountant from the sampling
    the run used: for each training client, its p_i rounds × K batches, each Poisson-sampled
    with q_i = min(1, B/n_i) and used for ``uses_per_batch`` Gaussian releases (σ/√r)."""
    cfg = exp.config
    batch, steps = cfg.client.batch_size, cfg.client.local_steps
    best = 0.0
    for c in torch.nonzero(exp.participation).squeeze(1).tolist():
        q = min(1.0, batch / int(exp.dataset.train_sizes[c]))
        base = dpa.GaussianDpEvent(SIGMA / math.sqrt(uses_per_batch))
        event = base if q == 1 else dpa.PoissonSampledDpEvent(q, base)
        acc = rdp.RdpAccountant(neighboring_relation=dpa.NeighboringRelation.ADD_OR_REMOVE_ONE)
        acc.compose(event, int(exp.participation[c]) * steps)
        best = max(best, acc.get_epsilon(cfg.privacy.dp_sgd.delta))
    return best


@pytest.mark.parametrize(
    ("overrides", "uses_per_batch"),
    [
        (("algorithm.name=fedavg", "rounds=3"), 1),
        # Ditto's global and personal solves share each Poisson batch: two releases per batch
        (("algorithm.name=ditto", "rounds=3"), 2),
        # pFedMe's N inner steps reuse one batch per outer step
        (("algorithm.name=pfedme", "algorithm.inner_steps=3", "rounds=2"), 3),
        # B larger than every client's data: q = 1, no amplification (and no repeats)
        (("algorithm.name=fedavg", "client.batch_size=500", "rounds=2"), 1),
    ],
    ids=["fedavg", "ditto", "pfedme", "batch-exceeds-data"],
)
def test_example_epsilon_equals_dp_accounting_for_the_sampling_used(overrides, uses_per_batch):
    exp = Experiment(
        tiny_config(
            *DP_SGD, "data.partition.name=dirichlet", "data.partition.alpha=0.5", *overrides
        )
    )
    for _ in range(exp.config.rounds):
        exp.run_round()
    record = exp.evaluate()
    assert len(set(exp.dataset.train_sizes[exp.participation > 0].tolist())) > 3  # varied q_i
    assert record["example_epsilon"] == pytest.approx(
        _reference_epsilon(exp, uses_per_batch), rel=1e-9
    )


# ----- every noise draw has its own key ----------------------------------------------------------


def test_no_noise_key_repeats_across_training_adaptation_and_evaluation(monkeypatch):
    """Record the full counter tuple of every N(0, 1) element drawn by any stream (DP-SGD,
    central DP) over a short run with DP-SGD, evaluation-time fine-tuning (FedAvg-FT) and
    held-out clients; no key may be drawn twice. Every training client trains every round, so
    a solve keyed like the next round's training (the old ``adapt``) collides."""
    seen: list[torch.Tensor] = []
    original = Stream.normal

    def recording(self, *counters):
        full = torch.broadcast_tensors(
            *(torch.as_tensor(c, dtype=torch.int64) for c in (self.seed, *self.path, *counters))
        )
        seen.append(torch.stack([t.reshape(-1) for t in full], 1))
        return original(self, *counters)

    monkeypatch.setattr(Stream, "normal", recording)
    exp = Experiment(
        tiny_config(
            *DP_SGD,
            "algorithm.name=fedavg_ft",
            "algorithm.finetune_steps=3",
            "eval.holdout_clients=0.2",
            "cohort.clients_per_round=16",
            "cohort.weighting=uniform",
            "cohort.sampling=poisson",
            "privacy.mechanism=central",
            "privacy.noise_multiplier=1.0",
            "engine.name=sequential",
            "rounds=3",
        )
    )
    for _ in range(3):
        exp.run_round()
        exp.evaluate()
    width = max(k.shape[1] for k in seen)
    keys = torch.cat([torch.nn.functional.pad(k, (0, width - k.shape[1]), value=-1) for k in seen])
    lengths = torch.cat([torch.full((len(k),), k.shape[1]) for k in seen])
    keys = torch.cat([keys, lengths[:, None]], 1)
    assert len(keys) > 10_000
    unique = torch.unique(keys, dim=0)
    assert len(unique) == len(keys), f"{len(keys) - len(unique)} noise keys drawn twice"


class _RemoteEngine:
    """Runs each map on a cloudpickled copy of the function, as a Ray worker does: side effects
    on the caller's objects are lost."""

    def map(self, fn, args, in_dims):
        from fedkin.engine import SequentialEngine

        cloudpickle = pytest.importorskip("cloudpickle")  # installed with the ray extra
        return SequentialEngine().map(cloudpickle.loads(cloudpickle.dumps(fn)), args, in_dims)


def test_example_epsilon_does_not_depend_on_where_the_engine_runs():
    eps = []
    for remote in (False, True):
        exp = Experiment(tiny_config(*DP_SGD, "algorithm.name=ditto"))
        if remote:
            exp.engine = _RemoteEngine()
        exp.run_round()
        eps.append(exp.evaluate()["example_epsilon"])
    assert eps[0] > 0
    assert eps[1] == eps[0]


def test_a_clients_dp_sgd_update_does_not_depend_on_its_cohort():
    """A Flower node trains its client alone, so its Poisson batches are padded to its own
    largest batch instead of the cohort's: the update must be the same (padded slots add exact
    zeros; per-example gradients batched over a different width may differ by float
    reassociation, measured ≤ 2e-9)."""
    exp = Experiment(
        tiny_config(*DP_SGD, "data.partition.name=dirichlet", "data.partition.alpha=0.5")
    )

    def update(clients: torch.Tensor):
        ctx = {
            "client_id": clients,
            "num_samples": exp.dataset.train_sizes[clients].to(torch.float32),
            "round": torch.zeros_like(clients),
        }
        batches = exp.client_batches(clients, "batches", 0)
        args = (exp.population, exp.store.gather(clients), batches, ctx)
        message, _, _ = exp.engine.map(exp.algorithm.client_update, args, (None, 0, 1, 0))
        return tree_leaves(message), batches[0].shape[2]

    cohort = torch.tensor([0, 3, 5, 8, 11])
    together, width = update(cohort)
    widths = set()
    for j in range(len(cohort)):
        alone, own_width = update(cohort[j : j + 1])
        widths.add(own_width)
        for a, b in zip(together, alone, strict=True):
            torch.testing.assert_close(a[j], b[0], rtol=1e-6, atol=1e-8)
    assert min(widths) < width  # the padding really differed


# ----- the step count comes back as a metric -----------------------------------------------------


def first_cohort_metrics(exp: Experiment) -> tuple[torch.Tensor, dict]:
    """(round 0's cohort, the metrics its ``client_update`` returns through the engine)."""
    cohort = exp.sample_cohort(0)
    ctx = {
        "client_id": cohort,
        "num_samples": exp.dataset.train_sizes[cohort].to(torch.float32),
        "round": torch.zeros_like(cohort),
    }
    args = (exp.population, exp.store.gather(cohort), exp.client_batches(cohort, "batches", 0), ctx)
    _, _, metrics = exp.engine.map(exp.algorithm.client_update, args, (None, 0, 1, 0))
    return cohort, metrics


@pytest.mark.parametrize(
    ("overrides", "per_batch"),
    [
        (("algorithm.name=fedavg", "client.local_steps=3"), [1, 1, 1]),
        # the global solve uses each batch once, the personal one (5 steps) cycles through 3
        (("algorithm.name=ditto", "client.local_steps=3", "algorithm.personal_steps=5"), [3, 3, 2]),
        (("algorithm.name=pfedme", "client.local_steps=2", "algorithm.inner_steps=4"), [4, 4]),
    ],
    ids=["fedavg", "ditto", "pfedme"],
)
@pytest.mark.parametrize("engine", ["vectorized", "sequential"])
def test_client_update_returns_its_dp_sgd_steps_per_batch_as_a_metric(overrides, per_batch, engine):
    """``dp_steps`` ([K, S]) leaves ``client_update`` through the engine, every row equal to the
    count of clipped, noised gradients on each batch; the accountant's ledger is built from it
    and it never reaches a record (even with nothing withheld: privacy.mechanism=none)."""
    exp = Experiment(tiny_config(*DP_SGD, f"engine.name={engine}", *overrides))
    cohort, metrics = first_cohort_metrics(exp)
    want = torch.tensor(per_batch, dtype=torch.float32).expand(len(cohort), -1)
    assert torch.equal(metrics["dp_steps"], want)
    assert exp.dp_sgd_uses == []
    record = exp.run_round()
    assert "dp_steps" not in record and "train_loss" in record
    assert exp.dp_sgd_uses == sorted(per_batch)
    assert not hasattr(exp.algorithm, "dp_uses")


def test_without_dp_sgd_there_is_no_dp_steps_metric():
    exp = Experiment(tiny_config("rounds=1"))
    _, metrics = first_cohort_metrics(exp)
    assert set(metrics) == {"train_loss"}


def test_batch_uses_is_a_ledger_that_dominates_every_client():
    from fedkin.privacy.dp_sgd import batch_uses

    nan = float("nan")
    same = torch.tensor([[2.0, 1.0, 0.0], [2.0, 1.0, 0.0]])
    assert batch_uses(same) == [1, 2]  # unused batches dropped, sorted
    assert batch_uses(torch.tensor([[1.0, 3.0], [nan, nan]])) == [1, 3]  # a lost client skipped
    assert batch_uses(torch.tensor([[nan, nan]]), [2, 2]) == [2, 2]  # nothing new: as before
    # rows sorted decreasingly, then elementwise maximum with each other and the previous ledger
    assert batch_uses(torch.tensor([[1.0, 4.0], [2.0, 2.0]]), [1, 1, 1]) == [1, 2, 4]


#: every registered client optimizer that does not step on one gradient: SAM/ASAM, zeroth-order
NOT_ONE_GRADIENT = [
    n
    for n, c in OPTIMIZERS.items()
    if getattr(c, "sharpness_aware", False) or getattr(c, "zeroth_order", False)
]


@pytest.mark.parametrize("name", NOT_ONE_GRADIENT)
def test_dp_sgd_refuses_client_optimizers_that_do_not_step_on_one_gradient(name):
    """SAM/ASAM (a second, unclipped gradient at θ + ε) and zeroth-order optimizers (SPSA
    estimates, no per-example gradients) with DP-SGD: one line naming both keys."""
    with pytest.raises(ConfigError) as err:
        tiny_config(*DP_SGD, f"client.optimizer.name={name}")
    assert {"sam", "asam", "mezo"} <= set(NOT_ONE_GRADIENT)
    message = str(err.value)
    assert f"client.optimizer.name={name}" in message and "privacy.dp_sgd" in message
    assert "\n" not in message


# ----- what leaves under central DP with DP-SGD: in-process and through the Flower protocol -------


def test_dp_sgd_neighbours_release_the_same_and_flower_accounts_like_in_process(
    flower_identity,  # noqa: F811 (the imported fixture)
    tmp_path,
):
    """Central DP with DP-SGD (Ditto: two solves per batch) on the neighbouring datasets of
    ``test_privacy_release``: everything released is the same (the example-level ε included);
    through the Flower protocol a node sends its clipped update plus the data-independent
    ``dp_steps`` only, from which the server accounts the same example-level ε as in-process."""
    from test_privacy_release import (
        EVAL_KEYS,
        SUMMARY_KEYS,
        TRAIN_KEYS,
        assert_neighbours_release_the_same,
        assert_same_release,
        dp_config,
        neighbours,
        populations_differ,
        run_fake_flower,
        run_in_process,
        update_norm,
    )

    config = dp_config(
        "ditto", "central", "privacy.dp_sgd.clip=0.5", f"privacy.dp_sgd.noise_multiplier={SIGMA}"
    )
    dataset, neighbour, _ = neighbours(config)
    a = run_in_process(config, dataset, tmp_path / "a")
    b = run_in_process(config, neighbour, tmp_path / "b")
    assert_neighbours_release_the_same(a, b)
    assert populations_differ(a.population, b.population)
    for record in a.records:
        allowed = TRAIN_KEYS if record["kind"] == "train" else EVAL_KEYS | {"example_epsilon"}
        assert set(record) <= allowed, record
    assert set(a.summary) == SUMMARY_KEYS | {"example_epsilon"}
    assert a.summary["example_epsilon"] > 0
    if not flower_identity:
        pytest.skip("flwr is not installed: the Flower half is skipped")
    server_a, sent_a = run_fake_flower(config, dataset)
    server_b, sent_b = run_fake_flower(config, neighbour)
    assert [(t, c) for t, c, _ in sent_a] == [(t, c) for t, c, _ in sent_b]
    trained = 0
    for (kind, client, sa), (_, _, sb) in zip(sent_a, sent_b, strict=True):
        if kind != "train":
            continue
        trained += 1
        assert set(sa) == set(sb) == {"message", "metrics"}, (client, set(sa))
        assert set(sa["metrics"]) == {"dp_steps"}
        assert torch.equal(sa["metrics"]["dp_steps"], sb["metrics"]["dp_steps"])
        assert update_norm(sa["message"]) <= config.privacy.clip * (1 + 1e-6)
    assert trained > 0
    for ra, rb, rc in zip(a.records, server_a.records, server_b.records, strict=True):
        assert_same_release(ra, rb, "in-process vs flower")
        assert_same_release(rb, rc, "flower neighbours")
    assert server_a.summary["example_epsilon"] == a.summary["example_epsilon"]
