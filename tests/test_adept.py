"""ADEPT-PCA / ADEPT-AE (arXiv 2402.12537) on the linear-Gaussian model, where each client's
true subspace span(W_i) is known; the σ update's stationary point; engines and resume."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_config
from fedkin.algorithms.adept import AdeptAe, polar_retract, qr_retract
from fedkin.config import load_config
from fedkin.core.errors import ConfigError
from fedkin.core.tree import tree_leaves, tree_map
from fedkin.data.linear_gaussian import client_decoders
from fedkin.experiment import Experiment
from fedkin.models.linear import PcaProjector
from fedkin.optim import SgdConfig

RANK = 5
# 10 clients with 10 noisy samples each in d = 64, decoders perturbed by 0.04 around a shared
# one: local PCA lacks samples, global PCA ignores the perturbation.
DATA = [
    "data.name=linear-gaussian",
    "data.num_clients=10",
    "data.noise_std=0.05",
    "data.perturbation_std=0.04",
    "data.decoder_bias=false",
    "cohort.clients_per_round=10",
    "client.local_steps=10",
    "client.batch_size=10",
    "client.optimizer.lr=0.02",
]
ADEPT = [
    "algorithm.sigma_init=0.05",
    "algorithm.sigma_lr=1e-4",
    "algorithm.warmup_rounds=25",
    "algorithm.theta_clip=100",
    "algorithm.mu_clip=100",
    "algorithm.mu_lr=0.05",
]


def experiment(*overrides: str) -> Experiment:
    return Experiment(load_config(None, [*DATA, *overrides]))


def subspace_error(u: torch.Tensor, w: torch.Tensor) -> float:
    """‖θ‖₂ of the principal angles θ between span(u) and span(w)."""
    qu, _ = torch.linalg.qr(u.to(torch.float64))
    qw, _ = torch.linalg.qr(w.to(torch.float64))
    cosines = torch.linalg.svdvals(qw.T @ qu).clamp(max=1.0)
    return float(torch.arccos(cosines).norm())


def top_subspace(x: torch.Tensor) -> torch.Tensor:
    """The top-RANK right singular vectors of the (uncentred) sample matrix: PCA."""
    return torch.linalg.svd(x.to(torch.float64), full_matrices=False).Vh[:RANK].T


def train(exp: Experiment, rounds: int) -> None:
    for _ in range(rounds):
        exp.run_round()


def basis(params) -> torch.Tensor:
    return params["basis"] if "basis" in params else params["decoder.weight"]


def test_adept_pca_subspace_error_beats_local_and_global_pca():
    exp = experiment("model.name=pca", f"model.rank={RANK}", "algorithm.name=adept-pca", *ADEPT)
    train(exp, 50)
    ds, truth = exp.dataset, client_decoders(exp.config.data, exp.config.seed)
    pooled = top_subspace(torch.cat([ds.client_train(i)[0] for i in range(ds.num_clients)]))
    adept, local, global_ = [], [], []
    for i in range(ds.num_clients):
        u = exp.personal_params(i)["basis"]
        assert torch.allclose(u.T @ u, torch.eye(RANK), atol=1e-5)  # on St(d, k)
        adept.append(subspace_error(u, truth[i]))
        local.append(subspace_error(top_subspace(ds.client_train(i)[0]), truth[i]))
        global_.append(subspace_error(pooled, truth[i]))
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    assert mean(adept) < 0.9 * min(mean(local), mean(global_)), (adept, local, global_)
    mu = exp.population["global"]["basis"]
    assert torch.allclose(mu.T @ mu, torch.eye(RANK), atol=1e-5)  # server re-orthonormalizes


def test_linear_autoencoder_agrees_with_pca():
    """Without collaboration (σ huge and fixed) ADEPT-AE's bias-free linear AE and ADEPT-PCA
    both find each client's top principal subspace of its training data."""
    local = [
        "algorithm.sigma_init=100",
        "algorithm.sigma_lr=0",
        "client.local_steps=20",
        "client.optimizer.name=adam",
        "client.optimizer.lr=0.01",
    ]
    runs = {
        "ae": experiment(
            "model.name=linear-ae",
            f"model.latent={RANK}",
            "model.bias=false",
            "algorithm.name=adept-ae",
            "algorithm.theta_clip=100",
            *local,
        ),
        "pca": experiment(
            "model.name=pca",
            f"model.rank={RANK}",
            "algorithm.name=adept-pca",
            "algorithm.theta_clip=100",
            *local,
        ),
    }
    for exp in runs.values():
        train(exp, 30)
    ds = runs["ae"].dataset
    for i in range(ds.num_clients):
        pca = top_subspace(ds.client_train(i)[0])
        for name, exp in runs.items():
            assert subspace_error(basis(exp.personal_params(i)), pca) < 0.1, (name, i)


