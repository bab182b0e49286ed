"""Zeroth-order client optimizers (MeZO, ZO-SGD, ZO-Adam, Sparse MeZO): the SPSA estimate is
unbiased, Sparse MeZO leaves masked weights alone, the vectorized and sequential engines agree,
seeds reproduce runs, and configs fail with the dotted key."""

from __future__ import annotations

import pytest
import torch
from torch.func import vmap
from torch.testing import assert_close

from conftest import tiny_config
from fedkin.algorithms import ALGORITHMS
from fedkin.config import load_config
from fedkin.core.errors import UserError
from fedkin.core.tree import tree_leaves, tree_map
from fedkin.experiment import Experiment
from fedkin.optim import OPTIMIZERS
from fedkin.optim.zeroth import SeedGradient, ZerothOrder, densify, magnitude_masks

ZO = ["mezo", "zo-sgd", "zo-adam", "sparse-mezo"]

A = torch.tensor([[3.0, 1.0, 0.0], [1.0, 2.0, -0.5], [0.0, -0.5, 1.0]])
B = torch.tensor([0.5, -1.0, 0.25])


def _flat(tree) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tree_leaves(tree)])


def quadratic(p):
    x = torch.cat([p["w"].reshape(-1), p["b"]])
    loss = 0.5 * x @ torch.block_diag(A, A) @ x + torch.cat([B, B]) @ x
    return loss, loss


def _params():
    return {"w": torch.tensor([[0.3, -0.2, 0.1]]), "b": torch.tensor([0.4, 0.0, -0.3])}


def _mean_estimate(est: ZerothOrder, n: int):
    params = _params()
    keys = torch.arange(n)

    def one(key):
        g, _ = est.estimate(quadratic, params, key)
        return densify(params, est.seed, g)

    samples = vmap(one)(keys)
    return tree_map(lambda t: t.mean(0), samples), tree_map(lambda t: t.var(0), samples)


