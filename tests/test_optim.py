"""Optimizers as transformations: torch.optim parity (50 steps), combinators, schedules, vmap."""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import vmap
from torch.testing import assert_close

from fedkin.core.tree import tree_map
from fedkin.optim import (
    AdamConfig,
    AdamWConfig,
    ScheduleConfig,
    SgdConfig,
    adam,
    adam_transform,
    adamw,
    apply_updates,
    chain,
    from_transform,
    label_by_key,
    label_by_ndim,
    partition,
    projected_sgd,
    routed,
    sgd,
    sgd_transform,
)
from fedkin.optim.transform import clip, clip_by_global_norm, scale


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
        params, state = opt.step(g, state, params)
    return params, state


@pytest.mark.parametrize(
    ("lr", "momentum", "weight_decay", "nesterov"),
    [
        (0.1, 0.0, 0.0, False),
        (0.05, 0.9, 0.0, False),
        (0.05, 0.0, 0.01, False),
        (0.03, 0.5, 0.1, False),
        (0.03, 0.9, 0.01, True),
    ],
)
def test_sgd_matches_torch_for_50_steps(lr, momentum, weight_decay, nesterov):
    params, grads = _params_and_grads(steps=50)
    expected = _run_torch(
        torch.optim.SGD,
        params,
        grads,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        nesterov=nesterov,
    )
    cfg = SgdConfig(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    got, _ = _run_functional(cfg.build(), params, grads)
    assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # the parameters actually moved (the test is not comparing two no-ops)
    assert (got["w"] - params["w"]).abs().max() > 1e-1


@pytest.mark.parametrize(
    ("lr", "b1", "b2", "eps"),
    [(1e-3, 0.9, 0.999, 1e-8), (0.05, 0.8, 0.99, 1e-6), (0.01, 0.0, 0.9, 1e-3)],
)
def test_adam_matches_torch_for_50_steps(lr, b1, b2, eps):
    params, grads = _params_and_grads(steps=50, seed=1)
    expected = _run_torch(torch.optim.Adam, params, grads, lr=lr, betas=(b1, b2), eps=eps)
    got, state = _run_functional(adam(lr, b1, b2, eps), params, grads)
    assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert float(state["0"]["t"]) == 50
    assert (got["w"] - params["w"]).abs().max() > 5 * lr


@pytest.mark.parametrize(("lr", "weight_decay"), [(1e-3, 0.01), (0.05, 0.1)])
def test_adamw_matches_torch_for_50_steps(lr, weight_decay):
    params, grads = _params_and_grads(steps=50, seed=2)
    expected = _run_torch(torch.optim.AdamW, params, grads, lr=lr, weight_decay=weight_decay)
    got, _ = _run_functional(adamw(lr, weight_decay=weight_decay), params, grads)
    assert_close(got, expected, rtol=1e-5, atol=1e-5)
    without_decay, _ = _run_functional(adam(lr), params, grads)
    assert not torch.allclose(got["w"], without_decay["w"], rtol=1e-5, atol=1e-5)


def test_optimizer_configs_build_the_configured_optimizer():
    params, grads = _params_and_grads(steps=3)
    got, _ = _run_functional(SgdConfig(lr=0.2, momentum=0.5).build(), params, grads)
    expected = _run_torch(torch.optim.SGD, params, grads, lr=0.2, momentum=0.5)
    assert_close(got, expected)
    got, _ = _run_functional(AdamConfig(lr=0.02, b1=0.5).build(), params, grads)
    expected = _run_torch(torch.optim.Adam, params, grads, lr=0.02, betas=(0.5, 0.999))
    assert_close(got, expected, rtol=1e-5, atol=1e-6)
    got, _ = _run_functional(AdamWConfig(lr=0.02, weight_decay=0.1).build(), params, grads)
    expected = _run_torch(torch.optim.AdamW, params, grads, lr=0.02, weight_decay=0.1)
    assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_optimizers_are_pure_and_have_no_update_method():
    params, grads = _params_and_grads(steps=1)
    before = tree_map(torch.clone, params)
    opt = adam(0.1)
    state = opt.init(params)
    state_before = tree_map(torch.clone, state)
    new, _ = opt.step(grads[0], state, params)
    assert_close(params, before, rtol=0, atol=0)
    assert_close(state, state_before, rtol=0, atol=0)
    assert not torch.equal(new["w"], params["w"])
    # old-style calls (``update`` returning new parameters) fail loudly
    with pytest.raises(AttributeError):
        opt.update(grads[0], state, params)  # type: ignore[attr-defined]


def test_transform_update_returns_updates_and_apply_updates_adds_them():
    params, grads = _params_and_grads(steps=1)
    tx = sgd_transform(0.5)
    u, _ = tx.update(grads[0], tx.init(params), params)
    assert_close(u, tree_map(lambda g: -0.5 * g, grads[0]))
    assert_close(apply_updates(params, u), tree_map(lambda p, g: p - 0.5 * g, params, grads[0]))


OPTIMIZERS_TO_VMAP = {
    "sgd": sgd(0.1, 0.9, 0.01),
    "adam": adam(0.01),
    "adamw-cosine-clip": AdamWConfig(
        lr=0.01, clip_norm=0.5, schedule=ScheduleConfig(kind="cosine", warmup_steps=1)
    ).build(),
    "partition": from_transform(
        partition(
            {"matrix": adam_transform(0.01), "other": sgd_transform(0.1, 0.9)}, label_by_ndim()
        )
    ),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS_TO_VMAP))
