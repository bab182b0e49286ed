"""diffGrad and SGD-SaI against pytorch-optimizer 4.x (50 steps, 1e-5) and the official
SGD-SaI formulas; both vmap."""

from __future__ import annotations

import pytest
import torch
from torch.func import vmap
from torch.testing import assert_close

from fedkin.optim import DiffGradConfig, SgdSaiConfig

pytorch_optimizer = pytest.importorskip("pytorch_optimizer")
STEPS = 50


def _params_and_grads(steps: int = STEPS, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    params = {"w": torch.randn(6, 4, generator=g), "b": torch.randn(4, generator=g)}
    grads = [
        {k: torch.randn(v.shape, generator=g) * (1 + t % 3) for k, v in params.items()}
        for t in range(steps)
    ]
    return params, grads


def _run(opt, params, grads):
    state = opt.init(params)
    for g in grads:
        params, state = opt.step(g, state, params)
    return params


def _run_torch(opt_cls, params, grads, **kwargs):
    tensors = {k: v.clone().requires_grad_() for k, v in params.items()}
    opt = opt_cls(list(tensors.values()), **kwargs)
    for g in grads:
        for k, t in tensors.items():
            t.grad = g[k].clone()
        opt.step()
    return {k: t.detach() for k, t in tensors.items()}


@pytest.mark.parametrize(("lr", "betas"), [(1e-3, (0.9, 0.999)), (0.02, (0.8, 0.99))])
def test_diffgrad_matches_pytorch_optimizer_for_50_steps(lr, betas):
    params, grads = _params_and_grads()
    expected = _run_torch(pytorch_optimizer.DiffGrad, params, grads, lr=lr, betas=betas)
    got = _run(DiffGradConfig(lr=lr, b1=betas[0], b2=betas[1]).build(), params, grads)
    assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (got["w"] - params["w"]).abs().max() > 5 * lr


def test_sgd_sai_matches_pytorch_optimizer_where_they_coincide():
    """One tensor, no momentum, no decay: the official scale gsnr/max = 1 and
    pytorch-optimizer's is gsnr, so its lr/gsnr₁ gives the same steps."""
    params, grads = _params_and_grads()
    params, grads = {"w": params["w"]}, [{"w": g["w"]} for g in grads]
    g1 = grads[0]["w"]
    gsnr = float(g1.norm() / (g1.std() + 1e-8))
    expected = _run_torch(
        pytorch_optimizer.SGDSaI, params, grads, lr=0.01 / gsnr, momentum=0.0, weight_decay=0.0
    )
    got = _run(SgdSaiConfig(lr=0.01, momentum=0.0, weight_decay=0.0).build(), params, grads)
    assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_sgd_sai_follows_the_official_update():
    params, grads = _params_and_grads(steps=20, seed=1)
    lr, mu, wd = 0.05, 0.9, 0.01
    got = _run(SgdSaiConfig(lr=lr, momentum=mu, weight_decay=wd).build(), params, grads)
    gsnr = {k: g.norm() / (g.std() + 1e-8) for k, g in grads[0].items()}
    gmax = max(gsnr.values())
    p = {k: v.clone() for k, v in params.items()}
    buf = {k: g.clone() for k, g in grads[0].items()}
    for t, g in enumerate(grads):
        for k in p:
            if t:
                buf[k] = mu * buf[k] + (1 - mu) * g[k]
            p[k] = p[k] * (1 - lr * wd) - lr * (gsnr[k] / gmax) * buf[k]
    assert_close(got, p, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cfg", [DiffGradConfig(lr=0.01), SgdSaiConfig(lr=0.05)])
def test_memory_light_optimizers_vmap(cfg):
    opt = cfg.build()
    gen = torch.Generator().manual_seed(2)
    params = {"w": torch.randn(3, 4, 2, generator=gen), "b": torch.randn(3, 2, generator=gen)}
    grads = [{k: torch.randn(v.shape, generator=gen) for k, v in params.items()} for _ in range(4)]
    batched = vmap(lambda p, gs: _run(opt, p, gs))(params, grads)
    for i in range(3):
        one = _run(
            opt,
            {k: v[i] for k, v in params.items()},
            [{k: v[i] for k, v in g.items()} for g in grads],
        )
        assert_close({k: v[i] for k, v in batched.items()}, one)
