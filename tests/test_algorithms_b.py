"""AdaPeD, IFCA, FedRep, FedPer, FML and the KD / mixture priors they use."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad
from torch.testing import assert_close

from conftest import tiny_config
from fedkin.algorithms import ALGORITHMS
from fedkin.algorithms.adaped import AdaPeD, AdaPeDConfig
from fedkin.algorithms.bodyhead import head_parameter_names
from fedkin.core.channel import weighted_mean
from fedkin.core.errors import ConfigError
from fedkin.core.priors import (
    distillation_penalty,
    hard_assignment,
    hard_mixture_penalty,
    mixture_penalty,
    mixture_responsibilities,
)
from fedkin.engine import SequentialEngine
from fedkin.experiment import Experiment
from fedkin.models.zoo import CNN, MLP, LogisticRegression
from fedkin.optim import sgd

MINE = ["adaped", "ifca", "fedrep", "fedper", "fml"]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rand_params(model: torch.nn.Module, seed: int, scale: float = 0.5) -> dict:
    g = gen(seed)
    return {n: scale * torch.randn(p.shape, generator=g) for n, p in model.named_parameters()}


def kl_reference(student, teacher, t):
    """T²·mean_b KL(softmax(teacher/T) ‖ softmax(student/T)), written independently."""
    p = torch.softmax(teacher / t, -1)
    return t**2 * (p * (torch.log(p) - torch.log_softmax(student / t, -1))).sum(-1).mean()


# ----- priors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("t", [1.0, 2.5])
def test_kd_penalty_value_gradient_and_zero_at_equality(t):
    g = gen(1)
    zs, zt = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    assert_close(distillation_penalty(zs, zt, t), kl_reference(zs, zt, t))
    assert float(distillation_penalty(zs, zs.clone(), t)) == pytest.approx(0.0, abs=1e-6)
    # ∂/∂z_s = T (softmax(z_s/T) − softmax(z_t/T)) / B ; no gradient to a detached teacher
    gs, gt = grad(lambda a, b: distillation_penalty(a, b, t), argnums=(0, 1))(zs, zt)
    assert_close(gs, t * (torch.softmax(zs / t, -1) - torch.softmax(zt / t, -1)) / 6)
    assert torch.count_nonzero(gt) == 0
    gt_live = grad(lambda b: distillation_penalty(zs, b, t, detach_teacher=False))(zt)
    gt_ref = grad(lambda b: kl_reference(zs, b, t))(zt)
    assert_close(gt_live, gt_ref)


def test_mixture_penalty_gradients_match_closed_forms():
    g = gen(2)
    theta = {"a": torch.randn(3, generator=g), "b": torch.randn(2, 2, generator=g)}
    centers = {"a": torch.randn(4, 3, generator=g), "b": torch.randn(4, 2, 2, generator=g)}
    lam, log_pi = 0.7, torch.log_softmax(torch.randn(4, generator=g), 0)
    r = mixture_responsibilities(theta, centers, lam, log_pi)
    g_soft = grad(lambda th: mixture_penalty(th, centers, lam, log_pi))(theta)
    for k in theta:  # ∇R = Σ_k r_k λ (θ − w_k)
        expected = (r.reshape(-1, *[1] * theta[k].dim()) * lam * (theta[k] - centers[k])).sum(0)
        assert_close(g_soft[k], expected)
    # hard limit: ∇ min_k λ/2‖θ − w_k‖² = λ (θ − w_k*), and the soft prior tends to it
    d2 = torch.stack([((theta[k] - centers[k]) ** 2).flatten(1).sum(1) for k in theta]).sum(0)
    k_star = int(d2.argmin())
    g_hard = grad(lambda th: hard_mixture_penalty(th, centers, lam))(theta)
    for k in theta:
        assert_close(g_hard[k], lam * (theta[k] - centers[k][k_star]))
    assert_close(hard_mixture_penalty(theta, centers, lam), 0.5 * lam * d2.min())
    big = 200.0
    assert_close(
        mixture_penalty(theta, centers, big) - torch.log(torch.tensor(4.0)),
        hard_mixture_penalty(theta, centers, big),
        atol=1e-3,
        rtol=1e-4,
    )
    onehot = hard_assignment(torch.tensor([0.3, -1.0, 2.0, -1.0]))
    assert onehot.tolist() == [0.0, 1.0, 0.0, 0.0]  # argmin, ties to the lowest index


# ----- AdaPeD ------------------------------------------------------------------------------------


def adaped(steps: int = 5, lr: float = 0.1, **cfg) -> tuple[AdaPeD, MLP]:
    model = MLP(4, [8], 3)
    config = AdaPeDConfig(**{"psi_min": 1e-3, **cfg})
    return AdaPeD(config, model, sgd(lr), steps), model


def toy_batch(seed: int = 3, n: int = 10):
    g = gen(seed)
    return torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def stated_objective(model, theta, w, psi, x, y, t, s=1.0):
    """F_i = f_i(θ) + s·[KD(θ‖w)/(2ψ) + ½ log ψ], from scratch (plain autograd, no fedkin)."""
    zt = functional_call(model, theta, (x,))
    zw = functional_call(model, w, (x,))
    prior = kl_reference(zt, zw, t) / (2 * psi) + 0.5 * torch.log(psi)
    return F.cross_entropy(zt, y) + s * prior


@pytest.mark.parametrize("param", ["direct", "log"])
@pytest.mark.parametrize(
    ("direction", "s"), [("mutual", 1.0), ("joint", 1.0), ("none", 1.0), ("mutual", 0.25)]
)
def test_adaped_gradients_equal_autograd_of_stated_objective(param, direction, s):
    t, c = 2.0, 0.7
    alg, model = adaped(
        psi_param=param, global_kd_direction=direction, temperature=t, global_ce_weight=c
    )
    theta, w = rand_params(model, 10), rand_params(model, 11)
    x, y = toy_batch()
    psi = torch.tensor(0.3)
    u = torch.log(psi) if param == "log" else psi.clone()
    g = grad(lambda p: alg.step_objective(p, x, y, s)[0])({"theta": theta, "w": w, "u": u})

    # θ: autograd of F_i (all tensors leaf-requiring-grad, classic torch.autograd)
    th = {k: v.clone().requires_grad_() for k, v in theta.items()}
    ps = psi.clone().requires_grad_()
    ww = {k: v.clone().requires_grad_() for k, v in w.items()}
    obj = stated_objective(model, th, ww, ps, x, y, t, s)
    g_th = torch.autograd.grad(obj, [*list(th.values()), ps, *list(ww.values())])
    for (k, _), gk in zip(th.items(), g_th[: len(th)], strict=True):
        assert_close(g["theta"][k], gk)
    # ψ: autograd of F_i, and the closed form s·(1/(2ψ) − KD/(2ψ²))
    dpsi = g_th[len(th)]
    kd = kl_reference(functional_call(model, theta, (x,)), functional_call(model, w, (x,)), t)
    assert_close(dpsi, s * (1 / (2 * psi) - kd / (2 * psi**2)))
    assert_close(g["u"], dpsi * psi if param == "log" else dpsi)  # chain rule for u = log ψ

    # w: c·∇f_i(w) + the configured KD term
    wl = {k: v.clone().requires_grad_() for k, v in w.items()}
    zw = functional_call(model, wl, (x,))
    zt = functional_call(model, theta, (x,)).detach()
    w_obj = c * F.cross_entropy(zw, y)
    if direction == "mutual":
        w_obj = w_obj + s * kl_reference(zw, zt, t) / (2 * psi)
    elif direction == "joint":  # exactly ∇_w F_i
        w_obj = w_obj + s * kl_reference(zt, zw, t) / (2 * psi)
    g_w = torch.autograd.grad(w_obj, list(wl.values()))
    for k, gk in zip(wl, g_w, strict=True):
        assert_close(g["w"][k], gk)
    if direction == "joint":  # the w-step follows ∇_w F_i exactly (plus c·∇f_i(w))
        g_ce = grad(lambda p: F.cross_entropy(functional_call(model, p, (x,)), y))(w)
        for k, g_f in zip(wl, g_th[len(th) + 1 :], strict=True):
            assert_close(g["w"][k] - c * g_ce[k], g_f)


def test_adaped_kd_term_vanishes_when_theta_equals_w():
    alg, model = adaped()
    w = rand_params(model, 12)
    x, y = toy_batch()
    params = {"theta": w, "w": w, "u": torch.tensor(0.0)}
    g = grad(lambda p: alg.step_objective(p, x, y)[0])(params)
    g_ce = grad(lambda p: F.cross_entropy(functional_call(model, p, (x,)), y))(w)
    for k in w:  # the KD term adds nothing at θ = w: θ's gradient is the plain CE gradient
        assert_close(g["theta"][k], g_ce[k])
    assert float(alg.kd(alg.logits(w, x), alg.logits(w, x))) == pytest.approx(0.0, abs=1e-6)
    assert_close(g["u"], torch.tensor(0.5))  # ∂F/∂log ψ = ½ − KD/(2ψ) = ½


def run_psi_only(alg, model, theta, w, psi0):
    """AdaPeD's client update with model learning rate 0: only ψ moves (θ, w fixed)."""
    x, y = toy_batch(n=12)
    batches = (x.unsqueeze(0), y.unsqueeze(0))
    population = {"global": w, "psi": torch.tensor(psi0)}
    client = {"theta": theta, "opt": {}, "seen": torch.ones(())}
    msg, _, metrics = alg.client_update(population, client, batches, {})
    return float(psi0 + msg["psi_delta"]), float(metrics["psi"]), float(metrics["kd"])


