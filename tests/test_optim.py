"""Functional optimizers match torch.optim on the same parameters and gradients, and vmap."""

from __future__ import annotations

import pytest
import torch
from torch.func import vmap
from torch.testing import assert_close

from fedkin.core.tree import tree_map
from fedkin.optim import AdamConfig, SgdConfig, adam, sgd


def _params_and_grads(steps: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    params = {
        "w": torch.randn(4, 3, generator=g),
        "inner": {"b": torch.randn(3, generator=g)},
    }
    grads = [
        {"w": torch.randn(4, 3, generator=g), "inner": {"b": torch.randn(3, generator=g)}}
        for _ in range(steps)
    ]
    return params, grads


def _run_torch(opt_cls, params, grads, **kwargs):
    tensors = [params["w"].clone().requires_grad_(), params["inner"]["b"].clone().requires_grad_()]
    opt = opt_cls(tensors, **kwargs)
    for g in grads:
        tensors[0].grad = g["w"].clone()
        tensors[1].grad = g["inner"]["b"].clone()
        opt.step()
    return {"w": tensors[0].detach(), "inner": {"b": tensors[1].detach()}}


def _run_functional(opt, params, grads):
    state = opt.init(params)
    for g in grads:
        params, state = opt.update(g, state, params)
    return params, state


@pytest.mark.parametrize(
    ("lr", "momentum", "weight_decay"),
    [(0.1, 0.0, 0.0), (0.05, 0.9, 0.0), (0.05, 0.0, 0.01), (0.03, 0.5, 0.1)],
)
def test_sgd_matches_torch(lr, momentum, weight_decay):
    params, grads = _params_and_grads(steps=7)
    expected = _run_torch(
        torch.optim.SGD, params, grads, lr=lr, momentum=momentum, weight_decay=weight_decay
    )
    got, _ = _run_functional(sgd(lr, momentum, weight_decay), params, grads)
    assert_close(got, expected)
    # the parameters actually moved (the test is not comparing two no-ops)
    assert (got["w"] - params["w"]).abs().max() > 1e-2


@pytest.mark.parametrize(
    ("lr", "b1", "b2", "eps"),
    [(1e-3, 0.9, 0.999, 1e-8), (0.05, 0.8, 0.99, 1e-6), (0.01, 0.0, 0.9, 1e-3)],
)
def test_adam_matches_torch(lr, b1, b2, eps):
    params, grads = _params_and_grads(steps=25, seed=1)
    expected = _run_torch(torch.optim.Adam, params, grads, lr=lr, betas=(b1, b2), eps=eps)
    got, state = _run_functional(adam(lr, b1, b2, eps), params, grads)
    assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert float(state["t"]) == 25
    assert (got["w"] - params["w"]).abs().max() > 5 * lr


def test_functional_optimizers_are_pure():
    params, grads = _params_and_grads(steps=1)
    before = tree_map(torch.clone, params)
    opt = adam(0.1)
    state = opt.init(params)
    state_before = tree_map(torch.clone, state["m"])
    new, _ = opt.update(grads[0], state, params)
    assert_close(params, before, rtol=0, atol=0)
    assert_close(state["m"], state_before, rtol=0, atol=0)
    assert not torch.equal(new["w"], params["w"])


@pytest.mark.parametrize("opt", [sgd(0.1, 0.9, 0.01), adam(0.01)], ids=["sgd", "adam"])
def test_optimizers_vmap_over_clients(opt):
    """One vmapped update over stacked client params equals a per-client loop."""
    g = torch.Generator().manual_seed(3)
    k = 4
    params = {"w": torch.randn(k, 5, generator=g), "b": torch.randn(k, 2, generator=g)}
    grads = [
        {"w": torch.randn(k, 5, generator=g), "b": torch.randn(k, 2, generator=g)} for _ in range(3)
    ]

    def run(p, gs):
        state = opt.init(p)
        for gr in gs:
            p, state = opt.update(gr, state, p)
        return p

    batched = vmap(run)(params, grads)
    for i in range(k):
        one = run(
            {n: t[i] for n, t in params.items()}, [{n: t[i] for n, t in gr.items()} for gr in grads]
        )
        assert_close({n: t[i] for n, t in batched.items()}, one)


def test_optimizer_configs_build_the_configured_optimizer():
    params, grads = _params_and_grads(steps=3)
    got, _ = _run_functional(SgdConfig(lr=0.2, momentum=0.5).build(), params, grads)
    expected = _run_torch(torch.optim.SGD, params, grads, lr=0.2, momentum=0.5)
    assert_close(got, expected)
    got, _ = _run_functional(AdamConfig(lr=0.02, b1=0.5).build(), params, grads)
    expected = _run_torch(torch.optim.Adam, params, grads, lr=0.02, betas=(0.5, 0.999))
    assert_close(got, expected, rtol=1e-5, atol=1e-6)
