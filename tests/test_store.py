"""Client-state stores (memory and memory-mapped disk), crash-safe resume, model groups and
held-out new-client evaluation."""

from __future__ import annotations

import pytest
import torch

from conftest import hand_personal_accuracy, tiny_config
from fedkin.core.store import DiskStore, MemoryStore
from fedkin.experiment import Experiment

TEMPLATE = {
    "params": {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2)},
    "step": torch.tensor(0),
}


def _rows(values: float, k: int) -> dict:
    return {
        "params": {"w": torch.full((k, 2, 3), values), "b": torch.full((k, 2), values)},
        "step": torch.full((k,), int(values)),
    }


@pytest.fixture(params=["memory", "disk"])
def store(request, tmp_path):
    if request.param == "memory":
        return MemoryStore(TEMPLATE, 50)
    return DiskStore(TEMPLATE, 50, tmp_path / "state")


def test_unwritten_rows_read_as_template_and_written_rows_persist(store):
    rows = torch.tensor([3, 7, 49])
    got = store.gather(rows)
    torch.testing.assert_close(got["params"]["w"], TEMPLATE["params"]["w"].expand(3, 2, 3))
    store.scatter(torch.tensor([7]), _rows(5.0, 1))
    got = store.gather(rows)
    assert got["params"]["w"][1].eq(5.0).all() and got["step"][1] == 5
    torch.testing.assert_close(got["params"]["b"][0], TEMPLATE["params"]["b"])


def test_scatter_keep_mask_leaves_rejected_rows_unchanged(store):
    rows = torch.tensor([1, 2])
    store.scatter(rows, _rows(3.0, 2), keep=torch.tensor([True, False]))
    got = store.gather(rows)
    assert got["params"]["w"][0].eq(3.0).all()
    torch.testing.assert_close(got["params"]["w"][1], TEMPLATE["params"]["w"])


def test_state_dict_round_trip(store, tmp_path):
    store.scatter(torch.tensor([4, 9]), _rows(2.0, 2))
    state = store.state_dict()
    store.commit(1)
    fresh = (
        MemoryStore(TEMPLATE, 50)
        if isinstance(store, MemoryStore) and not isinstance(store, DiskStore)
        else DiskStore(TEMPLATE, 50, store.path)
    )
    fresh.load_state_dict(state, 1)
    torch.testing.assert_close(fresh.gather(torch.arange(50)), store.gather(torch.arange(50)))


def test_disk_undo_log_restores_rows_written_after_the_checkpoint(tmp_path):
    path = tmp_path / "state"
    store = DiskStore(TEMPLATE, 10, path)
    store.scatter(torch.tensor([1, 2]), _rows(1.0, 2))
    checkpoint = store.state_dict()
    store.commit(5)  # the checkpoint of round 5 covers the writes above
    store.scatter(torch.tensor([2, 3]), _rows(9.0, 2))  # round 6 writes, then a crash
    store.scatter(torch.tensor([2]), _rows(8.0, 1))
    reopened = DiskStore(TEMPLATE, 10, path)
    reopened.load_state_dict(checkpoint, 5)
    got = reopened.gather(torch.tensor([1, 2, 3]))
    assert got["params"]["w"][0].eq(1.0).all() and got["params"]["w"][1].eq(1.0).all()
    torch.testing.assert_close(got["params"]["w"][2], TEMPLATE["params"]["w"])


def test_disk_undo_log_is_ignored_when_the_newer_checkpoint_was_saved(tmp_path):
    """Crash between writing checkpoint r+1 and dropping the undo log of round r+1."""
    path = tmp_path / "state"
    store = DiskStore(TEMPLATE, 10, path)
    store.commit(5)
    store.scatter(torch.tensor([4]), _rows(7.0, 1))
    checkpoint = store.state_dict()  # checkpoint of round 6 (commit not reached)
    reopened = DiskStore(TEMPLATE, 10, path)
    reopened.load_state_dict(checkpoint, 6)
    assert reopened.gather(torch.tensor([4]))["params"]["w"].eq(7.0).all()


