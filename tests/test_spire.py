"""SPIRE, ADEPT-DGM and the conditional DDPM (diffusion task): embedding-only adaptation,
engines, resume, the diffusion noise, partial fine-tuning, and KID/FID against torchmetrics."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

pytest.importorskip("diffusers")

from conftest import TINY_DDPM
from fedkin.config import load_config
from fedkin.core.errors import ConfigError
from fedkin.core.rng import Stream
from fedkin.core.tasks import DIFFUSION, draw_diffusion_noise
from fedkin.core.tree import tree_leaves
from fedkin.experiment import Experiment
from fedkin.models.diffusion import VmapGroupNorm
from fedkin.models.diffusion_metrics import FeatureMap, fid, kid
from fedkin.models.zoo import CNN

# conftest's tiny DDPM with 2 of its 6 clients held out, trained with Adam
TINY = [
    *TINY_DDPM,
    "eval.holdout_clients=0.34",
    "client.optimizer.name=adam",
    "client.optimizer.lr=0.001",
]


def experiment(*extra: str) -> Experiment:
    return Experiment(load_config(None, [*TINY, *extra]))


def train(exp: Experiment, rounds: int) -> None:
    for _ in range(rounds):
        exp.run_round()


def snapshot(tree) -> list[torch.Tensor]:
    return [t.clone() for t in tree_leaves(tree)]


def test_vmap_group_norm_equals_group_norm():
    torch.manual_seed(0)
    ref = nn.GroupNorm(4, 8)
    nn.init.normal_(ref.weight)
    nn.init.normal_(ref.bias)
    mine = VmapGroupNorm(4, 8)
    mine.load_state_dict(ref.state_dict())
    x = torch.randn(3, 8, 5, 5)
    torch.testing.assert_close(mine(x), ref(x))
    batched = torch.func.vmap(mine)(x.unsqueeze(1).expand(3, 2, 8, 5, 5))
    torch.testing.assert_close(batched[:, 0], ref(x))


def test_ddpm_noising_matches_diffusers_add_noise():
    exp = experiment("algorithm.name=fedavg")
    model = exp.model
    x = torch.rand(5, 64)
    u = torch.tensor([0.0, 0.1, 0.5, 0.9, 0.9999])
    eps = torch.randn(5, 64)
    t = (u * model.timesteps).long()
    x0 = 2 * x.reshape(5, 1, 8, 8) - 1
    x_t = model.scheduler.add_noise(x0, eps.reshape(5, 1, 8, 8), t)
    expected = model.epsilon(x_t, t).reshape(5, -1) - eps
    torch.testing.assert_close(model.residual(x, u, eps), expected)
    # and β is linear from beta_start to beta_end
    betas = model.scheduler.betas
    torch.testing.assert_close(betas, torch.linspace(1e-4, 0.02, 1000))


def test_diffusion_noise_is_keyed_by_client_not_cohort_position():
    xs = torch.rand(2, 3, 4, 64)  # [steps, clients, batch, D]
    ys = torch.zeros(2, 3, 4, dtype=torch.long)
    stream = Stream(0).child("batches-noise")
    _, noise = draw_diffusion_noise((xs, ys), stream, torch.tensor([5, 1, 9]), 7)
    _, alone = draw_diffusion_noise((xs[:, 1:2], ys[:, 1:2]), stream, torch.tensor([1]), 7)
    assert noise.shape == (2, 3, 4, 65)
    assert torch.equal(noise[:, 1:2], alone)
    assert ((noise[..., 0] >= 0) & (noise[..., 0] < 1)).all()
    assert noise[..., 1:].std() == pytest.approx(1.0, abs=0.15)
    _, other_round = draw_diffusion_noise((xs, ys), stream, torch.tensor([5, 1, 9]), 8)
    assert not torch.equal(noise, other_round)


def test_ddpm_makes_algorithms_use_the_diffusion_task():
    exp = experiment("algorithm.name=fedavg")
    assert exp.algorithm.task is DIFFUSION
    train(exp, 1)
    record = exp.evaluate()
    assert 0 < record["global_eps_mse"] < 2
    assert "global_denoise_mean" in record


@pytest.mark.parametrize(("width", "d_e"), [([], 32), (["model.embedding_dim=12"], 12)])
def test_spire_adaptation_trains_only_a_new_embedding(width, d_e):
    exp = experiment("algorithm.name=spire", "algorithm.adapt_steps=3", *width)
    train(exp, 2)
    alg = exp.algorithm
    population_before = snapshot(exp.population)
    backbone = exp.population["global"]
    total = sum(p.numel() for p in exp.model.parameters())
    new = int(exp.new_clients[0])
    params = exp.personal_params(new)  # init at the mean embedding, then 3 embedding-only steps
    # the backbone is byte-identical before and after, and the population did not move
    for a, b in zip(population_before, tree_leaves(exp.population), strict=True):
        assert torch.equal(a, b)
    tuned, embedding = alg.split(params)
    for k, v in backbone.items():
        assert torch.equal(tuned[k], v), k
    # exactly the embedding was trained: d_e numbers (default 4·channels[0] = 32), ≤ 0.1%
    trainable = sum(v.numel() for v in embedding.values())
    assert list(embedding) == ["unet.class_embedding.weight"]
    assert trainable == d_e and trainable * 1000 < total
    start = exp.population["embedding_mean"]["unet.class_embedding.weight"]
    assert not torch.equal(embedding["unet.class_embedding.weight"], start)
    # trained clients keep their own embeddings, which differ from client to client
    rows = exp.groups[0].rows(exp.training_clients)
    table = exp.groups[0].store.gather(rows)["embedding"]["unet.class_embedding.weight"]
    assert not torch.equal(table[0], table[1])


def test_spire_adaptation_fits_the_new_client():
    """Adapting the embedding lowers the new client's denoising loss on fixed noise."""
    exp = experiment("algorithm.name=spire")
    train(exp, 2)
    alg = exp.algorithm
    xs, ys = (t[:, 0] for t in exp.client_batches(exp.new_clients[:1], "adapt", exp.round))
    phi, start = exp.population["global"], exp.population["embedding_mean"]

    def fit(e) -> float:
        return sum(float(alg.data_loss({**phi, **e}, x, y)) for x, y in zip(xs, ys, strict=True))

    adapted, _ = alg.adapt_embedding(exp.population, start, (xs, ys), steps=30)
    assert fit(adapted) < fit(start)


