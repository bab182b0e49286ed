"""`fedkin bench throughput` machinery on a tiny cohort (no timing assertions)."""

from __future__ import annotations

import json

import pytest
import torch

from fedkin.bench.throughput import BATCH, HIDDEN, STEPS, flops_per_update
from fedkin.cli.main import main


def test_throughput_bench_reports_both_implementations(capsys):
    assert (
        main(["bench", "throughput", "--clients", "8", "--rounds", "2", "--threads", "1", "--json"])
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["command"] == "fedkin bench throughput --clients 8 --rounds 2 --threads 1"
    (r,) = out["results"]
    assert r["clients"] == 8 and r["loop_clients_timed"] == 8 and r["threads"] == 1
    # both implementations ran the same 3 rounds (warm-up + 2 timed) of FedAvg: same model
    # (measured: max |difference| ≈ 4e-8, float32 summation order)
    assert r["final_max_abs_diff"] < 1e-6
    assert r["fedkin_updates_per_s"] > 0 and r["loop_updates_per_s"] > 0
    assert r["speedup"] == r["fedkin_updates_per_s"] / r["loop_updates_per_s"]
    assert r["peak_rss_mb"] > 0
    assert r["sequential_updates_per_s"] > 0
    assert r["speedup_vs_sequential"] == r["fedkin_updates_per_s"] / r["sequential_updates_per_s"]
    # the FLOP limit: the counted update, a positive sgemm rate, and the share they imply
    assert r["workload"] == "mlp" and r["data"] == "digits"
    assert r["fedkin_path"] == "fast:mlp"  # the hand-batched solve, not vmap
    assert r["flops_per_update"] == mlp_update_flops()
    assert r["sgemm_gflops"] > 0
    assert r["fraction_of_limit"] == pytest.approx(
        r["fedkin_updates_per_s"] * r["flops_per_update"] / (r["sgemm_gflops"] * 1e9)
    )


def mlp_update_flops() -> int:
    """Closed form of one MLP 64-128-10 client update as FlopCounterMode counts it: a matmul of
    [B, m] by [m, n] is 2·B·m·n (bias adds are not counted); per step the forward does both
    layers once, the backward does the weight gradient of both layers and the input gradient
    of the second only (the data needs no gradient): factor 2 for layer 1, 3 for layer 2."""
    b = BATCH
    return STEPS * (2 * 2 * b * 64 * HIDDEN + 3 * 2 * b * HIDDEN * 10)


def test_flop_count_of_one_update_matches_the_closed_form():
    assert flops_per_update("mlp") == mlp_update_flops() == 3_235_840


def test_throughput_bench_compares_models_only_for_the_same_cohort():
    from fedkin.bench.throughput import measure

    torch.set_num_threads(1)
    capped = measure(4, 1, loop_cap=2)
    assert capped["loop_clients_timed"] == 2 and capped["final_max_abs_diff"] is None


@pytest.mark.slow
def test_cnn_workload_runs_all_three_implementations_on_the_same_rounds(capsys):
    args = ["bench", "throughput", "--workload", "cnn", "--clients", "2", "--rounds", "1"]
    assert main([*args, "--threads", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (
        out["command"]
        == "fedkin bench throughput --workload cnn --clients 2 --rounds 1 --threads 1"
    )
    (r,) = out["results"]
    assert r["workload"] == "cnn" and r["data"].startswith(("fashion-mnist", "synthetic"))
    assert r["final_max_abs_diff"] < 1e-5
    assert r["fedkin_path"] == "fast:cnn"  # grouped convolutions, not vmap
    # the CNN's update costs far more than the MLP's (conv layers on 28×28 images)
    assert r["flops_per_update"] > 1000 * mlp_update_flops()


def test_profile_names_the_path_each_engine_ran():
    from fedkin.bench.throughput import profile_paths

    torch.set_num_threads(1)
    profiles = profile_paths(2, "mlp", rows=3)
    assert [p["path"] for p in profiles.values()] == ["fast:mlp", "vmap", "sequential"]
    for p in profiles.values():
        assert len(p["top"]) == 3 and p["self_cpu_ms"] > 0
        assert sum(e["share"] for e in p["top"]) <= 1 + 1e-9


def test_throughput_bench_rejects_bad_sizes(capsys):
    assert main(["bench", "throughput", "--clients", "ten"]) == 2
    assert "--clients" in capsys.readouterr().err


@pytest.mark.slow
def test_compiled_engine_column_trains_the_same_model():
    from fedkin.bench.throughput import measure

    result = measure(3, 1, loop_cap=3, compile=True)
    assert result["compiled_compile_s"] > 0 and result["compiled_updates_per_s"] > 0
    assert result["compiled_fraction_of_limit"] == pytest.approx(
        result["compiled_updates_per_s"]
        * result["flops_per_update"]
        / (result["sgemm_gflops"] * 1e9)
    )
    assert (
        result["final_max_abs_diff"] < 1e-4
    )  # the compiled engine's model is among those compared