def test_optimizers_vmap_over_clients(name):
    """One vmapped run over stacked client params equals a per-client loop."""
    opt = OPTIMIZERS_TO_VMAP[name]
    g = torch.Generator().manual_seed(3)
    k = 4
    params = {"w": torch.randn(k, 5, 2, generator=g), "b": torch.randn(k, 2, generator=g)}
    grads = [
        {"w": torch.randn(k, 5, 2, generator=g), "b": torch.randn(k, 2, generator=g)}
        for _ in range(3)
    ]

    def run(p, gs):
        state = opt.init(p)
        for gr in gs:
            p, state = opt.step(gr, state, p)
        return p

    batched = vmap(run)(params, grads)
    for i in range(k):
        one = run(
            {n: t[i] for n, t in params.items()}, [{n: t[i] for n, t in gr.items()} for gr in grads]
        )
        assert_close({n: t[i] for n, t in batched.items()}, one)


def test_partition_routes_each_leaf_to_its_transformation():
    params, grads = _params_and_grads(steps=4)
    both = from_transform(
        partition({"matrix": adam_transform(0.01), "other": sgd_transform(0.1)}, label_by_ndim())
    )
    got, state = _run_functional(both, params, grads)
    only_adam, _ = _run_functional(adam(0.01), {"w": params["w"]}, [{"w": g["w"]} for g in grads])
    only_sgd, _ = _run_functional(sgd(0.1), params["inner"], [g["inner"] for g in grads])
    assert_close(got["w"], only_adam["w"], rtol=0, atol=0)
    assert_close(got["inner"], only_sgd, rtol=0, atol=0)
    assert list(got) == list(params)  # the parameters' order is kept
    assert set(state) == {"matrix", "other"}
    with pytest.raises(ValueError, match="labels"):
        bad = partition({"matrix": sgd_transform(0.1)}, label_by_ndim())
        bad.update(grads[0], bad.init(params), params)


def test_routed_is_partition_by_top_level_key():
    params, grads = _params_and_grads(steps=3)
    params = {"top": {"w": params["w"]}, "inner": params["inner"]}
    grads = [{"top": {"w": g["w"]}, "inner": g["inner"]} for g in grads]
    members = {"top": adam(0.01), "inner": sgd(0.1, 0.9)}
    got, _ = _run_functional(routed(members), params, grads)
    txs = {"top": adam_transform(0.01), "inner": sgd_transform(0.1, 0.9)}
    expected, _ = _run_functional(from_transform(partition(txs, label_by_key())), params, grads)
    assert_close(got, expected, rtol=0, atol=0)


