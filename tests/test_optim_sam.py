"""SAM and ASAM as FedAvg's local solver: equal to pytorch-optimizer's SAM (two passes per step)
for 50 steps on the same model; vmapped over clients = one client at a time; wrong places
give one clear error."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import vmap
from torch.testing import assert_close

from conftest import tiny_config
from fedkin.algorithms.fedavg import FedAvg, FedAvgConfig
from fedkin.core.errors import ConfigError
from fedkin.optim import AsamConfig, SamConfig

pytorch_optimizer = pytest.importorskip("pytorch_optimizer")
STEPS = 50


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))


def _batches(clients: int | None = None):
    g = torch.Generator().manual_seed(1)
    lead = () if clients is None else (clients,)
    xs = torch.randn(*lead, STEPS, 16, 5, generator=g)
    ys = torch.randint(0, 3, (*lead, STEPS, 16), generator=g)
    return xs, ys


def _reference(model: nn.Module, xs, ys, adaptive: bool, **kwargs) -> dict:
    opt = pytorch_optimizer.SAM(
        model.parameters(), torch.optim.SGD, adaptive=adaptive, foreach=False, **kwargs
    )
    loss_fn = nn.CrossEntropyLoss()
    for x, y in zip(xs, ys, strict=True):
        loss_fn(model(x), y).backward()
        opt.first_step(zero_grad=True)
        loss_fn(model(x), y).backward()
        opt.second_step(zero_grad=True)
    return {k: v.detach() for k, v in model.named_parameters()}


def _fedkin(model: nn.Module, cfg, xs, ys) -> dict:
    alg = FedAvg(FedAvgConfig(), model, cfg.build(), local_steps=STEPS)
    params = alg.initial_params()
    new, *_ = alg.local_solve(params, alg.plain_objective, (xs, ys))
    return new


@pytest.mark.parametrize(
    ("cfg", "adaptive", "kwargs"),
    [
        (SamConfig(lr=0.1, momentum=0.9, rho=0.05), False, {"rho": 0.05, "momentum": 0.9}),
        (SamConfig(lr=0.05, rho=0.2, weight_decay=1e-3), False, {"rho": 0.2, "weight_decay": 1e-3}),
        (AsamConfig(lr=0.1, momentum=0.9, rho=0.5, eta=0.0), True, {"rho": 0.5, "momentum": 0.9}),
    ],
)
def test_sam_matches_pytorch_optimizer_for_50_steps(cfg, adaptive, kwargs):
    xs, ys = _batches()
    expected = _reference(_model(), xs, ys, adaptive, lr=cfg.lr, **kwargs)
    got = _fedkin(_model(), cfg, xs, ys)
    assert_close(got, expected, rtol=1e-5, atol=1e-5)
    plain = _fedkin(_model(), cfg.model_copy(update={"rho": 1e-12}), xs, ys)
    assert max((got[k] - plain[k]).abs().max() for k in got) > 1e-3  # the perturbation acts


def test_asam_eta_scales_the_ball():
    """ε = ρ·T²g/‖Tg‖ with T = |θ| + η: checked on one step against the formula."""
    cfg = AsamConfig(rho=0.5, eta=0.01)
    params = {"w": torch.tensor([[0.0, 2.0], [-1.0, 0.5]]), "b": torch.tensor([3.0, 0.0])}
    grads = {"w": torch.tensor([[1.0, -1.0], [2.0, 0.0]]), "b": torch.tensor([0.5, 1.0])}
    eps = cfg.build().perturbation(grads, params)
    t = {k: v.abs() + 0.01 for k, v in params.items()}
    norm = torch.sqrt(sum((t[k] * grads[k]).pow(2).sum() for k in t))
    assert_close(eps, {k: 0.5 * t[k] ** 2 * grads[k] / norm for k in t})


def test_sam_vmaps_over_clients():
    model = _model()
    alg = FedAvg(FedAvgConfig(), model, SamConfig(lr=0.1, momentum=0.9).build(), local_steps=5)
    xs, ys = _batches(clients=3)
    params = alg.initial_params()
    starts = {k: torch.stack([v + 0.1 * i for i in range(3)]) for k, v in params.items()}
    solve = lambda p, x, y: alg.local_solve(p, alg.plain_objective, (x, y))[0]  # noqa: E731
    batched = vmap(solve)(starts, xs, ys)
    for i in range(3):
        one = solve({k: v[i] for k, v in starts.items()}, xs[i], ys[i])
        assert_close({k: v[i] for k, v in batched.items()}, one, rtol=1e-5, atol=1e-6)


def test_sam_runs_as_fedavgs_client_optimizer_and_is_refused_elsewhere():
    from fedkin.experiment import Experiment

    exp = Experiment(tiny_config("client.optimizer.name=sam", "rounds=1"))
    before = {k: v.clone() for k, v in exp.population["global"].items()}
    exp.run_round()
    assert any(not torch.equal(before[k], v) for k, v in exp.population["global"].items())
    with pytest.raises(ConfigError, match=r"server\.optimizer\.name=sam"):
        tiny_config("server.optimizer.name=sam")
    with pytest.raises(ConfigError, match=r"client\.optimizer\.name=asam: algorithm\.name=apfl"):
        tiny_config("client.optimizer.name=asam", "algorithm.name=apfl")
