"""eval.new_client_train_samples: new (held-out) clients adapt on a capped, nested subset of
their training data; training clients, test splits and training itself are untouched."""

import pytest
import torch

from conftest import tiny
from fedkin.config import load_config
from fedkin.core.errors import ConfigError, DataError
from fedkin.core.tree import tree_leaves
from fedkin.experiment import Experiment

HOLDOUT = tiny("eval.holdout_clients=0.2", "cohort.clients_per_round=4", "rounds=2")


def experiment(*extra: str) -> Experiment:
    return Experiment(load_config(None, [*HOLDOUT, *extra]))


def rows(exp: Experiment, i: int) -> set[int]:
    return set(exp.dataset.train_index[i, : exp.dataset.train_sizes[i]].tolist())


def test_only_new_clients_are_capped_to_nested_subsets():
    full = experiment()
    caps = {k: experiment(f"eval.new_client_train_samples={k}") for k in (3, 6)}
    new = full.new_clients.tolist()
    assert len(new) == 4
    for exp in caps.values():
        assert torch.equal(exp.new_clients, full.new_clients)
        assert torch.equal(exp.dataset.test_index, full.dataset.test_index)
    for i in range(full.dataset.num_clients):
        if i in new:
            assert caps[3].dataset.train_sizes[i] == 3
            assert caps[6].dataset.train_sizes[i] == 6
            assert rows(caps[3], i) < rows(caps[6], i) < rows(full, i)
        else:
            assert rows(caps[3], i) == rows(full, i)
            assert torch.equal(
                caps[3].dataset.train_index[i, : full.dataset.train_sizes[i]],
                full.dataset.train_index[i, : full.dataset.train_sizes[i]],
            )


def test_training_is_unchanged_and_adaptation_sees_only_the_cap():
    ft = "algorithm.name=fedavg_ft"  # a new client's personal model is fine-tuned on its data
    full, capped = experiment(ft), experiment(ft, "eval.new_client_train_samples=2")
    for exp in (full, capped):
        for _ in range(2):
            exp.run_round()
    for a, b in zip(tree_leaves(full.population), tree_leaves(capped.population), strict=True):
        assert torch.equal(a, b)  # new clients never train: the cap cannot move training
    j = int(full.new_clients[0])
    adapted = [tree_leaves(e.personal_params(j)) for e in (full, capped)]
    assert any(not torch.equal(a, b) for a, b in zip(*adapted, strict=True))


def test_bad_values_name_the_key():
    with pytest.raises(ConfigError, match=r"eval\.new_client_train_samples needs new clients"):
        load_config(None, tiny("eval.new_client_train_samples=5"))
    with pytest.raises(ConfigError, match=r"eval\.new_client_train_samples"):
        load_config(None, [*HOLDOUT, "eval.new_client_train_samples=0"])
    with pytest.raises(DataError, match=r"eval\.new_client_train_samples: 5000 exceeds .* allowed"):
        experiment("eval.new_client_train_samples=5000")