@pytest.mark.parametrize("param", ["direct", "log"])
def test_adaped_psi_moves_to_its_fixed_point_and_stays_bounded(param):
    _, model = adaped()
    theta, w = rand_params(model, 13, 1.0), rand_params(model, 14, 1.0)
    x, _ = toy_batch(n=12)

    def alg(**cfg):
        return adaped(steps=cfg.pop("steps", 25), lr=0.0, psi_param=param, **cfg)[0]

    kd = float(alg().kd(alg().logits(theta, x), alg().logits(w, x)))
    assert 0.2 < kd < 4.0
    below, above = kd / 2, kd * 2
    one_step = alg(steps=1, psi_lr=1e-3, psi_max=10.0)
    assert run_psi_only(one_step, model, theta, w, below)[0] > below  # KD > ψ: ψ grows
    assert run_psi_only(one_step, model, theta, w, above)[0] < above  # KD < ψ: ψ shrinks
    # step = 1/(2·curvature) at ψ*, where the curvature is ½ for log ψ and 1/(2KD²) for ψ
    lr = 1.0 if param == "log" else kd**2
    for start in (below, above):  # fixed point ψ* = KD
        psi, psi_metric, kd_metric = run_psi_only(
            alg(psi_lr=lr, psi_max=10.0), model, theta, w, start
        )
        assert psi == pytest.approx(kd, rel=1e-4)
        assert psi_metric == pytest.approx(psi) and kd_metric == pytest.approx(kd, rel=1e-5)
    # bounds: KD = 0 (θ = w) drives ψ down to psi_min, a huge KD up to psi_max, never beyond
    assert run_psi_only(alg(psi_lr=lr), model, w, w, 0.5)[0] == pytest.approx(1e-3, rel=1e-4)
    far = rand_params(model, 15, 8.0)
    capped = alg(psi_lr=lr, psi_max=0.2, psi_init=0.1)
    assert run_psi_only(capped, model, far, w, 0.1)[0] == pytest.approx(0.2, rel=1e-6)


