"""The Ray backend: same numbers as the in-process engine, worker failures, resume, missing extra.

One small local Ray instance (2 CPUs, 2 workers) serves the whole module; the worker pool is
shared by every experiment, so actors start once. Worker deaths are injected with a wrapper
around ``client_update`` that calls ``os._exit`` in whichever worker runs it first (a marker
file created with O_EXCL makes that happen exactly once).
"""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch

from conftest import drop_timings, registered_algorithms, tiny, tiny_config, tiny_for
from fedkin.config import load_config
from fedkin.core.errors import ConfigError
from fedkin.experiment import Experiment

RAY = ("backend.name=ray", "backend.workers=2")
SMALL = ("algorithm.name=ditto", "cohort.clients_per_round=8", "rounds=2")


@pytest.fixture(scope="module")
def ray_instance():
    ray = pytest.importorskip("ray")
    from fedkin.backends import ray_backend

    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    # the failure-injecting wrapper below must travel by value (workers cannot import tests/)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield ray
    ray_backend.shutdown()
    ray.shutdown()


class DieOnce:
    """``fn``, except that the first call anywhere (decided by creating ``marker``) kills the
    worker process running it — i.e. exactly one shard's worker dies, once."""

    def __init__(self, fn, marker: str) -> None:
        self.fn, self.marker = fn, marker

    def __call__(self, *args):
        try:
            os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return self.fn(*args)
        os._exit(17)


class NanFor:
    """``fn`` with the outputs of clients ``ids`` replaced by NaN (an in-process stand-in for
    clients dropped with a dead worker)."""

    def __init__(self, fn, ids: torch.Tensor) -> None:
        self.fn, self.ids = fn, ids

    def __call__(self, population, client, batches, ctx):
        out = self.fn(population, client, batches, ctx)
        lost = (ctx["client_id"] == self.ids).any()

        def nan(t):
            return torch.where(lost, torch.full_like(t, math.nan), t)

        def tree(x):
            return {k: tree(v) for k, v in x.items()} if isinstance(x, dict) else nan(x)

        return tuple(tree(part) for part in out)


def run(experiment: Experiment, rounds: int) -> list[dict]:
    records = []
    for _ in range(rounds):
        records.append(experiment.run_round())
    records.append(experiment.evaluate())
    return drop_timings(records)


def assert_same_state(a: Experiment, b: Experiment) -> None:
    torch.testing.assert_close(a.population, b.population)
    everyone = torch.arange(a.dataset.num_clients)
    torch.testing.assert_close(a.store.gather(everyone), b.store.gather(everyone))
    assert torch.equal(a.store.initialized, b.store.initialized)


def assert_records_close(got: list[dict], want: list[dict]) -> None:
    assert [r.keys() for r in got] == [r.keys() for r in want]
    for g, w in zip(got, want, strict=True):
        numbers = [k for k, v in w.items() if isinstance(v, float)]
        assert {k: g[k] for k in numbers} == pytest.approx(
            {k: w[k] for k in numbers}, rel=1e-5, abs=1e-6, nan_ok=True
        )
        assert {k: v for k, v in g.items() if k not in numbers} == {
            k: v for k, v in w.items() if k not in numbers
        }


@pytest.fixture(scope="module")
def local_reference():
    e = Experiment(tiny_config(*SMALL))
    return e, run(e, 2)


# ----- equality with the in-process backend ---------------------------------------------------


def test_ray_equals_local_for_a_stateful_algorithm(ray_instance, local_reference):
    local, want = local_reference
    e = Experiment(tiny_config(*SMALL, *RAY))
    got = run(e, 2)
    assert_records_close(got, want)
    assert all(r["dropped_clients"] == 0 for r in got if r["kind"] == "train")
    assert_same_state(e, local)
    assert e.engine.workers == 2 and len(set(e.engine.worker_pids())) == 2


def ray_and_local(*overrides: str):
    """(the Ray experiment, the in-process one, its records) after 2 rounds of the small config
    with ``overrides``, asserting equal records and client states."""
    local = Experiment(tiny_config(*SMALL, *overrides))
    want = run(local, 2)
    e = Experiment(tiny_config(*SMALL, *overrides, *RAY))
    assert_records_close(run(e, 2), want)
    assert_same_state(e, local)
    return e, local, want


def test_robust_compressed_attacked_run_on_ray_equals_local(ray_instance):
    """The channel (attack, top-k with error feedback, trimmed mean) runs on the server side of
    the shared round, so a Ray run matches the in-process one."""
    channel = (
        "channel.aggregator.name=trimmed_mean",
        "channel.aggregator.f=1",
        "channel.compress.name=top_k",
        "channel.compress.density=0.1",
        "attack.name=sign_flip",
        "attack.fraction=0.2",
    )
    *_, want = ray_and_local(*channel)
    assert all(r["uplink_bytes"] > 0 for r in want if r["kind"] == "train")


def test_momentum_monna_run_on_ray_equals_local(ray_instance):
    """The clients' momenta (channel client-state store) and MoNNA under ALIE: same records,
    personal states and momenta on Ray as in-process."""
    channel = (
        "channel.aggregator.name=monna",
        "channel.aggregator.f=1",
        "channel.momentum.beta=0.8",
        "attack.name=alie",
        "attack.fraction=0.2",
    )
    e, local, _ = ray_and_local(*channel)
    everyone = torch.arange(e.dataset.num_clients)
    torch.testing.assert_close(
        e.channel_clients.gather(everyone), local.channel_clients.gather(everyone)
    )


