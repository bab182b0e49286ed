"""Issue #14, unsupervised side: ADEPT's prior and server step against independent oracles,
one-class-per-client data with a nested training cap, `fedkin compare` on reconstruction runs
and `fedkin bench generative`."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from fedkin.algorithms.adept import AdeptPca, clip_inf, qr_retract
from fedkin.algorithms.base import ServerStep
from fedkin.bench import generative as G
from fedkin.config import load_config
from fedkin.core.errors import ConfigError, DataError
from fedkin.core.priors import gaussian_inverse_gamma_penalty
from fedkin.core.tree import tree_map
from fedkin.data import build_dataset
from fedkin.models.linear import PcaProjector
from fedkin.optim import SgdConfig

ONE_CLASS = [
    "data.name=digits",
    "data.num_clients=20",
    "data.partition.name=pathological",
    "data.partition.classes_per_client=1",
]


def test_prior_is_the_negative_log_posterior_of_normal_and_inverse_gamma():
    """R(θ, σ) = −log N(θ; μ, σ²) − log InvGamma(σ²; α, β) + const (torch.distributions),
    checked through differences so that the constant cancels."""
    alpha, beta = 2.0, 0.5
    mu = {"w": torch.randn(4, 3, dtype=torch.float64)}

    def nll(theta, sigma):
        normal = torch.distributions.Normal(mu["w"], sigma["w"]).log_prob(theta["w"]).sum()
        ig = torch.distributions.InverseGamma(torch.tensor(alpha), torch.tensor(beta))
        return -(normal + ig.log_prob(sigma["w"] ** 2).sum())

    draws = [
        ({"w": torch.randn(4, 3, dtype=torch.float64)}, {"w": 0.2 + torch.rand(4, 3).double()})
        for _ in range(3)
    ]
    ours = [gaussian_inverse_gamma_penalty(t, mu, s, alpha, beta) for t, s in draws]
    ref = [nll(t, s) for t, s in draws]
    for j in (1, 2):
        assert torch.allclose(ours[j] - ours[0], ref[j] - ref[0])


def test_clients_pull_mu_toward_theta_and_the_server_averages_mu_and_sigma():
    """One round of two ADEPT-PCA clients: each μ_i moves toward its θ_i by
    μ_i ← μ_i − η_μ·clip∞(2(μ_i − θ_i)); the server's μ is the re-orthonormalized mean of the
    μ_i and its σ the mean of the σ_i."""
    torch.manual_seed(0)
    cfg = AdeptPca.Config(sigma_init=0.5, sigma_lr=0.01, mu_lr=0.1, mu_clip=100, theta_clip=100)
    alg = AdeptPca(cfg, PcaProjector(6, 2), SgdConfig(lr=0.05).build(), 1)
    pop = alg.init_population(alg.initial_params())
    mu = pop["global"]
    ctx = {"round": torch.tensor(0), "num_samples": torch.tensor(8.0)}
    messages, mus, sigmas = [], [], []
    for _ in range(2):
        x = torch.randn(1, 8, 6) * torch.linspace(0.2, 2, 6)
        client = alg.init_client(pop)
        msg, new, _ = alg.client_update(pop, client, (x, torch.zeros(1, 8)), ctx)
        theta = new["params"]
        pull = clip_inf(tree_map(lambda m, t: 2 * (m - t), mu, theta), cfg.mu_clip)
        expected = tree_map(lambda m, d: m - cfg.mu_lr * d, mu, pull)
        mu_i = tree_map(torch.add, mu, msg["delta"])
        assert torch.allclose(mu_i["basis"], expected["basis"], atol=1e-6)
        assert (mu_i["basis"] - theta["basis"]).norm() < (mu["basis"] - theta["basis"]).norm()
        messages.append(msg)
        mus.append(mu_i["basis"])
        sigmas.append(pop["sigma"]["basis"] + msg["sigma_delta"]["basis"])
    mean = tree_map(lambda *m: torch.stack(m).mean(0), *messages)
    new_pop = alg.population_update(pop, mean, ServerStep(SgdConfig(lr=1.0).build()))
    assert torch.allclose(new_pop["global"]["basis"], qr_retract(sum(mus) / 2), atol=1e-6)
    assert torch.allclose(new_pop["sigma"]["basis"], sum(sigmas) / 2)
    assert not torch.allclose(new_pop["sigma"]["basis"], pop["sigma"]["basis"])


def test_one_class_per_client_with_a_nested_training_cap():
    full = build_dataset(load_config(None, ONE_CLASS).data, 0)
    caps = {}
    for n in (5, 10):
        ds = build_dataset(load_config(None, [*ONE_CLASS, f"data.train_per_client={n}"]).data, 0)
        assert ds.train_sizes.tolist() == [n] * 20
        assert torch.equal(ds.test_index, full.test_index)  # the test split is unchanged
        caps[n] = ds
    for i in range(20):
        assert len(caps[10].client_train(i)[1].unique()) == 1  # one class per client
        small, big = (set(caps[n].train_index[i, :n].tolist()) for n in (5, 10))
        assert small < big <= set(full.train_index[i, : full.train_sizes[i]].tolist())
    labels = {int(full.client_train(i)[1][0]) for i in range(20)}
    assert labels == set(range(10))  # every class has clients


def test_bad_one_class_settings_name_the_key():
    with pytest.raises(DataError, match=r"data\.train_per_client: 500 exceeds .* allowed: 1\.\."):
        build_dataset(load_config(None, [*ONE_CLASS, "data.train_per_client=500"]).data, 0)
    with pytest.raises(ConfigError, match=r"data\.train_per_client"):
        load_config(None, [*ONE_CLASS, "data.train_per_client=0"])
    with pytest.raises(DataError, match=r"data\.num_clients"):
        cfg = load_config(None, [*ONE_CLASS, "data.num_clients=5", "cohort.clients_per_round=5"])
        build_dataset(cfg.data, 0)


def test_matching_k_interpolates_and_reports_not_reached():
    ks = [1.0, 2.0, 4.0]
    assert G.matching_k(ks, [0.5, 0.3, 0.1], 0.2) == pytest.approx(3.0)
    assert G.matching_k(ks, [0.5, 0.3, 0.1], 0.6) == 1.0
    assert G.matching_k(ks, [0.5, 0.3, 0.1], 0.05) is None


def _args(table: str) -> argparse.Namespace:
    quick = ["rounds=4", "data.num_clients=6", "cohort.clients_per_round=6"]
    return argparse.Namespace(
        table=table, datasets=["linear-gaussian"], seeds=1, overrides=quick, json=True
    )


def test_bench_table1_rows_and_exact_pca_baselines():
    rows = G.table1(_args("table1"))
    keys = {"table", "method", "dataset", "metric", "value", "std", "trainable_params"}
    assert all(set(r) == keys for r in rows)
    methods = {r["method"] for r in rows}
    assert methods == {"adept-pca", "adept-ae", "local-ae", "fedavg-ae", "local-pca", "global-pca"}
    value = {(r["method"], r["metric"]): r["value"] for r in rows}
    assert {r["trainable_params"] for r in rows if r["method"].endswith("pca")} == {64 * 5}
    for method in methods:
        assert 0 < value[(method, "energy_captured")] <= 1
        assert value[(method, "test_mse")] > 0


def test_bench_generative_cli_json(capsys):
    from fedkin.cli.main import main

    over = ["rounds=2", "data.num_clients=4", "cohort.clients_per_round=4", "data.train_samples=20"]
    code = main(
        [
            "bench",
            "generative",
            "--table",
            "amplification",
            "--datasets",
            "linear-gaussian",
            "--seeds",
            "1",
            "--set",
            *over,
            "data.train_per_client=2",
            "--json",
        ]
    )
    assert code == 0
    rows = json.loads(capsys.readouterr().out)
    local = [r for r in rows if r["method"].startswith("local-pca") and r["metric"] == "test_mse"]
    assert len(local) == len(G.K_GRID)
    assert local[-1]["value"] < local[0]["value"]  # more samples, better local PCA
    assert any(r["metric"] == "matching_k_test_mse" for r in rows)


def test_compare_reports_reconstruction_metrics(tmp_path):
    from fedkin.compare import plan, run_all, write_report

    items = [
        "model.name=linear-ae",
        "model.latent=3",
        "data.name=linear-gaussian",
        "data.num_clients=4",
        "cohort.clients_per_round=4",
        "rounds=2",
        "client.optimizer.name=adam",
    ]
    base, section = plan(None, items, ["adept-ae", "local"], 1)
    results = run_all(base, section, tmp_path, progress=False)
    table, plots = write_report(results, tmp_path, "fedkin compare …")
    assert "personal energy (mean)" in table and "personal test mse × 100" in table
    assert "× 100" in (tmp_path / "results.md").read_text()
    assert all(p.exists() for p in plots)


def test_seed_range():
    assert G.seeds(argparse.Namespace(first_seed=2, seeds=2)) == range(2, 4)


def test_unknown_dataset_names_the_option_and_the_allowed_values():
    with pytest.raises(ConfigError, match=r"--datasets: unknown.*allowed: linear-gaussian"):
        G.pairs(argparse.Namespace(datasets=["mnist"]))


def test_compare_columns_follow_the_task():
    from fedkin.compare import COLUMNS, columns_for, tune_keys

    assert columns_for({"personal_acc_mean": 0.5}) == COLUMNS
    assert tune_keys({"personal_acc_mean": 0.5}) == ("val_personal_acc_mean", "val_personal_loss")
    diffusion = {"personal_denoise_mean": 0.5, "personal_eps_mse": 0.5}
    assert [k for k, _ in columns_for(diffusion)][:4] == [
        "personal_denoise_mean",
        "personal_denoise_p10",
        "personal_denoise_std",
        "personal_eps_mse",
    ]
    assert tune_keys({"personal_energy_mean": 1}) == (
        "val_personal_energy_mean",
        "val_personal_mse",
    )