def test_adaped_config_and_round_metrics():
    with pytest.raises(ValueError):
        AdaPeDConfig(psi_init=1e3)
    e = Experiment(tiny_config("algorithm.name=adaped", "cohort.clients_per_round=4"))
    cohort = e.sample_cohort(0)
    before = float(e.population["psi"])
    e.run_round()
    psi = e.population["psi"]
    assert 1e-3 <= float(psi) <= 1e2 and float(psi) != before
    seen = e.store.gather(torch.arange(20))["seen"]
    assert seen[cohort].eq(1).all() and int(seen.sum()) == 4


def adaped_limit_run(*extra: str, rounds: int = 6) -> Experiment:
    """AdaPeD (or ``extra``'s algorithm) on the two-task split, every client in every round."""
    e, _ = two_group_experiment("algorithm.name=adaped", f"rounds={rounds}", *extra)
    for _ in range(rounds):
        e.run_round()
    return e


def personal_models(e: Experiment) -> dict:
    states = e.store.gather(torch.arange(e.dataset.num_clients))
    return states["theta"] if "theta" in states else states["params"]


def held_out_kd_to_global(e: Experiment) -> float:
    """Mean over clients of KD(θ_i ‖ w) on the client's *test* inputs (never trained on)."""
    alg, w, out = e.algorithm, e.population["global"], []
    for i in range(e.dataset.num_clients):
        x, _ = e.dataset.client_test(i)
        theta = {k: v[i] for k, v in personal_models(e).items()}
        out.append(float(alg.kd(alg.logits(theta, x), alg.logits(w, x))))
    return sum(out) / len(out)


