"""MEL multi-level ensemble: failure-pattern serving, loss, size, federated use."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad
from torch.testing import assert_close

from conftest import TINY, classification_algorithms, tiny_config
from fedkin.core.errors import ConfigError
from fedkin.experiment import Experiment
from fedkin.models import MEL, CnnConfig, MelConfig, MlpConfig, build_model
from fedkin.models.mel import count_parameters, dropout_masks, pattern_name

FEATURES, IMAGE, CLASSES = (64,), (1, 8, 8), 10


def mel_config(*extra: str):
    """The tiny experiment with its model section replaced by ``model.name=mel`` + ``extra``."""
    from fedkin.config import load_config

    return load_config(
        None, [o for o in TINY if not o.startswith("model.")] + ["model.name=mel", *extra]
    )


def mel(**kw) -> MEL:
    cfg = MelConfig(branches=[MlpConfig(hidden=[6]), MlpConfig(hidden=[5, 4])], **kw)
    return build_model(cfg, FEATURES, IMAGE, CLASSES, seed=0)


def components(model: MEL) -> dict[int, list[torch.nn.Module]]:
    """Parametrized leaf modules of each component: 0 = combiner, k = branch k."""
    out = {k + 1: list(b.modules()) for k, b in enumerate(model.branches)}
    out[0] = list(model.combiner.modules())
    return {c: [m for m in ms if list(m.parameters(recurse=False))] for c, ms in out.items()}


def test_failure_patterns_of_two_branches_and_a_combiner():
    names = [pattern_name(p) for p in mel().failure_patterns()]
    assert names == [
        "none",
        "combiner",
        "branch1",
        "branch2",
        "combiner+branch1",
        "combiner+branch2",
    ]
    assert [pattern_name(p) for p in mel(combiner_weight=0).failure_patterns()] == [
        "none",
        "branch1",
        "branch2",
    ]


@pytest.mark.parametrize("dead", [frozenset(p) for p in mel().failure_patterns()], ids=pattern_name)
def test_every_pattern_serves_without_calling_dead_modules(dead):
    model = mel()
    called: set[int] = set()
    for comp, modules in components(model).items():
        for m in modules:
            m.register_forward_hook(lambda *_, c=comp: called.add(c))
    x = torch.rand(7, *FEATURES)
    with model.serving(dead):
        out = model(x)
    assert out.shape == (7, CLASSES) and torch.isfinite(out).all()
    assert called.isdisjoint(dead)
    live_branches = {k for k in (1, 2) if k not in dead}
    assert live_branches <= called  # every live branch is used
    assert (0 in called) == (0 not in dead)
    assert_close(out, model.predict(x, dead))


def test_serving_rules():
    model = mel()
    x = torch.rand(4, *FEATURES)
    g = [b.embed(x) for b in model.branches]
    h = [b.classifier(f) for b, f in zip(model.branches, g, strict=True)]
    ones, z0 = torch.ones(4, 1), torch.zeros(4, 6)
    assert_close(model.predict(x), model.combiner(torch.cat([g[0], g[1], ones, ones], 1)))
    assert_close(
        model.predict(x, frozenset({1})),
        model.combiner(torch.cat([z0, g[1], 0 * ones, ones], 1)),
    )
    avg = (F.softmax(h[0], -1) + F.softmax(h[1], -1)) / 2
    assert_close(model.predict(x, frozenset({0})), avg.log())
    assert_close(model.predict(x, frozenset({0, 2})), h[0])
    with pytest.raises(ValueError, match="no branch"):
        model.predict(x, frozenset({1, 2}))
    with pytest.raises(ValueError, match="components"):
        mel(combiner_weight=0).predict(x, frozenset({0}))


def test_loss_is_the_multi_exit_objective_with_exact_dropout_expectation():
    model = mel(combiner_weight=0.7, branch_weights=[0.5, 2.0], branch_dropout=0.3)
    x, y = torch.rand(9, *FEATURES), torch.randint(0, CLASSES, (9,))
    ce = [F.cross_entropy(b(x), y) for b in model.branches]
    # masks (1,1), (1,0), (0,1) with probabilities ∝ 0.49, 0.21, 0.21
    comb = {p: F.cross_entropy(model.predict(x, frozenset(p)), y) for p in [(), (2,), (1,)]}
    expected = (
        0.5 * ce[0]
        + 2.0 * ce[1]
        + 0.7 * (0.49 * comb[()] + 0.21 * comb[(2,)] + 0.21 * comb[(1,)]) / 0.91
    )
    assert_close(model(x, targets=y), expected)
    assert [m for m, _ in dropout_masks(2, 0.0)] == [(True, True)]
    assert sum(p for _, p in dropout_masks(3, 0.4)) == pytest.approx(1.0)


def test_diversity_term_is_off_by_default_and_rewards_disagreement():
    x, y = torch.rand(9, *FEATURES), torch.randint(0, CLASSES, (9,))
    base, div = mel(), mel(diversity=0.5)
    assert base.diversity == 0
    p = torch.stack([F.softmax(b(x), -1) for b in div.branches])
    spread = (p - p.mean(0)).pow(2).sum(-1).mean()
    assert spread > 0
    assert_close(div(x, targets=y), base(x, targets=y) - 0.5 * spread)


def test_one_branch_without_combiner_is_the_plain_network():
    plain = build_model(MlpConfig(hidden=[6, 5]), FEATURES, None, CLASSES, seed=3)
    model = build_model(
        MelConfig(branches=[MlpConfig(hidden=[6, 5])], combiner_weight=0),
        FEATURES,
        None,
        CLASSES,
        seed=4,
    )
    assert model.combiner is None
    params = {f"branches.0.{k}": v for k, v in plain.named_parameters()}
    assert set(params) == {k for k, _ in model.named_parameters()}
    x, y = torch.rand(8, *FEATURES), torch.randint(0, CLASSES, (8,))
    assert_close(functional_call(model, params, (x,)), plain(x))
    loss = functional_call(model, params, (x,), {"targets": y})
    assert_close(loss, F.cross_entropy(plain(x), y))
    g_mel = grad(lambda p: functional_call(model, p, (x,), {"targets": y}))(params)
    g_plain = grad(lambda p: F.cross_entropy(functional_call(plain, p, (x,)), y))(
        dict(plain.named_parameters())
    )
    for k, v in g_plain.items():
        assert_close(g_mel[f"branches.0.{k}"], v)


@pytest.mark.parametrize(
    ("reference", "branch", "image"),
    [
        (MlpConfig(hidden=[256]), MlpConfig(hidden=[32]), None),
        (CnnConfig(channels=[32, 64], hidden=256), CnnConfig(channels=[4, 8], hidden=32), IMAGE),
    ],
    ids=["mlp", "cnn"],
)
@pytest.mark.parametrize("ratio", [0.4, 0.25])
def test_parameter_count_matches_the_configured_ratio(reference, branch, image, ratio):
    cfg = MelConfig(branches=[branch, branch], size_ratio=ratio, reference=reference)
    model = build_model(cfg, FEATURES, image, CLASSES, seed=0)
    ref = build_model(reference, FEATURES, image, CLASSES, seed=0)
    assert count_parameters(model) / count_parameters(ref) == pytest.approx(ratio, rel=0.02)
    explicit = cfg.resolved(FEATURES, image, CLASSES)
    assert explicit.size_ratio is None and explicit.branches != cfg.branches
    assert count_parameters(build_model(explicit, FEATURES, image, CLASSES, 0)) == (
        count_parameters(model)
    )


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="branch_weights"):
        mel_config("model.branch_weights=[1.0]")
    with pytest.raises(ConfigError, match=r"branches\.1\.hidden"):
        mel_config("model.branches=[{name: mlp}, {name: mlp, hidden: []}]")
    with pytest.raises(ConfigError, match=r"failure_patterns needs model\.name=mel"):
        tiny_config("eval.failure_patterns=true")
    with pytest.raises(ConfigError, match=r"backend\.name=local \(got 'ray'\)"):
        mel_config("eval.failure_patterns=true", "backend.name=ray")


def test_other_models_keep_cross_entropy():
    cfg = tiny_config()
    e = Experiment(cfg)
    alg = e.algorithm
    x, y = e.dataset.x[:8], e.dataset.y[:8]
    params = alg.initial_params()
    assert not getattr(alg.model, "owns_loss", False)
    assert_close(alg.data_loss(params, x, y), F.cross_entropy(alg.logits(params, x), y))


MEL_TINY = (
    "model.branches=[{name: mlp, hidden: [6]}, {name: mlp, hidden: [5]}]",
    "model.combiner_hidden=[4]",
    "eval.failure_patterns=true",
    "data.num_clients=8",
    "cohort.clients_per_round=4",
    "data.partition.name=dirichlet",
    "data.partition.alpha=0.5",
)


@pytest.mark.parametrize("algorithm", ["fedavg", "ditto", "fedrep"])
def test_vectorized_equals_sequential_with_mel_as_the_model(algorithm):
    runs = []
    for engine in ("vectorized", "sequential"):
        e = Experiment(
            mel_config(*MEL_TINY, f"algorithm.name={algorithm}", f"engine.name={engine}")
        )
        assert isinstance(e.model, MEL)
        recs = [e.run_round() for _ in range(2)]
        runs.append((e, recs, e.evaluate()))
    (a, ra, ea), (b, rb, eb) = runs
    assert_close(a.population, b.population, rtol=1e-5, atol=1e-6)
    rows = torch.arange(8)
    assert_close(a.store.gather(rows), b.store.gather(rows), rtol=1e-5, atol=1e-6)
    for x, y in zip(ra, rb, strict=True):
        assert math.isfinite(x["train_loss"])
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-5)
    keys = [k for k in ea if k.startswith(("global_acc_", "personal_acc_"))]
    prefix = "personal" if a.personalizes() else "global"
    for name in ["none", "combiner", "branch1", "branch2", "combiner+branch1", "combiner+branch2"]:
        assert f"{prefix}_acc_{name}" in keys
    for k in keys:
        assert ea[k] == pytest.approx(eb[k])
    assert ea[f"{prefix}_acc_none"] == pytest.approx(ea[f"{prefix}_acc_weighted"])
    if a.algorithm.has_global_model:  # the global model served under each pattern, directly
        ds = a.dataset
        idx = ds.test_index[ds.test_index >= 0]
        for dead in a.model.failure_patterns():
            with a.model.serving(dead):
                z = functional_call(a.model, a.population["global"], (ds.x[idx],))
            acc = float((z.argmax(-1) == ds.y[idx]).double().mean())
            assert ea[f"global_acc_{pattern_name(dead)}"] == pytest.approx(acc)


def test_training_uses_the_mel_loss():
    """The client's train loss is the multi-exit objective, not cross-entropy of h_0."""
    e = Experiment(mel_config(*MEL_TINY, "client.local_steps=1"))
    alg, params = e.algorithm, e.algorithm.initial_params()
    x, y = e.dataset.x[:8], e.dataset.y[:8]
    loss = alg.data_loss(params, x, y)
    assert_close(loss, e.model.loss(x, y))
    assert loss > F.cross_entropy(alg.logits(params, x), y) + 1.0  # the exits' terms are in it


