"""The hand-batched FedAvg/MLP/SGD local solve gives the vmap path's numbers, and only runs
where it applies."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_config
from fedkin.algorithms.fedavg import FedAvg, FedAvgConfig
from fedkin.algorithms.fedprox import FedProx, FedProxConfig
from fedkin.engine import VectorizedEngine
from fedkin.engine.fastpath import fast_client_update
from fedkin.models import CnnConfig, MlpConfig, build_model
from fedkin.optim import adam, sgd
from fedkin.optim.configs import SgdConfig

IN_DIMS = (None, 0, 1, 0)


def _args(n: int, batches: int, feature_shape=(12,), classes: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(batches, n, 6, *feature_shape, generator=g)
    ys = torch.randint(0, classes, (batches, n, 6), generator=g)
    return {}, (xs, ys), {"client_id": torch.arange(n), "round": torch.zeros(n, dtype=torch.long)}


@pytest.mark.parametrize(
    ("hidden", "steps", "batches"), [([], 2, 2), ([16], 5, 2), ([16, 8], 3, 3)]
)
def test_fast_path_matches_vmap(hidden, steps, batches):
    model = build_model(MlpConfig(hidden=hidden), (12,), None, 5, seed=1)
    algorithm = FedAvg(FedAvgConfig(), model, sgd(0.3), steps)
    population = algorithm.init_population(algorithm.initial_params())
    client, data, ctx = _args(7, batches)  # steps > batches cycles through them
    args = (population, client, data, ctx)
    assert fast_client_update(algorithm.client_update, IN_DIMS) is not None
    fast = VectorizedEngine()
    out = fast.map(algorithm.client_update, args, IN_DIMS)
    assert fast._fast[(algorithm.client_update, IN_DIMS)] is not None  # it did run
    ref = VectorizedEngine(fast_path=False).map(algorithm.client_update, args, IN_DIMS)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert out[0]["delta"]["net.0.weight"].abs().max() > 1e-3  # it trained


def test_fast_path_applies_only_to_plain_sgd_fedavg_on_the_mlp():
    mlp = build_model(MlpConfig(hidden=[8]), (12,), None, 5, seed=0)
    cnn = build_model(CnnConfig(), (784,), (1, 28, 28), 10, seed=0)
    covered = FedAvg(FedAvgConfig(), mlp, sgd(0.1), 2)
    assert fast_client_update(covered.client_update, IN_DIMS) is not None
    others = [
        FedAvg(FedAvgConfig(), mlp, sgd(0.1, momentum=0.9), 2),  # optimizer state
        FedAvg(FedAvgConfig(), mlp, sgd(0.1, weight_decay=0.1), 2),  # not θ − ηg
        FedAvg(FedAvgConfig(), mlp, SgdConfig(lr=0.1, clip_norm=1.0).build(), 2),  # clipped
        FedAvg(FedAvgConfig(), mlp, adam(0.1), 2),
        FedAvg(FedAvgConfig(), cnn, sgd(0.1), 2),  # not the MLP
        FedProx(FedProxConfig(mu=0.1), mlp, sgd(0.1), 2),  # a prior term
    ]
    for algorithm in others:
        assert fast_client_update(algorithm.client_update, IN_DIMS) is None, algorithm
    assert fast_client_update(covered.population_update, IN_DIMS) is None
    assert fast_client_update(covered.client_update, (0, 0, 1, 0)) is None  # batched population


def test_fedavg_run_with_and_without_the_fast_path():
    from fedkin.experiment import Experiment

    losses, models = [], []
    for fast in ("true", "false"):
        exp = Experiment(tiny_config(f"engine.fast_path={fast}"))
        losses.append([exp.run_round()["train_loss"] for _ in range(3)])
        models.append(exp.population["global"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    torch.testing.assert_close(models[0], models[1], rtol=1e-5, atol=1e-6)
