"""The hand-batched FedAvg local solve (MLP and CNN, plain SGD) gives the vmap path's numbers,
and only runs where it applies."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_config
from fedkin.algorithms.fedavg import FedAvg, FedAvgConfig
from fedkin.algorithms.fedprox import FedProx, FedProxConfig
from fedkin.engine import SequentialEngine, VectorizedEngine
from fedkin.engine.buckets import pad_args, unpad
from fedkin.engine.fastpath import fast_client_update
from fedkin.models import CnnConfig, LogRegConfig, MlpConfig, build_model
from fedkin.optim import adam, sgd
from fedkin.optim.configs import SgdConfig

IN_DIMS = (None, 0, 1, 0)


def _args(n: int, batches: int, feature_shape=(12,), classes: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    xs = torch.rand(batches, n, 6, *feature_shape, generator=g)
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
    assert fast.last_path == "fast:mlp"  # it did run
    ref = VectorizedEngine(fast_path=False).map(algorithm.client_update, args, IN_DIMS)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert out[0]["delta"]["net.0.weight"].abs().max() > 1e-3  # it trained


def _cnn(channels: list[int], image_shape=(1, 8, 8)) -> torch.nn.Module:
    return build_model(CnnConfig(channels=channels, hidden=8), (64,), image_shape, 5, seed=1)


@pytest.mark.parametrize(
    ("channels", "image_shape", "feature_shape"),
    [([3, 4], (1, 8, 8), (64,)), ([3], (2, 8, 8), (2, 8, 8))],  # flat and image-shaped inputs
)
def test_cnn_fast_path_matches_vmap(channels, image_shape, feature_shape):
    """Grouped convolutions over the cohort folded into channels, max-pooling and the
    fully connected head, with their backward written out, give vmap(grad)'s update."""
    algorithm = FedAvg(FedAvgConfig(), _cnn(channels, image_shape), sgd(0.3), 4)
    population = algorithm.init_population(algorithm.initial_params())
    client, data, ctx = _args(5, 3, feature_shape)
    args = (population, client, data, ctx)
    fast = VectorizedEngine()
    out = fast.map(algorithm.client_update, args, IN_DIMS)
    assert fast.last_path == "fast:cnn"
    vmapped = VectorizedEngine(fast_path=False)
    ref = vmapped.map(algorithm.client_update, args, IN_DIMS)
    assert vmapped.last_path == "vmap"
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for name, delta in out[0]["delta"].items():  # every layer trained, every client its own
        assert delta.abs().amax(tuple(range(1, delta.dim()))).min() > 1e-4, name
    assert not torch.allclose(
        out[0]["delta"]["features.0.weight"][0], out[0]["delta"]["features.0.weight"][1]
    )


def _quantized_images(clients: int, batches: int, batch: int):
    """sklearn's digits (17 grey levels, about half the pixels exactly 0) upscaled 2x to 1×16×16
    by repeating pixels, as ``[batches, clients, batch, 256]``: images whose convolutions have
    many exactly tied max-pool windows, unlike uniform random inputs."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images / 16.0).repeat_interleave(2, 1).repeat_interleave(2, 2)
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    idx = idx[: batches * clients * batch].reshape(batches, clients, batch)
    return x[idx].flatten(3), torch.tensor(digits.target)[idx]


def test_cnn_fast_path_matches_the_sequential_engine_in_float64_on_quantized_images():
    """In float64 the grouped-convolution solve gives the sequential engine's update to 1e-12
    over several steps on real (quantized) images, so the formula is exact; in float32 the two
    differ where rounding decides a max-pool near-tie (benchmarks/results/throughput.md)."""
    model = build_model(CnnConfig(channels=[4, 8], hidden=16), (256,), (1, 16, 16), 10, seed=1)
    algorithm = FedAvg(FedAvgConfig(), model, sgd(0.5), 4)
    params = {k: v.double() for k, v in algorithm.initial_params().items()}
    population = algorithm.init_population(params)
    xs, ys = _quantized_images(6, 4, 8)
    ctx = {"client_id": torch.arange(6), "round": torch.zeros(6, dtype=torch.long)}
    args = (population, {}, (xs, ys), ctx)
    fast = VectorizedEngine()
    out = fast.map(algorithm.client_update, args, IN_DIMS)
    assert fast.last_path == "fast:cnn"
    ref = SequentialEngine().map(algorithm.client_update, args, IN_DIMS)
    for name, delta in out[0]["delta"].items():
        assert delta.dtype == torch.float64, name  # the solve ran in float64
        torch.testing.assert_close(delta, ref[0]["delta"][name], rtol=0, atol=1e-12)
        assert delta.abs().amax(tuple(range(1, delta.dim()))).min() > 1e-3, name  # it trained
    torch.testing.assert_close(out[2], ref[2], rtol=0, atol=1e-12)


def test_cnn_fast_path_padded_clients_change_nothing():
    """The compiled engine pads cohorts with copies of client 0: the real clients' results of
    the grouped-convolution solve stay those of the unpadded cohort (and of vmap)."""
    algorithm = FedAvg(FedAvgConfig(), _cnn([3, 4]), sgd(0.3), 3)
    population = algorithm.init_population(algorithm.initial_params())
    client, data, ctx = _args(3, 2, (64,))
    args = (population, client, data, ctx)
    engine = VectorizedEngine()
    plain = engine.map(algorithm.client_update, args, IN_DIMS)
    padded = unpad(engine.map(algorithm.client_update, pad_args(args, IN_DIMS, 2), IN_DIMS), 3)
    assert engine.last_path == "fast:cnn"
    torch.testing.assert_close(padded, plain, rtol=0, atol=0)
    ref = VectorizedEngine(fast_path=False).map(algorithm.client_update, args, IN_DIMS)
    torch.testing.assert_close(padded, ref, rtol=1e-5, atol=1e-6)


def test_fast_path_applies_only_to_plain_sgd_fedavg_on_the_mlp_and_cnn():
    mlp = build_model(MlpConfig(hidden=[8]), (12,), None, 5, seed=0)
    cnn = _cnn([3])
    for model in (mlp, cnn):
        covered = FedAvg(FedAvgConfig(), model, sgd(0.1), 2)
        assert fast_client_update(covered.client_update, IN_DIMS) is not None
    covered = FedAvg(FedAvgConfig(), mlp, sgd(0.1), 2)
    odd_cnn = _cnn([3])
    odd_cnn.features[1] = torch.nn.Tanh()  # a layer the batched solve does not write out
    reflected = _cnn([3])
    reflected.features[0].padding_mode = "reflect"
    others = [
        FedAvg(FedAvgConfig(), mlp, sgd(0.1, momentum=0.9), 2),  # optimizer state
        FedAvg(FedAvgConfig(), mlp, sgd(0.1, weight_decay=0.1), 2),  # not θ − ηg
        FedAvg(FedAvgConfig(), mlp, SgdConfig(lr=0.1, clip_norm=1.0).build(), 2),  # clipped
        FedAvg(FedAvgConfig(), mlp, adam(0.1), 2),
        FedAvg(FedAvgConfig(), build_model(LogRegConfig(), (12,), None, 5, seed=0), sgd(0.1), 2),
        FedAvg(FedAvgConfig(), odd_cnn, sgd(0.1), 2),
        FedAvg(FedAvgConfig(), reflected, sgd(0.1), 2),
        FedAvg(FedAvgConfig(), cnn, sgd(0.1, momentum=0.9), 2),
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