def test_spire_rejects_an_embedding_key_naming_nothing():
    with pytest.raises(ConfigError, match=r"algorithm\.embedding_key"):
        experiment("algorithm.name=spire", "algorithm.embedding_key=nope")


def test_adept_dgm_needs_a_diffusion_model():
    with pytest.raises(ConfigError, match="'adept-dgm' trains a personal diffusion model"):
        Experiment(
            load_config(None, ["data.name=digits", "model.name=mlp", "algorithm.name=adept-dgm"])
        )


def test_fedavg_ft_last_layer_moves_only_that_layer():
    exp = experiment(
        "algorithm.name=fedavg_ft",
        "algorithm.finetune_steps=2",
        "algorithm.finetune_layers=[unet.conv_out]",
    )
    train(exp, 1)
    w = exp.population["global"]
    params = exp.personal_params(int(exp.training_clients[0]))
    moved = sorted(k for k in w if not torch.equal(w[k], params[k]))
    assert moved == ["unet.conv_out.bias", "unet.conv_out.weight"]


# SGD: batched kernels reassociate sums, and Adam's g/√v turns float noise on near-zero
# gradients into whole steps of either sign, which says nothing about the engines
SGD = ["client.optimizer.name=sgd", "client.optimizer.lr=0.05"]


@pytest.mark.parametrize("name", ["spire", "adept-dgm", "local"])
def test_vectorized_equals_sequential(name):
    runs = [
        experiment(f"algorithm.name={name}", f"engine.name={engine}", *SGD)
        for engine in ("vectorized", "sequential")
    ]
    for exp in runs:
        train(exp, 2)
    vec, seq = runs
    for a, b in zip(tree_leaves(vec.population), tree_leaves(seq.population), strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    rows = torch.arange(vec.dataset.num_clients)
    for a, b in zip(
        tree_leaves(vec.groups[0].store.gather(rows)),
        tree_leaves(seq.groups[0].store.gather(rows)),
        strict=True,
    ):
        assert torch.allclose(a, b, atol=1e-5)
    assert vec.evaluate()["personal_eps_mse"] == pytest.approx(
        seq.evaluate()["personal_eps_mse"], rel=1e-4
    )


@pytest.mark.parametrize("name", ["spire", "adept-dgm"])
def test_resume_is_bit_identical(tmp_path, name):
    over = [f"algorithm.name={name}"]
    straight = experiment(*over)
    train(straight, 2)
    first = experiment(*over)
    train(first, 1)
    first.save_checkpoint(tmp_path)
    resumed = experiment(*over)
    resumed.load_checkpoint(tmp_path)
    train(resumed, 1)
    rows = torch.arange(straight.dataset.num_clients)
    for x, y in [
        (straight.population, resumed.population),
        (straight.groups[0].store.gather(rows), resumed.groups[0].store.gather(rows)),
    ]:
        for a, b in zip(tree_leaves(x), tree_leaves(y), strict=True):
            assert torch.equal(a, b)


def _feature_map() -> FeatureMap:
    torch.manual_seed(0)
    return FeatureMap(CNN((1, 8, 8), [4], 16, 10))


def test_kid_matches_torchmetrics():
    from torchmetrics.image.kid import KernelInceptionDistance

    torch.manual_seed(1)
    real, fake = torch.rand(40, 1, 8, 8), torch.rand(40, 1, 8, 8) ** 2
    features = _feature_map()
    metric = KernelInceptionDistance(feature=features, subsets=1, subset_size=40)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    expected, _ = metric.compute()
    assert kid(features(real), features(fake)) == pytest.approx(float(expected), rel=1e-9)
    # and it separates: identical distributions give ≈ 0, different ones clearly more
    other_real = torch.rand(40, 1, 8, 8)
    assert abs(kid(features(real), features(other_real))) < kid(features(real), features(fake))


def test_fid_matches_torchmetrics():
    from torchmetrics.image.fid import FrechetInceptionDistance

    torch.manual_seed(2)
    real, fake = torch.rand(60, 1, 8, 8), torch.rand(60, 1, 8, 8) ** 2
    features = _feature_map()
    metric = FrechetInceptionDistance(feature=features, input_img_size=(1, 8, 8))
    metric.update(real, real=True)
    metric.update(fake, real=False)
    assert fid(features(real), features(fake)) == pytest.approx(
        float(metric.compute()), rel=1e-4, abs=1e-6
    )


@pytest.mark.slow
def test_bench_diffusion_writes_table_json_and_grids(cli, tmp_path, capsys):
    small = "--clients 10 --channels 8,16 --rounds 1 --steps 2 --samples 12 --sample-steps 3"
    methods = ["--methods", "spire,fedavg,fedavg-ft,fedavg-ft-last"]
    out = ["--cache", str(tmp_path / "cache"), "--out", str(tmp_path)]
    args = ["bench", "diffusion", *methods, *small.split(), *out]
    assert cli(args) == 0

    record = json.loads((tmp_path / "diffusion.json").read_text())
    assert record["command"].startswith("fedkin bench diffusion --methods spire,fedavg,")
    rows = {(r["method"], r["metric"]): r for r in record["rows"]}
    assert set(record["rows"][0]) == {"method", "dataset", "metric", "value", "trainable_params"}
    assert rows[("spire", "kid_new_mean")]["trainable_params"] == 32
    last_layer = 8 * 9 + 1  # conv_out: 8 → 1 channel, 3×3, bias
    assert rows[("fedavg-ft-last", "kid_new_mean")]["trainable_params"] == last_layer
    assert rows[("spire", "forgetting_kid")]["value"] == 0.0
    # the global baseline: FedAvg's model as is, nothing trained in adaptation, nothing forgotten
    assert rows[("fedavg", "kid_new_mean")]["trainable_params"] == 0
    assert rows[("fedavg", "forgetting_kid")]["value"] == 0.0
    assert len(list((tmp_path / "cache").glob("diffusion_pretrained_*.pt"))) == 2  # spire, fedavg
    assert rows[("split", "new_clients")]["value"] == 2
    assert (tmp_path / "samples_spire.png").stat().st_size > 0
    assert "| spire |" in (tmp_path / "diffusion.md").read_text()


def test_generative_bench_lists_table2_and_skips_it_without_digits():
    import argparse

    from fedkin.bench import generative

    assert generative.TABLES["table2"] is generative.generative_table2
    args = argparse.Namespace(datasets=["linear-gaussian"], seeds=1, overrides=[], json=True)
    assert generative.generative_table2(args) == []
