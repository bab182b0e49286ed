"""Muon equals torch.optim.Muon over 50 steps on one model; MuonBP's limits and cost count."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.testing import assert_close

from fedkin.optim import MuonBPConfig, MuonConfig
from fedkin.optim.muon import muonbp_costs, newton_schulz

STEPS = 50


def _model_and_data(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 5)
    )
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(STEPS, 32, 12, generator=g)
    ys = torch.randint(0, 5, (STEPS, 32), generator=g)
    return model, xs, ys


def _torch_muon(model, xs, ys, lr, wd, other_lr, adjust, opt=None):
    """torch.optim.Muon (2-D) + AdamW (rest) on ``model``; with ``opt``, fedkin's optimizer is
    stepped alongside on the *same* gradients (those of torch's trajectory)."""
    model = copy.deepcopy(model)
    mats = [p for p in model.parameters() if p.ndim == 2]
    rest = [p for p in model.parameters() if p.ndim != 2]
    opts = [
        torch.optim.Muon(mats, lr=lr, weight_decay=wd, adjust_lr_fn=adjust),
        torch.optim.AdamW(rest, lr=other_lr, weight_decay=0.0),
    ]
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    state = opt.init(params) if opt is not None else None
    for x, y in zip(xs, ys, strict=True):
        for o in opts:
            o.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        if opt is not None:
            grads = {k: v.grad.clone() for k, v in model.named_parameters()}
            params, state = opt.step(grads, state, params)
        for o in opts:
            o.step()
    return {k: v.detach() for k, v in model.named_parameters()}, params


def _fedkin(model, xs, ys, opt):
    params = {k: v.detach().clone() for k, v in model.named_parameters()}

    def loss(p, x, y):
        return nn.functional.cross_entropy(functional_call(model, p, (x,)), y)

    state = opt.init(params)
    for x, y in zip(xs, ys, strict=True):
        params, state = opt.step(grad(loss)(params, x, y), state, params)
    return params


@pytest.mark.parametrize(
    ("lr", "wd", "adjust"), [(0.02, 0.0, "original"), (0.01, 0.1, "match_rms_adamw")]
)
def test_muon_matches_torch_optim_muon_for_50_steps(lr, wd, adjust):
    """Step for step on the gradients of one model's training trajectory (50 steps, 1e-5).

    Both run Newton–Schulz in bf16, so a 1e-8 difference in the parameters (float
    reassociation of the update) eventually flips a bf16 rounding and free-running
    trajectories drift apart (measured: first at step ~10, 2e-2 after 50 steps); hence the
    50-step comparison feeds both optimizers the same gradients, and free-running trajectories
    are compared over the first 5 steps only.
    """
    model, xs, ys = _model_and_data()
    cfg = MuonConfig(lr=lr, weight_decay=wd, adjust_lr=adjust, other_lr=1e-2)
    expected, got = _torch_muon(model, xs, ys, lr, wd, 1e-2, adjust, opt=cfg.build())
    assert_close(got, expected, rtol=1e-5, atol=1e-5)
    start = dict(model.named_parameters())
    assert max((got[k] - start[k]).abs().max() for k in got) > 0.05  # it trained
    free_torch, _ = _torch_muon(model, xs[:5], ys[:5], lr, wd, 1e-2, adjust)
    assert_close(_fedkin(model, xs[:5], ys[:5], cfg.build()), free_torch, rtol=1e-5, atol=1e-5)


def test_newton_schulz_orthogonalizes_like_torch():
    from torch.optim._muon import _zeropower_via_newtonschulz

    g = torch.randn(20, 8, generator=torch.Generator().manual_seed(1))
    o = newton_schulz(g).float()
    reference = _zeropower_via_newtonschulz(g, (3.4445, -4.7750, 2.0315), 5, 1e-7).float()
    assert torch.equal(o, reference)
    batched = vmap(newton_schulz)(torch.stack([g, 2 * g]))[0].float()
    assert_close(batched, reference, rtol=0, atol=2**-7)  # one bf16 ulp at most
    assert o.shape == g.shape
    s = torch.linalg.svdvals(o)
    assert float(s.min()) > 0.5 and float(s.max()) < 1.5  # the quintic's S' ∈ (0.5, 1.5)


@pytest.mark.parametrize("blocks", [1, 3])
def test_muonbp_with_period_1_is_muon(blocks):
    model, xs, ys = _model_and_data(1)
    muon = _fedkin(model, xs[:10], ys[:10], MuonConfig(lr=0.02).build())
    bp = _fedkin(model, xs[:10], ys[:10], MuonBPConfig(lr=0.02, blocks=blocks, period=1).build())
    assert_close(bp, muon, rtol=0, atol=0)


def test_muonbp_blocks_orthogonalize_each_block_and_full_steps_every_period():
    model, xs, ys = _model_and_data(2)
    one_block = _fedkin(model, xs[:6], ys[:6], MuonBPConfig(lr=0.02, blocks=1, period=3).build())
    muon = _fedkin(model, xs[:6], ys[:6], MuonConfig(lr=0.02).build())
    assert_close(one_block, muon, rtol=0, atol=0)  # one block: every step is a full step
    blocked = _fedkin(model, xs[:6], ys[:6], MuonBPConfig(lr=0.02, blocks=2, period=3).build())
    assert not torch.allclose(blocked["2.weight"], muon["2.weight"], atol=1e-4)
    # a block step's direction is the concatenation of the blocks' own orthogonalizations
    from fedkin.optim.muon import scale_by_muonbp, shape_factor

    tx = scale_by_muonbp(blocks=2, period=4, momentum=0.0, nesterov=False)
    g = {"w": torch.randn(6, 10, generator=torch.Generator().manual_seed(3))}
    state = tx.init(g)
    full, state = tx.update(g, state, g)  # t = 0: full
    block, _ = tx.update(g, state, g)  # t = 1: blocks
    assert_close(full["w"], shape_factor((6, 10), "original") * newton_schulz(g["w"]).float())
    expected = torch.cat([newton_schulz(g["w"][:3]), newton_schulz(g["w"][3:])]).float()
    assert_close(block["w"], expected)


def test_muonbp_costs_count_ns_flops_and_gathered_bytes():
    c = muonbp_costs((512, 512), blocks=4, period=5)
    assert c["muon_ns_flops"] == 5 * (4 * 512**3 + 2 * 512**3)
    block = 5 * (4 * 128 * 128 * 512 + 2 * 128**3)
    assert c["muonbp_ns_flops"] == (c["muon_ns_flops"] + 4 * 4 * block) / 5
    assert c["muon_gather_bytes"] == 2 * 512 * 512 * 3 / 4
    assert c["muonbp_gather_bytes"] == c["muon_gather_bytes"] / 5
    assert muonbp_costs((64, 32), 1, 1)["flops_saved_fraction"] == 0


@pytest.mark.parametrize(("shape", "blocks"), [((12, 20), 3), ((24, 8), 4)])
def test_sharded_muonbp_equals_the_optimizer_and_its_measured_costs(shape, blocks):
    """Shards on simulated devices: same directions as scale_by_muonbp on the whole matrix;
    the bytes moved and the FLOPs counted by torch's FlopCounterMode equal muonbp_costs."""
    from torch.utils.flop_counter import FlopCounterMode

    from fedkin.optim.muon import ShardedMuonBP, scale_by_muonbp

    period, steps = 3, 9
    gen = torch.Generator().manual_seed(5)
    grads = [torch.randn(*shape, generator=gen) for _ in range(steps)]
    tx = scale_by_muonbp(blocks, period, block_lr_ratio=0.7)
    state = tx.init({"w": grads[0]})
    rows = [len(r) for r in torch.arange(shape[0]).chunk(blocks)]
    sharded = ShardedMuonBP([(r, shape[1]) for r in rows], period, block_lr_ratio=0.7)
    flops = 0
    for g in grads:
        expected, state = tx.update({"w": g}, state, {"w": g})
        with FlopCounterMode(display=False) as counter:
            got = sharded.step(list(g.split(rows)))
        flops += counter.get_total_flops()
        assert_close(torch.cat(got), expected["w"], rtol=0, atol=0)
    costs = muonbp_costs(shape, blocks, period)
    assert sharded.gathered_bytes == costs["muonbp_gather_bytes"] * steps > 0
    assert flops == costs["muonbp_ns_flops"] * steps


@pytest.mark.parametrize("cfg", [MuonConfig(lr=0.02), MuonBPConfig(lr=0.02, blocks=2, period=2)])
def test_muon_vmaps_over_clients(cfg):
    opt = cfg.build()
    gen = torch.Generator().manual_seed(4)
    k = 3
    params = {"w": torch.randn(k, 6, 4, generator=gen), "b": torch.randn(k, 4, generator=gen)}
    grads = [{n: torch.randn(t.shape, generator=gen) for n, t in params.items()} for _ in range(3)]

    def run(p, gs):
        state = opt.init(p)
        for g in gs:
            p, state = opt.step(g, state, p)
        return p

    batched = vmap(run)(params, grads)
    for i in range(k):
        one = run(
            {n: t[i] for n, t in params.items()}, [{n: t[i] for n, t in g.items()} for g in grads]
        )
        # bf16 Newton–Schulz: inside vmap one bf16 ulp may differ (see muon._addmm)
        assert_close({n: t[i] for n, t in batched.items()}, one, rtol=1e-4, atol=1e-4)
