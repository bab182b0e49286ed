"""Tests for FedAvg-FT, Ditto, pFedMe, Per-FedAvg, APFL and L2GD.

* local steps checked against autograd of each algorithm's stated objective (tiny tanh MLP);
* vectorized vs sequential engine, and unsampled clients keeping their state, on a tiny run;
* limits: Ditto λ=0 ≡ Local and λ → ∞ → global; pFedMe β=1, λ → ∞ ≈ FedAvg; APFL α=1 ≡ Local
  and α=0 ≡ global; L2GD λ=0 ≡ Local; FedAvg-FT trains exactly like FedAvg.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.testing import assert_close

from conftest import hand_personal_accuracy
from fedkin.algorithms import ALGORITHMS
from fedkin.core.errors import ConfigError
from fedkin.optim import sgd

NAMES = ("fedavg_ft", "ditto", "pfedme", "perfedavg", "apfl", "l2gd")

TINY = [
    "data.name=digits",
    "data.num_clients=10",
    "data.partition.name=pathological",
    "data.partition.classes_per_client=2",
    "cohort.clients_per_round=4",
    "cohort.weighting=uniform",
    "model.name=mlp",
    "model.hidden=[16]",
    "client.local_steps=2",
    "client.batch_size=8",
    "rounds=3",
]


def experiment(*extra: str):
    from fedkin.config import load_config
    from fedkin.experiment import Experiment

    return Experiment(load_config(None, [*TINY, *extra]))


def run(exp, rounds: int):
    for _ in range(rounds):
        exp.run_round()
    return exp


def rows(exp) -> dict:
    """Every client's state, stacked (a copy)."""
    return exp.store.gather(torch.arange(exp.dataset.num_clients))


# ----- unit level: one client, a tiny smooth model -----------------------------------------------

LR = 0.1


def tiny_setup(name: str, local_steps: int = 1, **options):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    for p in model.parameters():
        p.requires_grad_(False)
    cls = ALGORITHMS[name]
    alg = cls(cls.Config(**options), model, sgd(LR), local_steps)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    xs, ys = torch.randn(4, 7, 6), torch.randint(0, 3, (4, 7))
    return alg, model, params, (xs, ys)


def perturbed(params: dict, scale: float = 0.3, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) for k, v in params.items()}


def autograd_grad(fn, params: dict) -> dict:
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    grads = torch.autograd.grad(fn(leaves), list(leaves.values()))
    return dict(zip(leaves, grads, strict=True))


def data_loss(model, params, x, y):
    return F.cross_entropy(functional_call(model, params, (x,)), y)


def sub(a: dict, b: dict, scale: float = 1.0) -> dict:
    return {k: a[k] - scale * b[k] for k in a}


def ctx0() -> dict:
    return {
        "client_id": torch.tensor(0),
        "num_samples": torch.tensor(7.0),
        "round": torch.tensor(0),
    }


@pytest.mark.parametrize("name", ["ditto", "l2gd"])
def test_gaussian_prior_step_matches_autograd(name):
    """Personal step v ← v − η ∇[f_i(v) + λ/2‖v − w‖²] at v ≠ w."""
    lam = 0.7
    alg, model, w, (xs, ys) = tiny_setup(name, lam=lam)
    v = perturbed(w)
    state = {"params": v, "opt": {}}
    _, new, _ = alg.client_update({"global": w}, state, (xs, ys), ctx0())

    def objective(p):
        sq = sum(((p[k] - w[k]) ** 2).sum() for k in p)
        return data_loss(model, p, xs[0], ys[0]) + 0.5 * lam * sq

    assert_close(new["params"], sub(v, autograd_grad(objective, v), LR))


def test_fedavg_ft_personal_is_finetuned_global():
    alg, model, w, (xs, ys) = tiny_setup("fedavg_ft", finetune_steps=1)
    state = alg.init_client({"global": w})
    msg, new, _ = alg.client_update({"global": w}, state, (xs, ys), ctx0())
    g = autograd_grad(lambda p: data_loss(model, p, xs[0], ys[0]), w)
    assert_close(msg["delta"], {k: -LR * g[k] for k in g})  # K = 1: FedAvg's step
    assert new == {}  # nothing persists: the personal model is adapted from the current w
    adapted = alg.adapt({"global": w}, new, (xs, ys), ctx0())
    assert_close(alg.personal_params({"global": w}, adapted), sub(w, g, LR))
    # adaptation always starts from the *current* global model
    other = perturbed(w)
    g_other = autograd_grad(lambda p: data_loss(model, p, xs[0], ys[0]), other)
    assert_close(
        alg.adapt({"global": other}, new, (xs, ys), ctx0())["params"], sub(other, g_other, LR)
    )


