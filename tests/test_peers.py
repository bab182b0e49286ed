"""`fedkin bench peers`: same workload through fedkin and Flower, tiny sizes."""

from __future__ import annotations

import json

import pytest
import torch

from fedkin.bench import peers
from fedkin.bench.throughput import _batches


def test_client_batches_are_the_cohort_draws_of_that_client():
    xs, ys = _batches(6, 0, 2)
    for c in range(6):
        x, y = peers.client_batches(c, 0, 2)
        assert torch.equal(x, xs[:, c]) and torch.equal(y, ys[:, c])


def test_flower_net_has_fedkin_mlp_parameter_names_and_shapes():
    fedkin_state = peers.initial_model().state_dict()
    net = peers.Net()
    net.load_state_dict(fedkin_state)  # strict: same names and shapes
    x = torch.randn(3, 64)
    assert torch.allclose(net(x), peers.initial_model()(x))


def test_measure_fedkin_reports_steady_and_startup_rates(tmp_path):
    r = peers.measure_fedkin(clients=3, rounds=2, out=tmp_path / "m.pt")
    assert r["runtime"] == "fedkin" and len(r["round_s"]) == 2
    assert r["steady_updates_per_s"] == pytest.approx(3 / r["round_s"][1])
    assert r["total_updates_per_s"] == pytest.approx(6 / r["total_s"])
    assert set(torch.load(tmp_path / "m.pt")) == set(peers.initial_model().state_dict())


def test_measure_pfl_computes_the_same_rounds_as_fedkin(tmp_path):
    pytest.importorskip("pfl")
    r = peers.measure_pfl(clients=3, rounds=2, out=tmp_path / "pfl.pt")
    assert r["runtime"] == "pfl" and len(r["round_s"]) == 2
    assert r["steady_updates_per_s"] == pytest.approx(3 / r["round_s"][1])
    assert r["total_updates_per_s"] == pytest.approx(6 / r["total_s"])
    peers.measure_fedkin(clients=3, rounds=2, out=tmp_path / "fedkin.pt")
    pfl_model, fedkin_model = torch.load(tmp_path / "pfl.pt"), torch.load(tmp_path / "fedkin.pt")
    start = peers.initial_model().state_dict()
    assert set(pfl_model) == set(fedkin_model)
    # same FedAvg rounds (measured: 1.5e-8 apart), and training moved the model (4e-2)
    assert max(float((pfl_model[k] - fedkin_model[k]).abs().max()) for k in start) < 1e-6
    assert max(float((pfl_model[k] - start[k]).abs().max()) for k in start) > 1e-3


def test_cli_without_peers_reports_fedkin_and_the_install_hints(cli, capsys, monkeypatch):
    monkeypatch.setattr(peers, "flower_available", lambda: False)
    monkeypatch.setattr(peers, "pfl_available", lambda: False)
    assert cli(["bench", "peers", "--clients", "3", "--rounds", "2", "--no-compile"]) == 0
    out = capsys.readouterr().out
    assert "fedkin" in out and "not installed (pip install 'fedkin[flower]')" in out
    assert "pfl-research was not measured: it is not installed (pip install 'fedkin[pfl]')" in out
    assert "compiled" not in out
    assert "reproduce with: fedkin bench peers --clients 3 --rounds 2 --no-compile" in out


def test_cli_rejects_a_single_round(cli, capsys):
    assert cli(["bench", "peers", "--rounds", "1"]) == 2
    assert "--rounds" in capsys.readouterr().err


@pytest.mark.slow
def test_json_compares_with_pfl_and_flower_on_the_same_rounds(cli, capsys):
    pytest.importorskip("flwr")
    pytest.importorskip("pfl")
    assert cli(["bench", "peers", "--clients", "4", "--rounds", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    runtimes = [r["runtime"] for r in result["runs"]]
    assert runtimes == ["fedkin", "fedkin", "fedkin", "pfl", "flower"][-len(runtimes) :]
    assert [r.get("compiled") for r in result["runs"]][-3:] == [True, None, None]
    # eager, torch.compile'd, pfl-research and Flower runs all computed the same FedAvg rounds
    assert result["max_abs_model_diff"] < 1e-4
    by_runtime = {r["runtime"]: r for r in result["runs"]}
    for run in result["runs"][:-2]:
        for peer in ("pfl", "flower"):
            for kind in ("steady", "total"):
                assert run[f"{kind}_speedup_vs_{peer}"] == pytest.approx(
                    run[f"{kind}_updates_per_s"] / by_runtime[peer][f"{kind}_updates_per_s"]
                )
    assert result["command"] == "fedkin bench peers --clients 4 --rounds 2"