@pytest.mark.parametrize("algorithm", registered_algorithms())
def test_every_algorithm_on_ray_equals_local(ray_instance, algorithm):
    """Training and evaluation (held-out clients and ``adapt`` included) through 2 workers."""
    overrides = tiny_for(algorithm, "rounds=2", "eval.holdout_clients=0.2")
    local = Experiment(load_config(None, overrides))
    on_ray = Experiment(load_config(None, [*overrides, *RAY]))
    assert_records_close(run(on_ray, 2), run(local, 2))
    torch.testing.assert_close(on_ray.population, local.population)


def test_the_client_function_is_shipped_once_per_experiment(ray_instance):
    from fedkin.backends import ray_backend

    e = Experiment(tiny_config(*SMALL, *RAY))
    run(e, 2)
    shipped = len(ray_backend._POOL.fns)
    run(e, 2)  # more rounds and evaluations: client_update and the eval closure are cached
    assert len(ray_backend._POOL.fns) == shipped


def test_shards_are_balanced_contiguous_and_cover_the_cohort():
    from fedkin.backends.ray_backend import shard_bounds

    for size, n in [(8, 2), (7, 3), (1000, 6), (5, 5)]:
        bounds = shard_bounds(size, n)
        lengths = [length for _, length in bounds]
        assert max(lengths) - min(lengths) <= 1 and sum(lengths) == size
        assert [s for s, _ in bounds] == [sum(lengths[:i]) for i in range(n)]


# ----- worker failures ----------------------------------------------------------------------


def inject_death(e: Experiment, marker) -> None:
    algorithm = e.groups[0].algorithm
    algorithm.client_update = DieOnce(algorithm.client_update, str(marker))


def test_retry_reruns_the_dead_workers_shard(ray_instance, local_reference, tmp_path):
    local, want = local_reference
    e = Experiment(tiny_config(*SMALL, *RAY, "backend.on_worker_failure=retry"))
    pids = set(e.engine.worker_pids())
    inject_death(e, tmp_path / "died")
    got = run(e, 2)
    assert (tmp_path / "died").exists()  # a worker really died ...
    assert len(pids & set(e.engine.worker_pids())) == 1  # ... and was replaced
    assert_records_close(got, want)  # ... and nothing was lost
    assert_same_state(e, local)


def test_drop_excludes_and_counts_the_lost_clients(ray_instance, tmp_path):
    e = Experiment(tiny_config(*SMALL, *RAY, "backend.on_worker_failure=drop"))
    inject_death(e, tmp_path / "died")
    cohort = e.sample_cohort(0)
    first = e.run_round()
    lost = cohort[~e.store.initialized[cohort]]  # their states were never written
    assert first["dropped_clients"] == len(lost) == 4  # one of two balanced shards of 8
    assert first["rejected_updates"] == 4 and first["accepted_updates"] == 4
    assert math.isfinite(first["train_loss"])  # the mean is over survivors only
    got = [drop_timings([first])[0], *run(e, 1)]

    # the same round in-process with those clients' outputs made NaN: identical everything
    ref = Experiment(tiny_config(*SMALL))
    algorithm = ref.groups[0].algorithm
    plain = algorithm.client_update
    algorithm.client_update = NanFor(plain, lost)
    want = drop_timings([ref.run_round()])
    algorithm.client_update = plain
    want += run(ref, 1)
    want[0]["dropped_clients"] = 4.0
    assert_records_close(got, want)
    assert got[1]["dropped_clients"] == 0  # the replacement worker serves the next round
    assert_same_state(e, ref)


# ----- client stores and checkpoints --------------------------------------------------------


def test_resume_under_ray_equals_an_uninterrupted_run(ray_instance, tmp_path):
    config = tiny_config(*SMALL, *RAY, "rounds=4", "store.backend=disk")
    (tmp_path / "a").mkdir()
    straight = Experiment(config, tmp_path / "a")
    want = run(straight, 4)

    run_dir = tmp_path / "b"
    run_dir.mkdir()
    crashed = Experiment(config, run_dir)
    for _ in range(2):
        crashed.run_round()
    crashed.save_checkpoint(run_dir)
    crashed.run_round()  # writes client state after the checkpoint, then "dies"
    resumed = Experiment(config, run_dir)
    resumed.load_checkpoint(run_dir)
    assert resumed.round == 2
    got = want[:2] + run(resumed, 2)
    assert_records_close(got, want)
    assert_same_state(resumed, straight)


# last: its replacement worker is still starting when the module's Ray instance stops
def test_retry_fails_the_round_after_max_retries(ray_instance, tmp_path):
    from fedkin.backends.ray_backend import WorkerLostError

    e = Experiment(tiny_config(*SMALL, *RAY, "backend.max_retries=0"))
    inject_death(e, tmp_path / "died")
    with pytest.raises(WorkerLostError, match="max_retries=0"):
        e.run_round()


# ----- the optional extra -------------------------------------------------------------------


def test_missing_ray_extra_is_a_one_line_config_error(monkeypatch, cli, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'fedkin\[ray\]'"):
        Experiment(tiny_config("backend.name=ray"))
    capsys.readouterr()
    code = cli(["run", *tiny("backend.name=ray"), "--out", str(tmp_path / "r"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.count("\n") == 0 and "fedkin[ray]" in err and "backend.name=ray" in err
