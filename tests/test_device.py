"""engine.device placement of what the stores, the data and the experiment create.

No GPU here: ``meta`` tensors (shapes and dtypes, no data) stand in for an accelerator where a
test checks placement without computing — a tensor made on the CPU instead of the configured
device shows up as ``cpu``, and mixing the two raises. Where numbers are compared, the device
is ``cpu``. :class:`DefaultDeviceFactories` catches tensors created from nothing (a factory
without a ``device``), which land on torch's default device whatever ``engine.device`` says.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.overrides import TorchFunctionMode

from conftest import drop_timings, tiny_config
from fedkin.core.rng import Stream
from fedkin.core.store import DiskStore, MemoryStore
from fedkin.core.tree import tree_leaves
from fedkin.data import build_dataset
from fedkin.experiment import Experiment

META = torch.device("meta")
_FACTORIES = {
    torch.empty,
    torch.empty_strided,
    torch.zeros,
    torch.ones,
    torch.full,
    torch.arange,
    torch.linspace,
    torch.logspace,
    torch.eye,
    torch.rand,
    torch.randn,
    torch.randint,
    torch.randperm,
    torch.tensor,
    torch.scalar_tensor,
    torch.as_tensor,
}
_TORCH_DIR = os.path.dirname(torch.__file__)

#: the modules whose tensors must follow engine.device (the channel runs on the host by design)
COVERED = (
    "fedkin/core/store.py",
    "fedkin/core/rng.py",
    "fedkin/core/evaluate.py",
    "fedkin/data/federated.py",
    "fedkin/engine/",
    "fedkin/algorithms/",
    "fedkin/optim/transform.py",
    "fedkin/optim/schedules.py",
    "fedkin/experiment.py",
    "fedkin/round.py",
)


class DefaultDeviceFactories(TorchFunctionMode):
    """Records ``file:line`` of every tensor factory called without a ``device`` (``as_tensor``
    of a tensor keeps that tensor's device and is not recorded)."""

    def __init__(self) -> None:
        super().__init__()
        self.sites: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        from_tensor = func is torch.as_tensor and isinstance(args[0], torch.Tensor)
        if func in _FACTORIES and kwargs.get("device") is None and not from_tensor:
            frame = sys._getframe(1)
            while frame is not None and frame.f_code.co_filename.startswith(_TORCH_DIR):
                frame = frame.f_back
            where = "?" if frame is None else frame.f_code.co_filename.replace(os.sep, "/")
            self.sites.append(f"{where}:{frame.f_lineno if frame else 0}")
        return func(*args, **kwargs)

    def covered(self) -> list[str]:
        return [s for s in self.sites if any(m in s for m in COVERED)]


def test_the_factory_watch_can_fail():
    made = torch.ones(2)
    with DefaultDeviceFactories() as watch:
        torch.zeros(2, device="cpu")
        torch.as_tensor(made)
        assert watch.sites == []
        torch.zeros(2)
        torch.as_tensor([1, 2])
    assert len(watch.sites) == 2 and all(__file__.replace(os.sep, "/") in s for s in watch.sites)


def _on_device(config, device: str):
    """``config`` with ``engine.device`` set past its validator (``meta`` is no real device)."""
    return config.model_copy(update={"engine": config.engine.model_copy(update={"device": device})})


class _Records:
    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def start(self, info: dict[str, Any]) -> None:
        pass

    def record(self, record: dict[str, Any]) -> None:
        self.records.append(record)

    def finish(self, summary: dict[str, Any]) -> None:
        pass


def _run(config, run_dir: Path) -> list[dict[str, Any]]:
    tracker = _Records()
    run_dir.mkdir()
    Experiment(config, run_dir).run(run_dir, [tracker])
    return drop_timings(tracker.records)


RUNS = {
    "fedavg": ("algorithm.name=fedavg",),
    "ditto": ("algorithm.name=ditto",),
    "dp-sgd": ("privacy.dp_sgd.clip=0.5", "privacy.dp_sgd.noise_multiplier=1.0"),
    "adam-cnn": ("client.optimizer.name=adam", "model.name=cnn", "model.hidden=16"),
}


@pytest.mark.parametrize("run", RUNS)
def test_cpu_device_run_equals_the_default_and_creates_nothing_on_the_default_device(tmp_path, run):
    """An ``engine.device=cpu`` run (through the placement code: data, models, stores,
    batches, evaluation, checkpoints) gives the default run's records; and while it runs, no
    covered module makes a tensor from nothing — one would land on torch's default device,
    not engine.device. (ditto keeps client state, so its stores and personal evaluation run;
    DP-SGD draws its noise inside the solve; Adam keeps a step counter.)"""
    args = (*RUNS[run], "rounds=2", "eval.every=1")
    expected = _run(tiny_config(*args), tmp_path / "default")
    with DefaultDeviceFactories() as watch:
        got = _run(tiny_config(*args, "engine.device=cpu"), tmp_path / "cpu")
    assert got == expected
    assert watch.covered() == []


def test_experiment_places_data_models_population_and_stores_on_its_device():
    """``engine.device`` flows from the config to everything a cohort trains on; sizes,
    cohorts and masks (host bookkeeping) stay on the CPU."""
    exp = Experiment(_on_device(tiny_config("algorithm.name=ditto"), "meta"))
    ds = exp.dataset
    assert {ds.x.device, ds.y.device, ds.train_index.device, ds.test_index.device} == {META}
    assert ds.train_sizes.device.type == "cpu" and exp.store.initialized.device.type == "cpu"
    assert {t.device for t in tree_leaves(exp.population)} == {META}
    for model in (exp.algorithm.model, exp.algorithm.global_model):
        assert {t.device for t in [*model.parameters(), *model.buffers()]} == {META}
    assert {t.device for t in exp.store.data.values(True, True)} == {META}

    cohort = exp.sample_cohort(0)
    xs, ys = exp.client_batches(cohort, "batches", 0)
    states = exp.store.gather(exp.groups[0].rows(cohort))
    assert {xs.device, ys.device, *(t.device for t in tree_leaves(states))} == {META}
    ctx = {"client_id": cohort, "num_samples": ds.train_sizes[cohort].float(), "round": cohort}
    ctx = {k: v.to(META) for k, v in ctx.items()}
    message, new_states, metrics = exp.engine.map(
        exp.algorithm.client_update, (exp.population, states, (xs, ys), ctx), (None, 0, 1, 0)
    )
    outs = tree_leaves(message) + tree_leaves(new_states) + tree_leaves(metrics)
    assert outs and {t.device for t in outs} == {META}


@pytest.mark.parametrize("backend", ["memory", "disk"])
def test_store_rows_live_on_its_device(tmp_path, backend):
    """Gathered rows — fresh (the template), written, or both — are on the store's device,
    and scatter takes rows from it; a disk store's map stays on the CPU."""
    template = {"w": torch.zeros(3, device=META), "opt": {"m": torch.zeros(2, 2, device=META)}}
    if backend == "memory":
        store = MemoryStore(template, 10)
        assert {t.device for t in store.data.values(True, True)} == {META}
    else:
        store = DiskStore(template, 10, tmp_path)
        assert {t.device.type for t in store.data.values(True, True)} == {"cpu"}
    assert store.device == META
    fresh = store.gather(torch.tensor([1, 4]))
    assert {t.device for t in tree_leaves(fresh)} == {META}
    # meta rows cannot be copied into a disk map (they hold no data): write CPU rows there
    where = META if backend == "memory" else torch.device("cpu")
    values = {"w": torch.ones(2, 3, device=where), "opt": {"m": torch.ones(2, 2, 2, device=where)}}
    store.scatter(torch.tensor([1, 4]), values, keep=torch.tensor([True, False]))
    assert store.initialized.nonzero().flatten().tolist() == [1]
    for rows in ([1], [1, 4]):  # written only; written and fresh
        out = store.gather(torch.tensor(rows))
        assert {t.device for t in tree_leaves(out)} == {META}
        assert out["opt"]["m"].shape == (len(rows), 2, 2)


def test_batches_are_drawn_and_gathered_on_the_data_device():
    """With the dataset on a device, a cohort's batches (and the counter-based keys that pick
    them) are made there, with the CPU shapes."""
    ds = build_dataset(tiny_config().data, 0)
    on = ds.to(META)
    assert on.train_sizes.device.type == "cpu"
    clients = torch.tensor([0, 3, 7])
    for ids in (clients, clients.tolist()):  # (meta ids hold no values to look sizes up)
        got = on.sample_train_batches(ids, Stream(1), 2, 3, 4)
        want = ds.sample_train_batches(clients, Stream(1), 2, 3, 4)
        assert [t.device for t in got] == [META, META]
        assert [t.shape for t in got] == [t.shape for t in want]
        for split in (on.test_batches, on.train_batches):
            assert {t.device for t in split(ids)} == {META}


def test_host_side_data_paths_create_nothing_on_the_default_device():
    """Store and data paths (incl. Poisson batches, whose width depends on the draws and so
    cannot run on meta) create no tensor from nothing, and give the same numbers inside the
    watch as outside it."""
    ds = build_dataset(tiny_config().data, 0)
    clients = torch.tensor([0, 3, 7])

    def work():
        store = MemoryStore({"w": torch.zeros(3)}, 10)
        store.scatter(clients, {"w": torch.ones(3, 3)}, keep=torch.tensor([True, False, True]))
        return (
            *ds.sample_train_batches(clients, Stream(1), 2, 3, 4),
            *ds.sample_poisson_batches(clients, Stream(1), 2, 3, 4),
            *ds.test_batches(clients),
            ds.label_counts(),
            store.gather(torch.tensor([0, 1, 3]))["w"],
            Stream(2).child("x").normal(5, clients),
        )

    expected = work()
    with DefaultDeviceFactories() as watch:
        got = work()
    assert watch.covered() == []
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def test_rng_draws_land_on_the_counters_device_with_exact_keys_and_uniforms():
    """Keys are integer arithmetic and uniforms (k + 1/2) / 2^32 exact in float64, so both are
    the same bits on every device; a draw is made where its tensor counters are."""
    s = Stream(11).child("batches")
    c = torch.arange(6)
    assert {s.keys(3, c.to(META)).device, s.uniform(3, c.to(META)).device} == {META}
    assert s.normal(3, c.to(META)).device == META
    assert s.keys(3, 4).device.type == "cpu"
    keys = s.keys(3, c)
    assert torch.equal(s.uniform(3, c), (keys.to(torch.float64) + 0.5) / 2.0**32)
    assert torch.equal(s.keys(3, c.numpy()), keys) and torch.equal(s.keys(3, 2), keys[2])


def test_checkpoint_holds_cpu_tensors_and_loads_onto_the_configured_device(tmp_path):
    config = tiny_config("algorithm.name=ditto", "rounds=1")
    exp = Experiment(config, tmp_path)
    exp.run_round()
    exp.save_checkpoint(tmp_path)
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert {t.device.type for t in tree_leaves(saved["population"])} == {"cpu"}

    on_meta = Experiment(_on_device(config, "meta"), tmp_path)
    on_meta.load_checkpoint(tmp_path)
    assert on_meta.round == 1
    assert {t.device for t in tree_leaves(on_meta.population)} == {META}
    assert {t.device for t in on_meta.store.data.values(True, True)} == {META}
    assert torch.equal(on_meta.store.initialized, exp.store.initialized)
