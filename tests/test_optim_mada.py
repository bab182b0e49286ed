"""AVGrad and MADA: pinned at a vertex MADA is that optimizer; its hyper-gradient is exact."""

from __future__ import annotations

import pytest
import torch
from torch.func import vmap
from torch.testing import assert_close

from fedkin.optim import AvgradConfig, MadaConfig
from fedkin.optim.mada import _direction, scale_by_mada

STEPS = 50
PINNED = (0.0,) * 6


def _params_and_grads(steps: int = STEPS, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    params = {"w": torch.randn(4, 3, generator=g), "inner": {"b": torch.randn(3, generator=g)}}
    grads = [
        {"w": torch.randn(4, 3, generator=g), "inner": {"b": torch.randn(3, generator=g)}}
        for _ in range(steps)
    ]
    return params, grads


def _run(opt, params, grads):
    state = opt.init(params)
    for g in grads:
        params, state = opt.step(g, state, params)
    return params, state


def _flat(tree):
    return torch.cat([tree["w"].flatten(), tree["inner"]["b"]])


def _reference(params, grads, lr, b1, b2, eps, kind):
    """Independent per-element loops: 'avgrad' (v̄ = mean of v₁…v_t) or 'yogi' (v ← v −
    (1−β₂)·sign(v − g²)·g², v₀ = 1e-15 as MADA's code)."""
    p = _flat(params).double()
    m = torch.zeros_like(p)
    v = torch.zeros_like(p) + (1e-15 if kind == "yogi" else 0.0)
    vs = []
    for t, g in enumerate(grads, start=1):
        g = _flat(g).double()
        m = b1 * m + (1 - b1) * g
        if kind == "yogi":
            v = v - (1 - b2) * torch.sign(v - g * g) * g * g
            second = v
        else:
            v = b2 * v + (1 - b2) * g * g
            vs.append(v)
            second = torch.stack(vs).mean(0)
        p = p - lr * (m / (1 - b1**t)) / ((second / (1 - b2**t)).sqrt() + eps)
    return p.float()


def test_avgrad_is_adam_with_the_time_averaged_second_moment():
    params, grads = _params_and_grads()
    got, _ = _run(AvgradConfig(lr=0.01, b2=0.99).build(), params, grads)
    expected = _reference(params, grads, 0.01, 0.9, 0.99, 1e-8, "avgrad")
    assert_close(_flat(got), expected, rtol=1e-5, atol=1e-5)
    adam, _ = _run(MadaConfig(lr=0.01, hyper_lr=PINNED).build(), params, grads)
    assert (_flat(adam) - expected).abs().max() > 1e-3  # averaging differs from Adam's v


def test_mada_pinned_at_the_adam_vertex_is_torch_adam():
    params, grads = _params_and_grads()
    got, state = _run(MadaConfig(lr=0.01, hyper_lr=PINNED).build(), params, grads)
    tensors = [params["w"].clone().requires_grad_(), params["inner"]["b"].clone().requires_grad_()]
    opt = torch.optim.Adam(tensors, lr=0.01, betas=(0.9, 0.99), eps=1e-6)
    for g in grads:
        tensors[0].grad, tensors[1].grad = g["w"].clone(), g["inner"]["b"].clone()
        opt.step()
    assert_close(
        _flat(got), torch.cat([tensors[0].flatten(), tensors[1]]).detach(), rtol=1e-5, atol=1e-5
    )
    assert_close(state["0"]["lam"], torch.tensor([0.9, 0.99, 0.0, 1.0, 1.0, 1.0]))


@pytest.mark.parametrize("kind", ["avgrad", "yogi"])
def test_mada_pinned_at_the_avgrad_and_yogi_vertices(kind):
    params, grads = _params_and_grads(seed=1)
    vertex = {"avgrad": {"rho": 0.0}, "yogi": {"c": 0.0}}[kind]
    got, _ = _run(MadaConfig(lr=0.01, hyper_lr=PINNED, **vertex).build(), params, grads)
    expected = _reference(params, grads, 0.01, 0.9, 0.99, 1e-6, kind)
    assert_close(_flat(got), expected, rtol=1e-5, atol=1e-5)


def test_mada_gamma_zero_is_a_sign_update():
    """γ = 0: d = sign(u_L), u_L = 0.95·m_L + 0.05·g, m_L ← 0.98·m_L + 0.02·g."""
    params, grads = _params_and_grads(steps=3)
    tx = scale_by_mada(0.01, gamma=0.0, hyper_lr=PINNED)
    state = tx.init(params)
    m_lion = torch.zeros(15)
    for g in grads:
        d, state = tx.update(g, state, params)
        m_lion = 0.98 * m_lion + 0.02 * _flat(g)
        assert torch.equal(_flat(d), torch.sign(0.95 * m_lion + 0.05 * _flat(g)))


def test_mada_hyper_gradient_matches_finite_differences():
    """∂d_t/∂λ (v̄ held fixed, as the code) by central differences at t = 2, then
    λ₃ = clamp(λ₂ + η·α⟨g₃, ∂d₂/∂λ⟩)."""
    params, grads = _params_and_grads(steps=3, seed=2)
    lam0 = dict(beta1=0.8, beta2=0.9, beta3=0.3, rho=0.5, c=0.5, gamma=0.7)
    eta, alpha = (1e-3,) * 6, 0.1
    tx = scale_by_mada(alpha, **lam0, hyper_lr=eta)
    _, s1 = tx.update(grads[0], tx.init(params), params)
    _, s2 = tx.update(grads[1], s1, params)
    lam = s2["lam"].double()
    t = torch.tensor(2.0, dtype=torch.float64)
    leaves = [lambda tr: tr["w"], lambda tr: tr["inner"]["b"]]
    for get in leaves:
        old = {k: get(s1[k]).double() for k in ("m", "v", "vbar", "n", "g", "m_lion")}
        g = get(grads[1]).double()
        vbar = get(s2["vbar"]).double()
        for i in range(6):
            e = torch.zeros(6, dtype=torch.float64)
            e[i] = 1e-6
            dp = _direction(lam + e, t, g, old, 1e-6, vbar)[0]
            dm = _direction(lam - e, t, g, old, 1e-6, vbar)[0]
            assert_close(get(s2["jac"])[..., i].double(), (dp - dm) / 2e-6, rtol=1e-3, atol=1e-4)
    _, s3 = tx.update(grads[2], s2, params)
    jac = torch.cat([s2["jac"]["w"].reshape(-1, 6), s2["jac"]["inner"]["b"]])
    assert_close(s3["lam"], s2["lam"] + 1e-3 * alpha * (_flat(grads[2]) @ jac))
    assert (s3["lam"] - s2["lam"]).abs().max() > 1e-6  # the coefficients moved


def test_mada_vmaps_over_clients_with_personal_coefficients():
    opt = MadaConfig(lr=0.01, beta3=0.2, rho=0.5, c=0.5, gamma=0.8).build()
    gen = torch.Generator().manual_seed(4)
    k = 3
    params = {"w": torch.randn(k, 4, 2, generator=gen), "b": torch.randn(k, 2, generator=gen)}
    grads = [{n: torch.randn(t.shape, generator=gen) for n, t in params.items()} for _ in range(4)]

    def run(p, gs):
        state = opt.init(p)
        for g in gs:
            p, state = opt.step(g, state, p)
        return p, state["0"]["lam"]

    batched, lams = vmap(run)(params, grads)
    for i in range(k):
        one, lam = run(
            {n: t[i] for n, t in params.items()}, [{n: t[i] for n, t in g.items()} for g in grads]
        )
        assert_close({n: t[i] for n, t in batched.items()}, one)
        assert_close(lams[i], lam)
    assert not torch.allclose(lams[0], lams[1])  # each client learns its own λ