def test_projected_sgd_clamps_after_the_step():
    opt = projected_sgd(0.5, lo=0.1, hi=2.0)
    p = torch.tensor([1.0, 0.2, 1.9])
    new, state = opt.step(torch.tensor([1.0, 1.0, -1.0]), opt.init(p), p)
    assert_close(new, torch.tensor([0.5, 0.1, 2.0]))
    assert state == {}


def test_schedules_follow_their_formulas():
    lr = 0.2
    warm, decay = 3, 10
    opt = SgdConfig(
        lr=lr, schedule=ScheduleConfig(kind="cosine", warmup_steps=warm, decay_steps=decay)
    ).build()
    p = {"x": torch.zeros(())}
    state = opt.init(p)
    etas = []
    for _ in range(warm + decay + 2):
        new, state = opt.step({"x": torch.ones(())}, state, p)
        etas.append(-float(new["x"]))
    expected = [lr * t / warm for t in range(warm)] + [
        lr * 0.5 * (1 + math.cos(math.pi * min(t, decay) / decay)) for t in range(decay + 2)
    ]
    assert etas == pytest.approx(expected, abs=1e-7)
    lin = SgdConfig(
        lr=lr, schedule=ScheduleConfig(kind="linear", decay_steps=4, final_fraction=0.5)
    ).build()
    state = lin.init(p)
    etas = []
    for _ in range(6):
        new, state = lin.step({"x": torch.ones(())}, state, p)
        etas.append(-float(new["x"]))
    assert etas == pytest.approx([0.2, 0.175, 0.15, 0.125, 0.1, 0.1], abs=1e-7)


def test_clipping_transforms():
    g = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([4.0])}  # global norm 5
    u, _ = clip_by_global_norm(1.0).update(g, {}, g)
    assert_close(u, {"a": torch.tensor([0.6, 0.0]), "b": torch.tensor([0.8])})
    u, _ = clip_by_global_norm(10.0).update(g, {}, g)
    assert_close(u, g)
    u, _ = chain(clip(3.5), scale(2.0)).update(g, {}, g)
    assert_close(u, {"a": torch.tensor([6.0, 0.0]), "b": torch.tensor([7.0])})
    clipped = SgdConfig(lr=1.0, clip_norm=1.0).build()
    new, _ = clipped.step(g, clipped.init(g), tree_map(torch.zeros_like, g))
    assert_close(new, {"a": torch.tensor([-0.6, 0.0]), "b": torch.tensor([-0.8])})


def test_every_built_in_optimizer_is_registered():
    from fedkin.optim import OPTIMIZERS

    expected = {"sgd", "adam", "adamw", "avgrad", "mada", "muon", "muonbp", "diffgrad", "sgd-sai"}
    assert expected <= set(OPTIMIZERS)


def test_differentially_private_aggregate_clips_per_example_and_adds_keyed_noise():
    from fedkin.optim.transform import differentially_private_aggregate

    per_example = {"a": torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]])}  # norms 5, 0.5, 0
    calls = []

    def noise(count, leaf, numel):
        calls.append((int(count), leaf))
        return torch.ones(numel)

    tx = differentially_private_aggregate(1.0, 0.5, 4.0, noise)
    u, state = tx.update(per_example, tx.init(per_example), per_example)
    clipped = torch.tensor([0.6, 0.8]) + torch.tensor([0.3, 0.4])  # first clipped to norm 1
    assert_close(u["a"], (clipped + 0.5 * 1.0) / 4.0)
    u2, _ = tx.update(per_example, state, per_example)
    assert calls == [(0, 0), (1, 0)]  # the step count keys the noise
    assert_close(u2["a"], u["a"])


def test_state_bytes_per_param_is_measured_from_the_stored_state():
    from fedkin.optim.optimizer import state_bytes_per_param

    params = {"w": torch.zeros(10, 5), "b": torch.zeros(5)}
    n = 55
    assert state_bytes_per_param(sgd(0.1), params) == 0
    assert state_bytes_per_param(sgd(0.1, momentum=0.9), params) == 4
    assert state_bytes_per_param(adam(0.1), params) == (2 * n * 4 + 4) / n
    bf16 = AdamConfig(precision="bf16-stochastic").build()
    assert state_bytes_per_param(bf16, params) == (2 * n * 2 + 4 + 8) / n  # + t and the count
