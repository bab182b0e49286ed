"""`fedkin bench throughput` machinery on a tiny cohort (no timing assertions)."""

from __future__ import annotations

import json

import torch

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


def test_throughput_bench_compares_models_only_for_the_same_cohort():
    from fedkin.bench.throughput import measure

    torch.set_num_threads(1)
    capped = measure(4, 1, loop_cap=2)
    assert capped["loop_clients_timed"] == 2 and capped["final_max_abs_diff"] is None


def test_throughput_bench_rejects_bad_sizes(capsys):
    assert main(["bench", "throughput", "--clients", "ten"]) == 2
    assert "--clients" in capsys.readouterr().err