def max_gap(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


PINNED = ("algorithm.psi_lr=0", "algorithm.psi_min=1e-3")  # ψ fixed at psi_init


def test_adaped_psi_to_infinity_is_local():
    """ψ → ∞ removes the prior from θ's gradient: θ_i follows Local's trajectory exactly."""
    local = adaped_limit_run("algorithm.name=local")
    far = adaped_limit_run(*PINNED, "algorithm.psi_init=1e8", "algorithm.psi_max=1e8")
    assert max_gap(personal_models(far), personal_models(local)) < 1e-5
    assert far.evaluate()["personal_acc_mean"] == local.evaluate()["personal_acc_mean"]


def test_adaped_psi_to_zero_tracks_global_and_learned_psi_is_in_between():
    """Small pinned ψ glues θ_i to w (held-out KD to w far below Local's); the learned ψ on a
    two-task split gives a personal model measurably different from both limits."""
    local = adaped_limit_run("algorithm.name=local")
    far = adaped_limit_run(*PINNED, "algorithm.psi_init=1e8", "algorithm.psi_max=1e8")
    kd_local = held_out_kd_to_global(far)
    near = adaped_limit_run(*PINNED, "algorithm.psi_init=0.01")
    mid = adaped_limit_run(*PINNED, "algorithm.psi_init=0.3")
    kd_near, kd_mid = held_out_kd_to_global(near), held_out_kd_to_global(mid)
    assert kd_near < 0.05 * kd_local and kd_near < kd_mid < kd_local
    learned = adaped_limit_run()  # the defaults: ψ learned, prior weight 1
    # measured: gap 0.025 (0.0011 with the old prior_scale=per_sample, which tied Local's accuracy)
    assert max_gap(personal_models(learned), personal_models(local)) > 0.01
    assert 10 * kd_near < held_out_kd_to_global(learned) < 0.8 * kd_local
    assert float(learned.population["psi"]) != 1.0  # ψ moved off psi_init = 1


# ----- IFCA --------------------------------------------------------------------------------------


def test_ifca_with_one_cluster_is_fedavg():
    fed = Experiment(tiny_config("algorithm.name=fedavg", "rounds=3"))
    ifca = Experiment(tiny_config("algorithm.name=ifca", "algorithm.num_clusters=1", "rounds=3"))
    for _ in range(3):
        fed.run_round()
        ifca.run_round()
    for k, v in fed.population["global"].items():
        assert_close(ifca.population["clusters"][k][0], v, rtol=1e-6, atol=1e-7)
    assert_close(ifca.evaluate()["personal_acc_mean"], fed.evaluate()["personal_acc_mean"])


def test_ifca_init_is_deterministic_and_distinct():
    cfg = tiny_config("algorithm.name=ifca", "algorithm.num_clusters=3")
    a, b = Experiment(cfg), Experiment(cfg)
    for k, v in a.population["clusters"].items():
        assert torch.equal(v, b.population["clusters"][k])
        assert_close(v[0], dict(a.model.named_parameters())[k])
        assert not torch.equal(v[1], v[2]) and not torch.equal(v[0], v[1])
    p = Experiment(tiny_config("algorithm.name=ifca", "algorithm.init=perturb"))
    w = p.population["clusters"]["net.0.weight"]
    assert 0 < float((w[1] - w[0]).std()) < 0.02


def two_group_experiment(*extra: str) -> tuple[Experiment, torch.Tensor]:
    """10 iid digits clients; clients 5–9 see every label mapped y → 9 − y (a different task)."""
    e = Experiment(
        tiny_config(
            "data.num_clients=10",
            "cohort.clients_per_round=10",
            "client.local_steps=5",
            "client.batch_size=16",
            "model.hidden=[32]",
            *extra,
        )
    )
    ds = e.dataset
    group = (torch.arange(10) >= 5).long()
    y = ds.y.clone()
    for table in (ds.train_index, ds.test_index):
        rows = table[5:][table[5:] >= 0]
        y[rows] = 9 - ds.y[rows]
    e.dataset = dataclasses.replace(ds, y=y)
    return e, group


def test_ifca_separates_two_groups():
    e, group = two_group_experiment("algorithm.name=ifca", "algorithm.num_clusters=2", "rounds=15")
    for _ in range(15):
        e.run_round()
    chosen = e.store.gather(torch.arange(10))["assign"].argmax(1)
    assert len(set(chosen[group == 0].tolist())) == 1
    assert len(set(chosen[group == 1].tolist())) == 1
    assert chosen[0] != chosen[9]


def test_ifca_unchosen_cluster_stays_unchanged():
    e = Experiment(tiny_config("algorithm.name=ifca", "algorithm.num_clusters=3"))
    before = {k: v.clone() for k, v in e.population["clusters"].items()}
    e.run_round()
    used = set(e.store.gather(e.sample_cohort(0))["assign"].argmax(1).tolist())
    for k in range(3):
        same = all(torch.equal(v[k], before[n][k]) for n, v in e.population["clusters"].items())
        assert same == (k not in used)


def test_ifca_client_never_sampled_takes_its_lowest_training_loss_cluster():
    """IFCA (Ghosh et al. 2020) assigns a client the cluster whose model has the lowest loss on
    its training data. Three constant-logit cluster models, each betting on a different class
    set, make the best cluster differ across clients (mostly not cluster 0); an untrained
    client must be evaluated with it, a trained one with its last chosen cluster."""
    e = Experiment(
        tiny_config(
            "algorithm.name=ifca",
            "algorithm.num_clusters=3",
            "data.partition.name=pathological",
            "data.partition.classes_per_client=1",
            "client.local_steps=2",
            "client.batch_size=64",  # the evaluation batches cover each client's training data
        )
    )
    sets = [(0, 1, 2), (3, 4, 5, 6), (7, 8, 9)]
    clusters = {k: torch.zeros_like(v) for k, v in e.population["clusters"].items()}
    last_bias = [k for k in clusters if k.endswith("bias")][-1]
    for j, classes in enumerate(sets):
        clusters[last_bias][j, list(classes)] = 5.0
    e.population = {"clusters": clusters}
    ds, alg = e.dataset, e.algorithm
    n = ds.num_clients
    expected = torch.empty(n, dtype=torch.long)
    for i in range(n):
        x, y = ds.client_train(i)
        expected[i] = torch.stack(
            [alg.data_loss(alg.cluster(clusters, j), x, y) for j in range(3)]
        ).argmin()
    assert (expected != 0).sum() >= n // 2 and len(set(expected.tolist())) == 3

    states = e.eval_states(alg, torch.arange(n), e.population, 0, e.store.gather(torch.arange(n)))
    assert torch.equal(states["assign"].argmax(1), expected)
    assert torch.equal(states["assign"].sum(1), torch.ones(n))
    # the evaluation record uses these clusters: accuracy of the expected cluster's model
    record = e.evaluate()
    want = []
    for i in range(n):
        x, y = ds.client_test(i)
        pred = alg.logits(alg.cluster(clusters, int(expected[i])), x).argmax(-1)
        want.append(float((pred == y).to(torch.float64).mean()))
    assert record["personal_acc_mean"] == pytest.approx(sum(want) / n, abs=1e-12)
    # a client that trained keeps the cluster it chose, whatever its loss says now
    trained = {"assign": torch.tensor([[1.0, 0.0, 0.0]])}
    i = int(torch.nonzero(expected != 0)[0])
    kept = e.eval_states(alg, torch.tensor([i]), e.population, 0, trained)
    assert torch.equal(kept["assign"], trained["assign"])


# ----- FedRep / FedPer ---------------------------------------------------------------------------


def test_head_is_last_linear_layer_or_named():
    assert head_parameter_names(MLP(4, [8, 6], 3), None) == ["net.4.weight", "net.4.bias"]
    assert head_parameter_names(CNN((1, 8, 8), [2], 5, 3), None) == ["head.3.weight", "head.3.bias"]
    assert head_parameter_names(MLP(4, [8], 3), ["net.0"]) == ["net.0.weight", "net.0.bias"]
    with pytest.raises(ConfigError, match="unknown module"):
        head_parameter_names(MLP(4, [8], 3), ["net.9"])
    with pytest.raises(ConfigError, match="no shared body"):
        head_parameter_names(LogisticRegression(4, 3), None)


def heads(e: Experiment) -> dict:
    return e.store.gather(torch.arange(e.dataset.num_clients))["head"]


@pytest.mark.parametrize("name", ["fedrep", "fedper"])
def test_body_averaged_heads_personal_and_persistent(name):
    e = Experiment(
        tiny_config(f"algorithm.name={name}", "data.num_clients=10", "cohort.clients_per_round=4")
    )
    alg, ds, cfg = e.algorithm, e.dataset, e.config
    body0 = {k: v.clone() for k, v in e.population["body"].items()}
    assert set(body0).isdisjoint(alg.head_names)
    heads0 = {k: v.clone() for k, v in heads(e).items()}
    cohort = e.sample_cohort(0)
    states = e.store.gather(cohort)
    batches = ds.sample_train_batches(
        cohort, e.stream.child("batches"), 0, cfg.client.local_steps, cfg.client.batch_size
    )
    n = ds.train_sizes[cohort].float()
    ctx = {"client_id": cohort, "num_samples": n, "round": torch.zeros_like(cohort)}
    msgs, new_states, _ = SequentialEngine().map(
        alg.client_update, (e.population, states, batches, ctx), (None, 0, 1, 0)
    )
    assert set(msgs) == {"delta"} and set(msgs["delta"]) == set(body0)  # heads never sent
    e.run_round()
    mean = weighted_mean(msgs["delta"], n)
    for k, v in e.population["body"].items():  # φ ← φ + Σ p_i Δφ_i
        assert_close(v, body0[k] + mean[k])
    others = torch.tensor([i for i in range(10) if i not in cohort.tolist()])
    for k, h in heads(e).items():
        assert_close(h[cohort], new_states["head"][k])  # cohort heads updated …
        assert not torch.equal(h[cohort], heads0[k][cohort])
        assert torch.equal(h[others], heads0[k][others])  # … the others untouched
    for _ in range(2):  # heads of unsampled clients persist across later rounds too
        c = e.sample_cohort(e.round)
        snap = {k: v.clone() for k, v in heads(e).items()}
        e.run_round()
        keep = torch.tensor([i for i in range(10) if i not in c.tolist()])
        for k, h in heads(e).items():
            assert torch.equal(h[keep], snap[k][keep])


def test_fedrep_phases_touch_only_their_part():
    e = Experiment(tiny_config("algorithm.name=fedrep", "algorithm.body_steps=0"))
    body0 = {k: v.clone() for k, v in e.population["body"].items()}
    e.run_round()  # no body steps: the body stays, heads move
    assert all(torch.equal(v, body0[k]) for k, v in e.population["body"].items())
    e = Experiment(tiny_config("algorithm.name=fedrep", "algorithm.head_steps=0"))
    heads0 = {k: v.clone() for k, v in heads(e).items()}
    e.run_round()  # no head steps: heads stay, the body moves
    assert all(torch.equal(v, heads0[k]) for k, v in heads(e).items())
    assert not all(torch.equal(v, body0[k]) for k, v in e.population["body"].items())


# ----- FML ---------------------------------------------------------------------------------------


def test_fml_gradients_are_mutual_learning_gradients():
    model = MLP(4, [8], 3)
    alg = ALGORITHMS["fml"](
        ALGORITHMS["fml"].Config(alpha=0.3, beta=0.8, temperature=1.5), model, sgd(0.1), 2
    )
    v, w = rand_params(model, 20), rand_params(model, 21)
    x, y = toy_batch()
    g = grad(lambda p: alg.step_objective(p, x, y)[0])({"v": v, "w": w})
    zv, zw = functional_call(model, v, (x,)), functional_call(model, w, (x,))
    gv = grad(
        lambda p: (
            0.3 * F.cross_entropy(functional_call(model, p, (x,)), y)
            + 0.7 * kl_reference(functional_call(model, p, (x,)), zw, 1.5)
        )
    )(v)
    gw = grad(
        lambda p: (
            0.8 * F.cross_entropy(functional_call(model, p, (x,)), y)
            + 0.2 * kl_reference(functional_call(model, p, (x,)), zv, 1.5)
        )
    )(w)
    for k in v:
        assert_close(g["v"][k], gv[k])
        assert_close(g["w"][k], gw[k])


# ----- all five: registry, engines ---------------------------------------------------------------


@pytest.mark.parametrize("name", MINE)
def test_vectorized_equals_sequential(name):
    runs = []
    for engine in ("vectorized", "sequential"):
        e = Experiment(
            tiny_config(
                f"algorithm.name={name}",
                f"engine.name={engine}",
                "data.num_clients=8",
                "cohort.clients_per_round=4",
                "data.partition.name=dirichlet",
                "data.partition.alpha=0.5",
            )
        )
        recs = [e.run_round() for _ in range(2)]
        runs.append((e, recs, e.evaluate()))
    (a, ra, ea), (b, rb, eb) = runs
    assert_close(a.population, b.population, rtol=1e-5, atol=1e-6)
    rows = torch.arange(8)
    assert_close(a.store.gather(rows), b.store.gather(rows), rtol=1e-5, atol=1e-6)
    for x, y in zip(ra, rb, strict=True):
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-5)
    assert ea["personal_acc_mean"] == pytest.approx(eb["personal_acc_mean"])


def test_registered_with_documented_options():
    for name in MINE:
        cls = ALGORITHMS[name]
        assert cls.Config().name == name and cls.Config.__doc__
        for key, field in cls.Config.model_fields.items():
            assert key == "name" or field.description, (name, key)
        with pytest.raises(ValueError):
            cls.Config(bogus=1)
    with pytest.raises(ConfigError, match="head_layers"):
        Experiment(tiny_config("algorithm.name=fedrep", "algorithm.head_layers=[nope]"))
