"""bf16 weights and state: stochastic rounding is unbiased and keeps small updates; round-to-
nearest loses them; states are stored as bf16; everything vmaps."""

from __future__ import annotations

import torch
from torch.func import vmap
from torch.testing import assert_close

from fedkin.optim import AdamWConfig, SgdConfig
from fedkin.optim.precision import stochastic_round_bf16


def test_stochastic_rounding_is_unbiased_between_the_two_neighbours():
    x = torch.rand(2000, generator=torch.Generator().manual_seed(0)) * 8 - 4
    draws = torch.stack([stochastic_round_bf16(x, 0, k).float() for k in range(300)])
    down = x.bfloat16().float()  # one neighbour; the other is one ulp away
    ulp = (x.abs() * 2**-7).clamp(min=1e-30)
    assert ((draws - x).abs() <= 2 * ulp).all()
    assert len(torch.unique(draws[:, 0])) == 2
    # the mean of 300 draws is within 4 standard errors (≤ ulp/2/√300) of x
    assert ((draws.mean(0) - x).abs() <= 4 * ulp / 2 / 300**0.5 + 1e-7).all()
    assert not torch.equal(draws.mean(0), down)
    exact = torch.tensor([1.0, -2.5, 0.0])
    assert torch.equal(stochastic_round_bf16(exact, 0, 1).float(), exact)


def _run(opt, params, grads):
    state = opt.init(params)
    for g in grads:
        params, state = opt.step(g, state, params)
    return params, state


def test_nearest_stalls_where_stochastic_rounding_follows_fp32():
    """Updates of 2⁻¹² relative to |θ| = 1 (below half a bf16 ulp, 2⁻⁸)."""
    n, steps = 4000, 200
    params = {"w": torch.ones(n)}
    grads = [{"w": torch.full((n,), 2.0**-12 / 0.1)}] * steps
    fp32, _ = _run(SgdConfig(lr=0.1).build(), params, grads)
    rne, _ = _run(SgdConfig(lr=0.1, precision="bf16-nearest").build(), params, grads)
    sr, _ = _run(SgdConfig(lr=0.1, precision="bf16-stochastic").build(), params, grads)
    assert float(fp32["w"][0]) == 1 - steps * 2.0**-12
    assert torch.equal(rne["w"], params["w"])  # every update lost
    assert torch.equal(sr["w"].bfloat16().float(), sr["w"])  # bf16 values
    assert abs(float(sr["w"].mean()) - float(fp32["w"][0])) < 1e-3
    assert float(sr["w"].std()) > 0


def test_states_are_bf16_and_step_counts_exact():
    params = {"w": torch.randn(5, 3), "b": torch.randn(3)}
    grads = [{k: torch.randn_like(v) for k, v in params.items()} for _ in range(300)]
    opt = AdamWConfig(lr=1e-3, precision="bf16-stochastic").build()
    new, state = _run(opt, params, grads)
    assert state["inner"]["0"]["0"]["m"]["w"].dtype == torch.bfloat16
    assert state["inner"]["0"]["0"]["v"]["b"].dtype == torch.bfloat16
    assert float(state["inner"]["0"]["0"]["t"]) == 300
    assert new["w"].dtype == torch.float32
    assert torch.equal(new["w"].bfloat16().float(), new["w"])
    fp32, _ = _run(AdamWConfig(lr=1e-3).build(), params, grads)
    assert (new["w"] - fp32["w"]).abs().max() < 0.05  # close to fp32, not equal
    assert not torch.equal(new["w"], fp32["w"])


def test_bf16_optimizers_vmap_over_clients():
    opt = AdamWConfig(lr=1e-2, precision="bf16-stochastic").build()
    gen = torch.Generator().manual_seed(1)
    params = {"w": torch.randn(3, 4, 2, generator=gen)}
    grads = [{"w": torch.randn(3, 4, 2, generator=gen)} for _ in range(4)]

    def run(p, gs):
        return _run(opt, p, gs)[0]

    batched = vmap(run)(params, grads)
    for i in range(3):
        one = run({"w": params["w"][i]}, [{"w": g["w"][i]} for g in grads])
        assert_close(batched["w"][i], one["w"], rtol=0, atol=0)