def test_bench_json_rows(cli, capsys):
    import json

    args = ["bench", "mel", "--datasets", "digits", "--seeds", "1", "--epochs", "1", "--json"]
    assert cli(args) == 0
    out = json.loads(capsys.readouterr().out)
    rows = out["rows"]
    assert all({"method", "dataset", "pattern", "accuracy", "params"} <= set(r) for r in rows)
    by = {(r["method"], r["pattern"]): r for r in rows}
    assert set(by) == {
        ("original", "none"),
        ("original", "server"),
        ("compressed", "none"),
        ("compressed", "primary"),
        ("independent", "none"),
        ("independent", "branch1"),
        ("independent", "branch2"),
        *(("mel", p) for p in ["none", "combiner", "branch1", "branch2"]),
        *(("mel", p) for p in ["combiner+branch1", "combiner+branch2"]),
        *(("mel-nodrop", p) for p in ["none", "combiner", "branch1", "branch2"]),
        *(("mel-nodrop", p) for p in ["combiner+branch1", "combiner+branch2"]),
    }
    assert all(0 <= r["accuracy"] <= 1 for r in rows)
    assert by[("mel", "none")]["params"] / by[("original", "none")]["params"] == pytest.approx(
        0.4, rel=0.02
    )
    assert by[("compressed", "primary")]["params"] == pytest.approx(
        by[("mel", "none")]["params"], rel=0.02
    )
    mel = next(s for s in out["summary"] if s["method"] == "mel")
    single = [by[("mel", p)]["accuracy"] for p in ["combiner", "branch1", "branch2"]]
    assert mel["single_failure_mean"] == pytest.approx(sum(single) / 3)
    assert mel["retained"] == pytest.approx(mel["single_failure_mean"] / mel["normal"])
    assert out["command"].startswith("fedkin bench mel --datasets digits")


@pytest.mark.parametrize("algorithm", classification_algorithms())
def test_every_algorithm_trains_mel_with_its_own_loss(algorithm):
    """One round of every algorithm with MEL as the model: its local objective contains the
    multi-exit loss (3 cross-entropy terms ≈ 3 ln 10 at initialization, where plain
    cross-entropy of h_0 would be ≈ ln 10), and every failure pattern is evaluated."""
    e = Experiment(mel_config(*MEL_TINY, f"algorithm.name={algorithm}", "client.local_steps=1"))
    record = e.run_round()
    assert record["train_loss"] > 2 * math.log(10)
    ev = e.evaluate()
    assert sum(k.endswith("_acc_combiner+branch2") for k in ev) >= 1