def test_pfedme_inner_and_outer_steps_match_autograd():
    lam, plr = 3.0, 0.05
    alg, model, w, (xs, ys) = tiny_setup(
        "pfedme", lam=lam, personal_lr=plr, inner_steps=2, beta=1.0
    )

    def inner(theta, center):
        def objective(p):
            sq = sum(((p[k] - center[k]) ** 2).sum() for k in p)
            return data_loss(model, p, xs[0], ys[0]) + 0.5 * lam * sq

        return sub(theta, autograd_grad(objective, theta), plr)

    theta = inner(inner(w, w), w)
    # ∇_w of the envelope objective at fixed θ̂ is λ(w − θ̂) (Danskin)
    env = autograd_grad(lambda p: 0.5 * lam * sum(((theta[k] - p[k]) ** 2).sum() for k in p), w)
    assert_close(alg.envelope_grad(w, theta), env)
    msg, new, _ = alg.client_update({"global": w}, {"params": w}, (xs, ys), ctx0())
    assert_close(new["params"], theta)
    assert_close(msg["delta"], {k: -LR * env[k] for k in env})


def flat_hessian(model, params, x, y):
    keys = list(params)
    shapes = [params[k].shape for k in keys]
    sizes = [params[k].numel() for k in keys]
    flat = torch.cat([params[k].reshape(-1) for k in keys])

    def f(vec):
        parts = torch.split(vec, sizes)
        p = {k: t.reshape(s) for k, t, s in zip(keys, parts, shapes, strict=True)}
        return data_loss(model, p, x, y)

    return torch.autograd.functional.hessian(f, flat), keys


def flatten(tree: dict, keys) -> torch.Tensor:
    return torch.cat([tree[k].reshape(-1) for k in keys])


