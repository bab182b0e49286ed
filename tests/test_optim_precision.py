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
    gen = torch.Generator().manual_seed(0)  # seeded: torch's default seed is per process
    params = {"w": torch.randn(5, 3, generator=gen), "b": torch.randn(3, generator=gen)}
    grads = [
        {k: torch.randn(v.shape, generator=gen) for k, v in params.items()} for _ in range(300)
    ]
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


def test_chunked_rounding_draws_the_same_bits():
    x = torch.randn(3, 1000, generator=torch.Generator().manual_seed(2))
    whole = stochastic_round_bf16(x, 5, 7, chunk=x.numel())
    assert torch.equal(stochastic_round_bf16(x, 5, 7, chunk=128), whole)
    assert torch.equal(stochastic_round_bf16(x, 5, 7), whole)
    assert not torch.equal(stochastic_round_bf16(x, 5, 8), whole)


def _spied_fedavg(precision: str, seen: list):
    from fedkin.algorithms.fedavg import FedAvg, FedAvgConfig

    with torch.random.fork_rng():  # a fixed init: torch's default seed differs per process
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    opt = AdamWConfig(lr=1e-2, precision=precision).build()
    alg = FedAvg(FedAvgConfig(), model, opt, local_steps=3)

    def objective(params, x, y):
        seen.append({t.dtype for t in (*params.values(), x)})
        return alg.plain_objective(params, x, y)

    def solve(p, xs, ys):
        return alg.local_solve(p, objective, (xs, ys))[:2]

    return alg, solve


def test_local_solve_holds_weights_inputs_and_state_in_bf16_over_the_cohort():
    gen = torch.Generator().manual_seed(3)
    xs, ys = torch.randn(4, 2, 5, 6, generator=gen), torch.randint(0, 3, (4, 2, 5), generator=gen)
    seen: list = []
    alg, solve = _spied_fedavg("bf16-stochastic", seen)
    start = {
        k: torch.stack([v + 0.1 * i for i in range(4)]) for k, v in alg.initial_params().items()
    }
    new, state = vmap(solve)(start, xs, ys)
    assert seen and all(s == {torch.bfloat16} for s in seen)  # forward/backward in bf16
    m = state["inner"]["0"]["0"]["m"]
    assert all(t.dtype == torch.bfloat16 for t in m.values())
    for k, w in new.items():  # returned in the received dtype, bf16 values, moved
        assert w.dtype == torch.float32
        assert torch.equal(w.bfloat16().float(), w)
        assert not torch.equal(w, start[k].bfloat16().float())
    for i in range(4):
        one, _ = solve({k: v[i] for k, v in start.items()}, xs[i], ys[i])
        # bf16 forward/backward: batched and single matmuls round differently, so equal up to
        # a bf16 ulp of a gradient, which Adam's g/√v can turn into ~2η per step (3 steps)
        assert_close({k: v[i] for k, v in new.items()}, one, rtol=0, atol=3 * 2 * 1e-2)
    seen.clear()
    _, solve32 = _spied_fedavg("fp32", seen)
    solve32({k: v[0] for k, v in start.items()}, xs[0], ys[0])
    assert all(s == {torch.float32} for s in seen)
