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


def test_cli_without_flower_reports_fedkin_and_the_install_hint(cli, capsys, monkeypatch):
    monkeypatch.setattr(peers, "flower_available", lambda: False)
    assert cli(["bench", "peers", "--clients", "3", "--rounds", "2", "--no-compile"]) == 0
    out = capsys.readouterr().out
    assert "fedkin" in out and "not installed (pip install 'fedkin[flower]')" in out
    assert "compiled" not in out
    assert "reproduce with: fedkin bench peers --clients 3 --rounds 2 --no-compile" in out


def test_cli_rejects_a_single_round(cli, capsys):
    assert cli(["bench", "peers", "--rounds", "1"]) == 2
    assert "--rounds" in capsys.readouterr().err


@pytest.mark.slow
def test_json_compares_with_flower_on_the_same_rounds(cli, capsys):
    pytest.importorskip("flwr")
    assert cli(["bench", "peers", "--clients", "4", "--rounds", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    runtimes = [r["runtime"] for r in result["runs"]]
    assert runtimes[-1] == "flower" and "fedkin" in runtimes
    assert [r.get("compiled") for r in result["runs"]][-2:] == [True, None]
    # eager, torch.compile'd and Flower runs all computed the same FedAvg rounds
    assert result["max_abs_model_diff"] < 1e-4
    for run in result["runs"][:-1]:
        assert run["steady_speedup_vs_flower"] > 0 and run["total_speedup_vs_flower"] > 0
    assert result["command"] == "fedkin bench peers --clients 4 --rounds 2"
