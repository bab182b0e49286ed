"""diffGrad and SGD-SaI against pytorch-optimizer 4.x (50 steps, 1e-5) and the official
SGD-SaI formulas; SWAN's GradNorm/GradWhitening against their closed forms; FRUGAL's split
against an explicit SVD computation; all vmap."""

from __future__ import annotations

import pytest
import torch
from torch.func import vmap
from torch.testing import assert_close

from fedkin.optim import DiffGradConfig, FrugalConfig, SgdSaiConfig, SwanConfig
from fedkin.optim.memlight import frugal_rank, grad_norm, grad_whitening
from fedkin.optim.optimizer import state_bytes_per_param

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


def test_swan_grad_norm_standardizes_rows():
    g = torch.randn(6, 9, generator=torch.Generator().manual_seed(3)) * 5 + 2
    out = grad_norm(g, eps=0.0)
    assert_close(out.mean(1), torch.zeros(6), atol=1e-6, rtol=0)
    assert_close(out.pow(2).mean(1), torch.ones(6))
    assert_close(out, (g - g.mean(1, keepdim=True)) / g.std(1, unbiased=False, keepdim=True))


@pytest.mark.parametrize("shape", [(4, 16), (16, 4)])
def test_swan_whitening_is_the_polar_factor_rescaled(shape):
    """(GGᵀ)^{-1/2}G = UVᵀ for G = UΣVᵀ of full rank, rescaled to ‖G‖_F."""
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    polar = u @ vh
    expected = polar * g.norm() / polar.norm()
    assert_close(grad_whitening(g, steps=40, eps=0.0), expected, rtol=1e-6, atol=1e-8)
    w = grad_whitening(g, steps=40, eps=0.0)
    small = w @ w.T if shape[0] < shape[1] else w.T @ w
    assert_close(small, torch.eye(min(shape), dtype=g.dtype) * small[0, 0])  # whitened


def test_swan_update_is_stateless_on_matrices_and_adam_elsewhere():
    params, grads = _params_and_grads(steps=3)
    cfg = SwanConfig(lr=0.01)
    opt = cfg.build()
    state = opt.init(params)
    new, _ = opt.step(grads[0], state, params)
    expected_w = params["w"] - 0.01 * grad_whitening(grad_norm(grads[0]["w"]), cfg.ns_steps)
    assert_close(new["w"], expected_w)
    # the bias takes AdamW's first step: −η_other·sign(g) (up to ε)
    assert_close(new["b"], params["b"] - cfg.other_lr * grads[0]["b"].sign(), rtol=0, atol=1e-7)
    # state: nothing for the 24 matrix entries, Adam's 2 moments for the 4 bias entries
    assert state_bytes_per_param(opt, params) == pytest.approx((8 * 4 + 4) / 28)


def _frugal_reference(params, grads, rho, period, kappa, lr, b1=0.9, b2=0.999, eps=1e-8):
    w = params["w"].clone()  # 6 × 4: m > n, so the projector acts from the right
    r = frugal_rank(tuple(w.shape), rho)
    for t, g in enumerate(grads):
        g = g["w"]
        if t % period == 0:
            p = torch.linalg.svd(g, full_matrices=False)[2][:r].T
            m, v, k = torch.zeros(6, r), torch.zeros(6, r), 0
        k += 1
        low = g @ p
        m = b1 * m + (1 - b1) * low
        v = b2 * v + (1 - b2) * low**2
        full = ((m / (1 - b1**k)) / ((v / (1 - b2**k)).sqrt() + eps)) @ p.T
        w = w - lr * (full + kappa * (g - low @ p.T).sign())
    return w


def test_frugal_follows_the_split_adam_plus_sign_update():
    params, grads = _params_and_grads(steps=12)
    cfg = FrugalConfig(lr=0.01, density=0.5, period=5, free_lr_ratio=0.3)
    got = _run(cfg.build(), params, grads)
    expected = _frugal_reference(params, grads, 0.5, 5, 0.3, 0.01)
    assert_close(got["w"], expected, rtol=1e-5, atol=1e-6)
    # all coordinates move (full-rank update) although Adam's state covers rank 2 of 4
    assert ((got["w"] - params["w"]).abs() > 0).all()
    opt = cfg.build()
    state = opt.init(params)
    frugal = state["matrix"]["0"]
    assert frugal["P"]["w"].shape == (4, 2) and frugal["m"]["w"].shape == (6, 2)


@pytest.mark.parametrize(
    "cfg",
    [
        DiffGradConfig(lr=0.01),
        SgdSaiConfig(lr=0.05),
        SwanConfig(lr=0.01),
        FrugalConfig(lr=0.01, density=0.5, period=2),
    ],
)
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
