"""QuPeL and QuPeD: reduction to Local, engines, resume, mixed precision and architecture, the
final 1-bit phase and the packed artifact."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from conftest import drop_timings, tiny, tiny_config
from fedkin.core import quantize as qz
from fedkin.core.errors import ConfigError
from fedkin.experiment import Experiment
from fedkin.models.packed import load_packed, save_packed
from fedkin.tracking import read_records

DEEP = "model.hidden=[16,16]"  # one hidden-to-hidden layer: the only quantized one
MIXED_PRECISION = (
    "client_models=[{model: {name: mlp, hidden: [16, 16]}, fraction: 0.34, centers: 2},"
    " {model: {name: mlp, hidden: [16, 16]}, fraction: 0.33, centers: 4},"
    " {model: {name: mlp, hidden: [16, 16]}, fraction: 0.33}]"
)
MIXED_ARCH = (
    "client_models=[{model: {name: mlp, hidden: [16, 16]}, fraction: 0.5, centers: 2},"
    " {model: {name: mlp, hidden: [8, 12, 8]}, fraction: 0.5, centers: 4}]"
)
CASES = {
    "qupel": ["algorithm.name=qupel", DEEP],
    "quped": ["algorithm.name=quped", DEEP, "algorithm.freeze_round=2"],
    "qupel-mixed-precision": ["algorithm.name=qupel", DEEP, MIXED_PRECISION],
    "quped-mixed-arch": ["algorithm.name=quped", DEEP, MIXED_ARCH, "algorithm.freeze_round=2"],
    "qupel-l1-code-sign": [
        "algorithm.name=qupel",
        DEEP,
        "algorithm.penalty=l1",
        "algorithm.code_l1_center_sign=true",
    ],
}


def _all_states(e: Experiment) -> list:
    return [g.store.gather(torch.arange(len(g.members))) for g in e.groups]


def test_qupel_without_penalty_or_quantization_is_local():
    runs = {}
    for alg in ("local", "qupel algorithm.lam_p=0 algorithm.centers=null"):
        name, *opts = alg.split()
        e = Experiment(tiny_config(f"algorithm.name={name}", *opts, DEEP))
        for _ in range(3):
            e.run_round()
        runs[name] = (e, e.evaluate())
    (local, r_local), (qupel, r_qupel) = runs["local"], runs["qupel"]
    assert_close(
        qupel.store.gather(torch.arange(20))["x"], local.store.gather(torch.arange(20))["params"]
    )
    for k, v in r_local.items():
        if k.startswith("personal_"):
            assert r_qupel[k] == v
    # and the penalty matters: λ_p > 0 changes the personal models
    e = Experiment(
        tiny_config("algorithm.name=qupel", "algorithm.lam_p=1", "algorithm.centers=null", DEEP)
    )
    for _ in range(3):
        e.run_round()
    assert not torch.equal(
        e.store.gather(torch.arange(20))["x"]["net.2.weight"],
        local.store.gather(torch.arange(20))["params"]["net.2.weight"],
    )


@pytest.mark.parametrize("case", list(CASES))
def test_vectorized_equals_sequential(case):
    runs = []
    for engine in ("vectorized", "sequential"):
        e = Experiment(tiny_config(*CASES[case], f"engine.name={engine}", "rounds=3"))
        recs = [e.run_round() for _ in range(3)]
        runs.append((e, recs, e.evaluate()))
    (a, ra, ea), (b, rb, eb) = runs
    assert_close(a.population, b.population, rtol=1e-5, atol=1e-6)
    assert_close(_all_states(a), _all_states(b), rtol=1e-5, atol=1e-6)
    for x, y in zip(ra, rb, strict=True):
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-5)
    assert ea["personal_acc_mean"] == pytest.approx(eb["personal_acc_mean"])


@pytest.mark.parametrize("case", ["quped", "qupel-mixed-precision", "quped-mixed-arch"])
def test_resume_is_bit_identical(cli, tmp_path, case):
    overrides = tiny(*CASES[case], "rounds=4", "eval.every=1")
    assert cli(["run", *overrides, "--out", str(tmp_path / "full"), "--quiet"]) == 0
    assert cli(["run", *overrides, "rounds=2", "--out", str(tmp_path / "part"), "--quiet"]) == 0
    # extend the finished 2-round run to 4 rounds from its checkpoint
    cfg = (tmp_path / "part" / "config.yaml").read_text().replace("rounds: 2", "rounds: 4")
    (tmp_path / "part" / "config.yaml").write_text(cfg)
    assert cli(["run", "--resume", str(tmp_path / "part"), "--quiet"]) == 0
    assert drop_timings(read_records(tmp_path / "part")) == drop_timings(
        read_records(tmp_path / "full")
    )


def test_mixed_architectures_share_one_global_model():
    e = Experiment(tiny_config(*CASES["quped-mixed-arch"]))
    shapes = [{k: v.shape for k, v in g.store.template["x"].items()} for g in e.groups]
    assert shapes[0] != shapes[1]
    assert [g.algorithm.bits for g in e.groups] == [1, 2]
    assert {k: v.shape for k, v in e.population["global"].items()} == shapes[0]
    w0 = {k: v.clone() for k, v in e.population["global"].items()}
    e.run_round()
    assert any(not torch.equal(w0[k], e.population["global"][k]) for k in w0)


def test_one_bit_model_has_two_values_per_quantized_layer_and_exports_exactly(tmp_path):
    e = Experiment(
        tiny_config(
            "algorithm.name=quped",
            DEEP,
            "algorithm.centers=2",
            "algorithm.freeze_round=1",
            "cohort.clients_per_round=20",
        )
    )
    for _ in range(3):
        e.run_round()
    alg = e.algorithm
    assert alg.layers == ["net.2.weight"]
    states = e.store.gather(torch.arange(20))
    ds = e.dataset
    for i in range(20):
        s = {k: {n: t[i] for n, t in v.items()} for k, v in states.items() if k in ("x", "c")}
        # the frozen weights themselves sit on two values, and so does the deployed model
        assert s["x"]["net.2.weight"].unique().numel() == 2
        q = alg.personal_params(e.population, s)
        assert q["net.2.weight"].unique().numel() == 2
        assert q["net.0.weight"].unique().numel() > 2  # first layer stays full precision
        path = tmp_path / f"client{i}.safetensors"
        save_packed(s["x"], s["c"], path)
        loaded, bits = load_packed(path)
        assert bits == {"net.2.weight": 1}
        x = ds.x[ds.test_index[i][ds.test_index[i] >= 0]]
        assert torch.equal(alg.logits(loaded, x).argmax(-1), alg.logits(q, x).argmax(-1))


def test_centers_stay_sorted_and_weights_approach_them():
    e = Experiment(tiny_config("algorithm.name=qupel", DEEP, "algorithm.lam0=0.5", "rounds=4"))
    before = e.store.template
    r0 = qz.distance_penalty(before["x"]["net.2.weight"], before["c"]["net.2.weight"], "l2")
    for _ in range(4):
        e.run_round()
    st = e.store.gather(torch.arange(20))
    c = st["c"]["net.2.weight"]
    assert torch.all(c[:, 1:] >= c[:, :-1])
    trained = e.participation > 0
    r = torch.stack(
        [qz.distance_penalty(st["x"]["net.2.weight"][i], c[i], "l2") for i in range(20)]
    )
    assert (r[trained] < r0).all()


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"client_models\.0\.centers.*qupel, quped"):
        tiny_config(
            "algorithm.name=local",
            "client_models=[{model: {name: mlp, hidden: [8]}, fraction: 1.0, centers: 2}]",
        )
    with pytest.raises(ConfigError, match=r"client_models\.1\.model must equal model"):
        tiny_config("algorithm.name=qupel", DEEP, MIXED_ARCH)


def test_bench_quantized_json_rows_measure_packed_files(cli, tmp_path, capsys):
    import json

    args = ["bench", "quantized", *tiny(DEEP, "rounds=1"), "--out", str(tmp_path), "--json"]
    assert cli([*args, "--variants", "quped-1bit", "quped-mixed", "local"]) == 0
    rows = {r["variant"]: r for r in json.loads(capsys.readouterr().out)["rows"]}
    for r in rows.values():
        assert {"algorithm", "bits", "architecture", "personal_acc_mean", "model_bytes"} <= set(r)
    one_bit, local = rows["quped-1bit"], rows["local"]
    assert (one_bit["bits"], local["bits"]) == ("1", "32")
    # the 16x16 hidden layer: 256 codes at 1 bit + two float32 centers, vs 256 float32 weights
    assert one_bit["quantized_layer_bytes"] == 256 / 8 + 8
    assert one_bit["fp32_quantized_layer_bytes"] == 4 * 256
    # the files differ by those bytes, less the quantized file's longer header (its metadata)
    saved = local["model_bytes"] - one_bit["model_bytes"]
    assert 4 * 256 - 40 - 200 < saved < 4 * 256 - 40
    assert rows["quped-mixed"]["architecture"] == "base + half"