def test_perfedavg_hvp_matches_explicit_hessian():
    alg, model, w, (xs, ys) = tiny_setup("perfedavg", variant="hessian_free")
    v = perturbed({k: torch.zeros_like(t) for k, t in w.items()}, scale=1.0)
    hess, keys = flat_hessian(model, w, xs[2], ys[2])
    expected = hess @ flatten(v, keys)
    assert_close(flatten(alg.hvp(w, v, xs[2], ys[2]), keys), expected, rtol=1e-4, atol=1e-5)
    fd = ALGORITHMS["perfedavg"](
        ALGORITHMS["perfedavg"].Config(variant="hessian_free", delta=1e-2), model, sgd(LR), 1
    )
    assert_close(flatten(fd.hvp(w, v, xs[2], ys[2]), keys), expected, rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("variant", ["first_order", "hessian_free"])
def test_perfedavg_meta_step_matches_autograd(variant):
    alpha, beta = 0.2, 0.3
    alg, model, w, (xs, ys) = tiny_setup("perfedavg", variant=variant, alpha=alpha, beta=beta)
    g1 = autograd_grad(lambda p: data_loss(model, p, xs[0], ys[0]), w)
    w_prime = sub(w, g1, alpha)
    g2 = autograd_grad(lambda p: data_loss(model, p, xs[1], ys[1]), w_prime)
    if variant == "hessian_free":
        # exact MAML gradient of f(w − α∇f(w; D); D′) with the Hessian taken on D″
        hess, keys = flat_hessian(model, w, xs[2], ys[2])
        meta_flat = flatten(g2, keys) - alpha * hess @ flatten(g2, keys)
        meta = dict(zip(keys, torch.split(meta_flat, [w[k].numel() for k in keys]), strict=True))
        meta = {k: meta[k].reshape(w[k].shape) for k in keys}
    else:
        meta = g2
    state = alg.init_client({"global": w})
    msg, new, _ = alg.client_update({"global": w}, state, (xs, ys), ctx0())
    assert_close(msg["delta"], {k: -beta * meta[k] for k in meta}, rtol=1e-4, atol=1e-6)
    # the personal model is one α-step from the current global model
    adapted = alg.adapt({"global": w}, new, (xs, ys), ctx0())
    assert_close(alg.personal_params({"global": w}, adapted), w_prime)


def test_perfedavg_hf_equals_maml_gradient_on_one_batch():
    """With D = D′ = D″ the HF meta-gradient is ∇_w f(w − α∇f(w)) exactly."""
    alpha = 0.2
    alg, model, w, (xs, ys) = tiny_setup("perfedavg", variant="hessian_free", alpha=alpha)
    x, y = xs[:1], ys[:1]
    g, _ = alg.meta_grad(w, (x, y), 0)

    def maml(p):
        loss = data_loss(model, p, x[0], y[0])
        inner = torch.autograd.grad(loss, list(p.values()), create_graph=True)
        q = {k: p[k] - alpha * gi for k, gi in zip(p, inner, strict=True)}
        return data_loss(model, q, x[0], y[0])

    assert_close(g, autograd_grad(maml, w), rtol=1e-4, atol=1e-6)


def test_apfl_gradients_match_autograd_of_mixture():
    alg, model, w, (xs, ys) = tiny_setup("apfl")
    v = perturbed(w)
    alpha = torch.tensor(0.3)
    g_v, g_alpha, _ = alg.mixed_grads(v, w, alpha, xs[0], ys[0])

    def mixed(p, a):
        return data_loss(model, {k: a * p[k] + (1 - a) * w[k] for k in p}, xs[0], ys[0])

    leaves = {k: t.clone().requires_grad_(True) for k, t in v.items()}
    a = alpha.clone().requires_grad_(True)
    grads = torch.autograd.grad(mixed(leaves, a), [*leaves.values(), a])
    assert_close(g_v, dict(zip(leaves, grads[:-1], strict=True)))
    assert_close(g_alpha, grads[-1])


def test_apfl_alpha_update_is_clipped_sgd():
    alg, _model, w, (xs, ys) = tiny_setup("apfl", alpha=0.5, alpha_lr=1e3)
    v = perturbed(w)
    state = {"params": v, "opt": {}, "alpha": torch.tensor(0.5)}
    _, g_alpha, _ = alg.mixed_grads(v, w, state["alpha"], xs[0], ys[0])
    _, new, _ = alg.client_update({"global": w}, state, (xs, ys), ctx0())
    assert float(new["alpha"]) == (0.0 if g_alpha > 0 else 1.0)  # huge step: clipped


# ----- whole runs: engines, persistence -----------------------------------------------------------

VARIANTS = {
    "fedavg_ft": [],
    "ditto": [],
    "pfedme": ["algorithm.lam=5"],
    "perfedavg": [],
    "perfedavg_hf": ["algorithm.variant=hessian_free"],
    "apfl": [],
    "l2gd": ["algorithm.mix_rate=0.4"],
}


def variant_overrides(key: str) -> list[str]:
    return [f"algorithm.name={key.removesuffix('_hf')}", *VARIANTS[key]]


@pytest.mark.parametrize("key", list(VARIANTS))
def test_engines_agree_and_unsampled_clients_keep_state(key):
    vec = experiment(*variant_overrides(key), "engine.name=vectorized")
    seq = experiment(*variant_overrides(key), "engine.name=sequential")
    for r in range(2):
        before = rows(vec)
        vec.run_round()
        seq.run_round()
        after = rows(vec)
        cohort = vec.sample_cohort(r)
        out = torch.ones(vec.dataset.num_clients, dtype=torch.bool)
        out[cohort] = False
        for k in before:
            for leaf_before, leaf_after in zip(_leaves(before[k]), _leaves(after[k]), strict=True):
                assert torch.equal(leaf_before[out], leaf_after[out]), k
        changed = any(
            not torch.equal(b[cohort], a[cohort])
            for b, a in zip(_leaves(before), _leaves(after), strict=True)
        )
        stateless = not _leaves(before)  # FedAvg-FT, Per-FedAvg: personal = adapt(current w)
        assert changed or stateless, "sampled clients' state did not change"
    assert_close(vec.population, seq.population, rtol=1e-4, atol=1e-5)
    assert_close(rows(vec), rows(seq), rtol=1e-4, atol=1e-5)
    record = vec.evaluate()
    assert record["personal_acc_mean"] == pytest.approx(hand_personal_accuracy(vec), abs=1e-12)


def _leaves(tree):
    if isinstance(tree, dict):
        return [leaf for v in tree.values() for leaf in _leaves(v)]
    return [tree]


# ----- limits and behaviour -----------------------------------------------------------------------


def test_ditto_lam0_is_local():
    local = run(experiment("algorithm.name=local"), 3)
    ditto = run(experiment("algorithm.name=ditto", "algorithm.lam=0"), 3)
    assert_close(rows(ditto)["params"], rows(local)["params"], rtol=0, atol=1e-7)


def test_ditto_large_lam_approaches_global():
    dists, accs = [], []
    for lam in (0.0, 0.3, 3.0, 10.0):
        exp = run(
            experiment(
                "algorithm.name=ditto", f"algorithm.lam={lam}", "cohort.clients_per_round=10"
            ),
            3,
        )
        w = exp.population["global"]
        v = rows(exp)["params"]
        sq = sum(((v[k] - w[k].unsqueeze(0)) ** 2).flatten(1).sum(1) for k in w)
        dists.append(float(sq.sqrt().mean()))
        accs.append(exp.evaluate())
    assert all(a > b for a, b in itertools.pairwise(dists)), dists
    assert dists[-1] < 0.25 * dists[0], dists
    final = accs[-1]  # personal models close to the global model: FedAvg-like accuracy
    assert abs(final["personal_acc_mean"] - final["global_acc_mean"]) < 0.1


def test_pfedme_huge_lam_beta1_is_fedavg():
    fedavg = run(experiment("algorithm.name=fedavg"), 3)
    pfedme = run(
        experiment(
            "algorithm.name=pfedme",
            "algorithm.lam=1000",
            "algorithm.personal_lr=0.001",
            "algorithm.inner_steps=5",
            "algorithm.beta=1",
        ),
        3,
    )
    assert_close(pfedme.population["global"], fedavg.population["global"], rtol=0, atol=2e-3)
    # and β scales the server step: β = 0.5 moves half as far from the same aggregate
    half = experiment(
        "algorithm.name=pfedme",
        "algorithm.beta=0.5",
        "algorithm.lam=1000",
        "algorithm.personal_lr=0.001",
    )
    full = experiment(
        "algorithm.name=pfedme",
        "algorithm.beta=1",
        "algorithm.lam=1000",
        "algorithm.personal_lr=0.001",
    )
    w0 = half.population["global"]
    half.run_round()
    full.run_round()
    step_half = {k: half.population["global"][k] - w0[k] for k in w0}
    step_full = {k: full.population["global"][k] - w0[k] for k in w0}
    assert_close(step_half, {k: 0.5 * v for k, v in step_full.items()}, rtol=1e-4, atol=1e-6)


def test_apfl_alpha_limits():
    local = run(experiment("algorithm.name=local"), 2)
    one = run(
        experiment("algorithm.name=apfl", "algorithm.alpha=1", "algorithm.adaptive_alpha=false"),
        2,
    )
    assert_close(rows(one)["params"], rows(local)["params"], rtol=0, atol=1e-7)
    zero = run(
        experiment("algorithm.name=apfl", "algorithm.alpha=0", "algorithm.adaptive_alpha=false"),
        2,
    )
    glob = zero.evaluate()
    assert glob["personal_acc_mean"] == glob["global_acc_mean"]
    assert glob["personal_loss"] == pytest.approx(glob["global_loss"])
    adaptive = run(experiment("algorithm.name=apfl", "algorithm.alpha_lr=0.5"), 2)
    alphas = rows(adaptive)["alpha"]
    assert ((alphas >= 0) & (alphas <= 1)).all()
    assert not torch.all(alphas == 0.5)  # sampled clients learned their α


def test_l2gd_lam0_is_local_and_server_mixes_personal_models():
    local = run(experiment("algorithm.name=local"), 2)
    l2gd = run(experiment("algorithm.name=l2gd", "algorithm.lam=0"), 2)
    assert_close(rows(l2gd)["params"], rows(local)["params"], rtol=0, atol=1e-7)
    # ρ = 1, uniform weights: after a round w is the mean of the cohort's personal models
    exp = experiment("algorithm.name=l2gd", "algorithm.mix_rate=1")
    exp.run_round()
    cohort = exp.sample_cohort(0)
    x = exp.store.gather(cohort)["params"]
    assert_close(exp.population["global"], {k: t.mean(0) for k, t in x.items()})


def test_fedavg_ft_trains_like_fedavg_and_adapts_from_current_global():
    fedavg = run(experiment("algorithm.name=fedavg"), 2)
    ft = run(experiment("algorithm.name=fedavg_ft"), 2)
    assert_close(ft.population["global"], fedavg.population["global"], rtol=0, atol=0)
    rec = ft.evaluate()
    assert rec["personal_acc_mean"] > rec["global_acc_mean"]
    none = experiment("algorithm.name=fedavg_ft", "algorithm.finetune_steps=0")
    run(none, 2)
    rec0 = none.evaluate()
    assert rec0["personal_acc_mean"] == rec0["global_acc_mean"]


def test_configs_validate_and_list():
    from fedkin.cli.listing import catalog
    from fedkin.config import load_config

    assert set(NAMES) <= set(catalog()["algorithms"])
    for bad in (
        ["algorithm.name=ditto", "algorithm.lam=-1"],
        ["algorithm.name=pfedme", "algorithm.beta=0"],
        ["algorithm.name=perfedavg", "algorithm.variant=second_order"],
        ["algorithm.name=apfl", "algorithm.alpha=1.5"],
        ["algorithm.name=l2gd", "algorithm.mix_rate=0"],
        ["algorithm.name=fedavg_ft", "algorithm.steps=3"],
    ):
        with pytest.raises(ConfigError):
            load_config(None, bad)
    cfg = load_config(None, ["algorithm.name=perfedavg"])
    assert cfg.algorithm.beta is None and cfg.algorithm.adapt_steps == 1