@pytest.mark.parametrize("alpha", [-1.0, 0.0])
def test_sigma_update_reaches_its_stationary_point(alpha):
    """Fixed θ_i and μ, σ stepped at sync steps and averaged by the server:
    σ² → (2β + mean_i (θ_i − μ)²)/(2α + 3) (= 2β + mean (θ − μ)² for α = −1)."""
    torch.manual_seed(0)
    beta = 1e-3
    cfg = AdeptAe.Config(sigma_init=1.0, sigma_lr=0.01, alpha=alpha, beta=beta)
    alg = AdeptAe(cfg, PcaProjector(6, 2), SgdConfig(lr=0.1).build(), 1)
    pop = alg.init_population(alg.initial_params())
    mu = pop["global"]
    # offsets of size 0.3..0.6 per coordinate: every σ_k* ≥ 0.17, so the step size 0.01 is stable
    offset = lambda t: 0.3 * torch.randn_like(t).sign() * (1 + torch.rand_like(t))  # noqa: E731
    thetas = [tree_map(lambda t: t + offset(t), mu) for _ in range(4)]
    round_ = torch.tensor(0)
    for _ in range(500):
        sigmas = [alg.sigma_step(t, mu, pop["sigma"], round_) for t in thetas]
        deltas = [tree_map(torch.sub, s, pop["sigma"]) for s in sigmas]
        mean_delta = tree_map(lambda *d: torch.stack(d).mean(0), *deltas)
        pop = {**pop, "sigma": tree_map(lambda s, d: s + d, pop["sigma"], mean_delta)}
    spread = torch.stack([t["basis"] - mu["basis"] for t in thetas]).pow(2).mean(0)
    expected = (2 * beta + spread) / (2 * alpha + 3)
    assert torch.allclose(pop["sigma"]["basis"] ** 2, expected, rtol=1e-4)


def test_sigma_is_frozen_during_warmup_and_clamped():
    cfg = AdeptAe.Config(sigma_init=1e-3, sigma_lr=10.0, warmup_rounds=2)
    alg = AdeptAe(cfg, PcaProjector(6, 2), SgdConfig(lr=0.1).build(), 1)
    pop = alg.init_population(alg.initial_params())
    far = tree_map(lambda t: t + 1e3, pop["global"])
    frozen = alg.sigma_step(far, pop["global"], pop["sigma"], torch.tensor(1))
    assert torch.equal(frozen["basis"], pop["sigma"]["basis"])
    moved = alg.sigma_step(far, pop["global"], pop["sigma"], torch.tensor(2))
    assert torch.equal(moved["basis"], torch.full_like(moved["basis"], 1e2))  # clamped above


@pytest.mark.parametrize("retract", [qr_retract, polar_retract])
def test_retractions_land_on_the_stiefel_manifold_and_fix_it(retract):
    u = torch.randn(8, 3, dtype=torch.float64)
    q = retract(u)
    assert torch.allclose(q.T @ q, torch.eye(3, dtype=torch.float64))
    assert subspace_error(q, u) < 1e-6
    assert torch.allclose(retract(q), q)


def test_adept_rejects_models_it_cannot_train():
    with pytest.raises(ConfigError, match="'adept-pca' needs a model whose parameters"):
        experiment("model.name=linear-ae", "algorithm.name=adept-pca")
    with pytest.raises(ConfigError, match="'adept-ae' learns reconstructions"):
        experiment("model.name=mlp", "algorithm.name=adept-ae")


@pytest.mark.parametrize("name", ["adept-pca", "adept-ae"])
def test_vectorized_equals_sequential(name):
    model = ["model.name=pca"] if name == "adept-pca" else ["model.name=linear-ae"]
    runs = [
        experiment(
            *model,
            f"algorithm.name={name}",
            *ADEPT,
            "algorithm.warmup_rounds=1",
            "cohort.clients_per_round=4",
            f"engine.name={engine}",
        )
        for engine in ("vectorized", "sequential")
    ]
    for exp in runs:
        train(exp, 3)
    vec, seq = runs
    for a, b in zip(tree_leaves(vec.population), tree_leaves(seq.population), strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    rows = torch.arange(vec.dataset.num_clients)
    for a, b in zip(
        tree_leaves(vec.groups[0].store.gather(rows)),
        tree_leaves(seq.groups[0].store.gather(rows)),
        strict=True,
    ):
        assert torch.allclose(a, b, atol=1e-6)
    assert vec.evaluate()["personal_mse"] == pytest.approx(seq.evaluate()["personal_mse"])


def test_resume_is_bit_identical(tmp_path):
    over = [
        "model.name=pca",
        "algorithm.name=adept-pca",
        *ADEPT,
        "algorithm.warmup_rounds=1",
        "cohort.clients_per_round=4",
    ]
    straight = experiment(*over)
    train(straight, 4)
    first = experiment(*over)
    train(first, 2)
    first.save_checkpoint(tmp_path)
    resumed = experiment(*over)
    resumed.load_checkpoint(tmp_path)
    train(resumed, 2)
    rows = torch.arange(straight.dataset.num_clients)
    pairs = [
        (straight.population, resumed.population),
        (straight.groups[0].store.gather(rows), resumed.groups[0].store.gather(rows)),
    ]
    for x, y in pairs:
        for a, b in zip(tree_leaves(x), tree_leaves(y), strict=True):
            assert torch.equal(a, b)
    drop = lambda r: {k: v for k, v in r.items() if not k.endswith("_s")}  # noqa: E731
    assert drop(straight.evaluate()) == drop(resumed.evaluate())


def test_classification_keeps_its_metric_names():
    exp = Experiment(tiny_config("rounds=1"))
    exp.run_round()
    record = exp.evaluate()
    assert "personal_acc_mean" in record and "personal_loss" in record
    assert not any("energy" in k or "mse" in k for k in record)


@pytest.mark.parametrize("name", ["local", "fedavg"])
def test_a_reconstruction_model_makes_any_algorithm_reconstruct(name):
    adam = ["client.optimizer.name=adam", "client.optimizer.lr=0.01"]
    exp = experiment("model.name=pca", f"model.rank={RANK}", f"algorithm.name={name}", *adam)
    first = exp.evaluate()
    train(exp, 3)
    record = exp.evaluate()
    assert record["personal_mse"] < first["personal_mse"]
    assert 0 < record["personal_energy_mean"] <= 1
