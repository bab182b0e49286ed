"""fedkin bench optim: rows are measured runs (state bytes from the stored state, uplink from
the parameter count or, for FedKSeed, the encoded buffers the channel counted)."""

from __future__ import annotations

import json

import pytest

from fedkin.bench.optim import GRIDS, run_one


def test_bench_optim_rows_measure_the_configured_run():
    sgd = run_one("sgd", 0.1, rounds=1, seed=0)
    adam = run_one("adam", 1e-3, rounds=1, seed=0)
    zo = run_one("fedkseed", 1e-3, rounds=1, seed=0)
    d = 64 * 128 + 128 + 128 * 10 + 10
    assert sgd["uplink_bytes_per_round"] == 4 * d
    # 10 local steps: 10 (pool index, scalar) pairs, 10 float32 + 10 × 12-bit indices
    assert zo["uplink_bytes_per_round"] == 4 * 10 + 15
    assert sgd["state_bytes_per_param"] == 0 and adam["state_bytes_per_param"] > 8
    assert 0 <= sgd["accuracy"] <= 1 and sgd["val"] is not None
    mezo = run_one("mezo", 1e-3, rounds=1, seed=0)
    inference = sgd["inference_peak_mem_mb"]
    assert inference == mezo["inference_peak_mem_mb"] > 4 * d / 1e6  # same model and batch
    assert sgd["peak_mem_mb"] > 2 * inference and adam["peak_mem_mb"] > sgd["peak_mem_mb"]
    assert mezo["peak_mem_mb"] <= 1.3 * inference and zo["peak_mem_mb"] is None
    assert set(GRIDS) >= {"muon", "mada", "fedkseed", "adamw-bf16-stochastic", "sparse-mezo"}
    json.dumps(sgd)
    # bf16: the weights a client holds are bf16 storage, and with the state half of fp32's
    sr = run_one("adamw-bf16-stochastic", 1e-3, rounds=1, seed=0)
    assert sgd["weight_bytes_per_param"] == adam["weight_bytes_per_param"] == 4.0
    assert sr["weight_bytes_per_param"] == 2.0 and zo["weight_bytes_per_param"] is None
    bf16, fp32 = (r["weight_bytes_per_param"] + r["state_bytes_per_param"] for r in (sr, adam))
    assert bf16 <= 0.5 * fp32 + 1e-2  # up to the 0-d step counts


@pytest.mark.slow
def test_bench_optim_cnn_workload_diloco_and_plot(tmp_path):
    from fedkin.bench.optim import WORKLOADS, plot, run_diloco

    cnn = run_one("swan", 1e-3, rounds=1, seed=0, workload="fmnist-cnn")
    assert cnn["uplink_bytes_per_round"] == 4 * cnn["params"] > 4 * 100_000
    assert 0 < cnn["state_bytes_per_param"] < 8  # AdamW on conv kernels and biases only
    assert set(WORKLOADS) == {"digits-mlp", "fmnist-cnn"}
    curves = run_diloco(rounds=2, seed=0, every=1)
    assert set(curves["diloco"]) == set(curves["fedavg"]) == {1, 2}
    assert curves["diloco"] != curves["fedavg"]  # the outer optimizer changes the model
    rows = [{"workload": "fmnist-cnn", "optimizer": "swan", "accuracy": 0.5, "peak_mem_mb": 2.0}]
    result = {"rows": rows, "rounds": {"fmnist-cnn": 1}, "inference_peak_mem_mb": {"fmnist-cnn": 1}}
    plot(result, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