@pytest.mark.parametrize("backend", ["memory", "disk"])
def test_resume_after_a_crash_mid_interval_matches_an_uninterrupted_run(backend, tmp_path):
    config = tiny_config("algorithm.name=local", "rounds=5", f"store.backend={backend}")
    (tmp_path / "a").mkdir()
    straight = Experiment(config, tmp_path / "a")
    for _ in range(5):
        straight.run_round()
    reference = straight.evaluate()

    run_dir = tmp_path / "b"
    run_dir.mkdir()
    crashed = Experiment(config, run_dir)
    for _ in range(2):
        crashed.run_round()
    crashed.save_checkpoint(run_dir)
    crashed.run_round()  # round 3 writes client state, then the process "dies"
    resumed = Experiment(config, run_dir)
    resumed.load_checkpoint(run_dir)
    assert resumed.round == 2
    for _ in range(3):
        resumed.run_round()
    got = resumed.evaluate()
    drop = {"eval_time_s"}
    assert {k: v for k, v in got.items() if k not in drop} == {
        k: v for k, v in reference.items() if k not in drop
    }


def test_unsampled_clients_keep_their_state():
    e = Experiment(tiny_config("algorithm.name=local", "rounds=2"))
    e.run_round()
    before = e.store.gather(torch.arange(20))
    cohort = e.sample_cohort(1)
    e.run_round()
    after = e.store.gather(torch.arange(20))
    untouched = torch.ones(20, dtype=torch.bool)
    untouched[cohort] = False
    for key in before["params"]:
        torch.testing.assert_close(
            after["params"][key][untouched], before["params"][key][untouched]
        )
        assert not torch.equal(after["params"][key][cohort], before["params"][key][cohort])


def test_model_groups_train_each_architecture_and_reject_unsupported_algorithms():
    groups = (
        "client_models=[{model: {name: mlp, hidden: [8]}, fraction: 0.5},"
        " {model: {name: logreg}, fraction: 0.5}]"
    )
    e = Experiment(tiny_config("algorithm.name=local", groups))
    assert [len(g.members) for g in e.groups] == [10, 10]
    assert set(e.groups[0].store.template["params"].keys()) != set(
        e.groups[1].store.template["params"].keys()
    )
    e.run_round()
    record = e.evaluate()
    assert record["personal_acc_mean"] == pytest.approx(hand_personal_accuracy(e), abs=1e-12)
    from fedkin.core.errors import ConfigError

    with pytest.raises(ConfigError, match="client_models works with: local"):
        tiny_config("algorithm.name=fedavg", groups)


def test_held_out_clients_never_train_and_are_reported_as_new():
    e = Experiment(tiny_config("eval.holdout_clients=0.25", "cohort.clients_per_round=15"))
    assert len(e.new_clients) == 5
    for r in range(3):
        assert not torch.isin(e.sample_cohort(r), e.new_clients).any()
        e.run_round()
    record = e.evaluate()
    assert {"new_acc_mean", "new_acc_p10", "personal_acc_mean"} <= set(record)
    assert len(e.client_accuracy["new"]) == 5 and len(e.client_accuracy["personal"]) == 15


def test_new_clients_of_local_are_adapted_from_a_fresh_state():
    """Local's new clients train one round from the initial model: their accuracy differs
    from the untrained initial model's."""
    e = Experiment(
        tiny_config(
            "algorithm.name=local",
            "eval.holdout_clients=0.25",
            "cohort.clients_per_round=15",
            "client.local_steps=20",
            "client.optimizer.lr=0.3",
        )
    )
    untrained = Experiment(
        tiny_config(
            "algorithm.name=local", "eval.holdout_clients=0.25", "cohort.clients_per_round=15"
        )
    )
    new = e.new_clients
    adapted_store, ids = e._new_client_states(e.groups[0])
    assert torch.equal(ids, new)
    adapted = adapted_store.gather(torch.arange(len(new)))["params"]
    initial = untrained.store.gather(new)["params"]
    assert any(not torch.allclose(adapted[k], initial[k]) for k in adapted)