def test_spsa_estimate_is_unbiased_on_a_quadratic_and_q_directions_cut_the_variance():
    params = _params()
    x = torch.cat([params["w"].reshape(-1), params["b"]])
    true = torch.block_diag(A, A) @ x + torch.cat([B, B])
    n = 20000
    mean1, var1 = _mean_estimate(ZerothOrder(1e-3, 1, seed=0), n)
    got = torch.cat([mean1["w"].reshape(-1), mean1["b"]])
    # ĝ = zzᵀ∇L: per-coordinate variance ‖∇L‖² + g_i²; 5 standard errors of the mean
    tol = 5 * float((true.square().sum() + true.square()).max().sqrt()) / n**0.5
    assert_close(got, true, rtol=0, atol=tol)
    assert float((got - true).abs().max()) < 0.2 * float(true.abs().max())
    _, var4 = _mean_estimate(ZerothOrder(1e-3, 4, seed=0), n // 4)
    ratio = _flat(var1) / _flat(var4)
    assert 3.0 < float(ratio.mean()) < 5.0  # averaging q = 4 directions: variance / 4


def test_in_place_estimate_equals_the_functional_one_and_restores_the_weights():
    est = ZerothOrder(1e-2, 2, seed=3)
    params = {"w": torch.randn(50, 40), "b": torch.randn(40)}
    before = tree_map(torch.clone, params)
    key = est.key(7)
    g_inplace, _ = est.estimate(quadratic_big, params, key)
    assert g_inplace.inplace
    assert_close(params, before, rtol=0, atol=1e-6)  # +ε, −2ε, +ε: restored up to rounding
    flags = []

    def functional(k):
        g, _ = est.estimate(quadratic_big, before, k)
        flags.append(g.inplace)
        return g.coefs

    coefs = vmap(functional, randomness="error")(key[None])
    assert flags == [False]
    # θ + εz − 2εz rounds differently from θ − εz; fp32 losses of ~2·10³ differ by ~ulp/(2ε)
    assert_close(g_inplace.coefs, coefs[0], rtol=2e-3, atol=0)


def quadratic_big(p):
    loss = (p["w"] ** 2).sum() + (p["b"] ** 3).sum()
    return loss, loss


def test_sparse_mezo_never_perturbs_or_updates_masked_weights():
    cfg = OPTIMIZERS.entry("sparse-mezo").config(density=0.3, lr=0.1, zo_eps=0.05)
    opt = cfg.build()
    params = {"w": torch.randn(30, 20), "b": torch.randn(20)}
    masks = magnitude_masks(params, 0.3)
    for m, p in zip(tree_leaves(masks), tree_leaves(params), strict=True):
        assert int(m.sum()) == -(-3 * p.numel() // 10)  # ⌈ρn⌉ entries (no ties in randn)
        assert float(p[m].abs().max()) <= float(p[~m].abs().min())  # the smallest |θ|
    seen = []

    def objective(p):
        seen.append(tree_map(torch.clone, p))
        return quadratic_big(p)

    g, _ = opt.estimator.estimate(objective, params, torch.tensor(0))
    new, _ = opt.step(g, opt.init(params), tree_map(torch.clone, params))
    for q in [*seen, new]:
        for k in params:
            moved = q[k] != params[k]
            assert not (moved & ~masks[k]).any()  # masked-out weights untouched
            assert moved[masks[k]].float().mean() > 0.9  # the small ones all move


def test_low_memory_masks_equal_kthvalue_ones_with_ties_and_under_vmap():
    g = torch.Generator().manual_seed(1)
    p = {"w": torch.randint(-20, 20, (40, 30), generator=g).float() / 7, "b": torch.randn(30)}
    for density in (0.01, 0.25, 0.5, 1.0):
        low, fast = magnitude_masks(p, density), magnitude_masks(p, density, low_memory=False)
        assert torch.equal(_flat(low), _flat(fast))
    stacked = {k: torch.stack([v, -2 * v]) for k, v in p.items()}
    batched = vmap(lambda q: magnitude_masks(q, 0.3))(stacked)
    assert torch.equal(batched["w"][0], magnitude_masks(p, 0.3, low_memory=False)["w"])


@pytest.mark.parametrize("name", ZO)
def test_vectorized_equals_sequential_and_seeds_reproduce(name):
    extra = [
        "algorithm.name=fedprox",
        "algorithm.mu=0.1",
        f"client.optimizer.name={name}",
        "client.optimizer.lr=0.01",
        "rounds=2",
    ]

    def run(*more):
        exp = Experiment(tiny_config(*extra, *more))
        w0 = tree_map(torch.clone, exp.population["global"])
        for _ in range(2):
            exp.run_round()
        return w0, exp.population["global"]

    w0, vec = run("engine.name=vectorized")
    _, seq = run("engine.name=sequential")
    _, again = run("engine.name=vectorized")
    _, other = run("engine.name=vectorized", "client.optimizer.zo_seed=1")
    assert_close(seq, vec, rtol=1e-4, atol=1e-5)
    assert torch.equal(_flat(vec), _flat(again))
    assert float((_flat(vec) - _flat(w0)).abs().max()) > 1e-4
    assert not torch.equal(_flat(vec), _flat(other))


def test_mezo_local_step_is_the_spsa_update():
    """One FedAvg client, one step: θ' = θ − η p z with p the central difference along z."""
    exp = Experiment(tiny_config("client.optimizer.name=mezo", "client.optimizer.lr=0.05"))
    alg = exp.groups[0].algorithm
    w = exp.population["global"]
    x, y = torch.randn(1, 8, 64), torch.randint(0, 10, (1, 8))
    ctx = {"round": torch.tensor(2), "client_id": torch.tensor(5)}
    new, *_ = alg.local_solve(w, alg.plain_objective, (x, y), steps=1, ctx=ctx)
    est = alg.client_optimizer.estimator
    key = est.key(2, 5, 0, 0, 0)
    z = densify(w, est.seed, SeedGradient(torch.ones(1), key, None, False))
    lp = alg.data_loss(tree_map(lambda a, b: a + 1e-3 * b, w, z), x[0], y[0])
    lm = alg.data_loss(tree_map(lambda a, b: a - 1e-3 * b, w, z), x[0], y[0])
    p = (lp - lm) / 2e-3
    step, zs = _flat(new) - _flat(w), _flat(z)
    c = step @ zs / (zs @ zs)
    assert_close(step, c * zs, rtol=0, atol=1e-6)  # the step lies along z
    # the central difference of fp32 losses (in-place θ+εz−2εz vs θ−εz) agrees to ~1e-3
    assert_close(c, -0.05 * p, rtol=5e-3, atol=0)


def test_zo_adam_is_adam_on_the_estimate():
    cfg = OPTIMIZERS.entry("zo-adam").config(lr=0.01)
    zo, adam = cfg.build(), OPTIMIZERS.entry("adam").config(lr=0.01).build()
    params = {"w": torch.randn(4, 3)}
    s_zo, s_adam = zo.init(params), adam.init(params)
    p_zo = p_adam = params
    for t in range(5):
        g, _ = zo.estimator.estimate(quadratic_big_w, p_zo, torch.tensor(t))
        p_adam, s_adam = adam.step(densify(p_zo, zo.estimator.seed, g), s_adam, p_adam)
        p_zo, s_zo = zo.step(g, s_zo, p_zo)
    assert_close(p_zo, p_adam)
    assert not torch.equal(p_zo["w"], params["w"])


def quadratic_big_w(p):
    loss = (p["w"] ** 2).sum()
    return loss, loss


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("client.optimizer.zo_eps=0", "client.optimizer.zo_eps"),
        ("client.optimizer.perturbations=0", "client.optimizer.perturbations"),
        ("client.optimizer.density=1.5", "client.optimizer.density"),
        ("client.optimizer.sparsity=0.5", "client.optimizer.sparsity"),
    ],
)
def test_config_errors_name_the_dotted_key(override, needle):
    with pytest.raises(UserError, match=needle.replace(".", r"\.")):
        load_config(None, ["client.optimizer.name=sparse-mezo", override])


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["algorithm.name=apfl"], "client.optimizer.name=mezo is zeroth-order"),
        (["algorithm.name=pfedme"], "work with: fedavg, fedprox"),
        (["server.optimizer.name=mezo"], "server.optimizer.name=mezo is zeroth-order"),
    ],
)
def test_zeroth_order_is_refused_where_it_cannot_work(overrides, needle):
    with pytest.raises(UserError, match=needle):
        load_config(None, ["client.optimizer.name=mezo", *overrides])


@pytest.mark.parametrize("name", [n for n, a in ALGORITHMS.items() if a.supports_zeroth_order])
def test_every_algorithm_that_allows_zeroth_order_trains_with_it(name):
    exp = Experiment(
        tiny_config(f"algorithm.name={name}", "client.optimizer.name=zo-sgd", "rounds=1")
    )
    before = tree_map(torch.clone, exp.store.gather(torch.arange(20)) or exp.population)
    exp.run_round()
    after = exp.store.gather(torch.arange(20)) or exp.population
    assert not torch.equal(_flat(before), _flat(after))
