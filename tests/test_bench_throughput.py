"""`fedkin bench throughput` machinery on a tiny cohort (no timing assertions)."""

from __future__ import annotations

import json

from fedkin.cli.main import main


def test_throughput_bench_reports_both_implementations(capsys):
    assert (
        main(["bench", "throughput", "--clients", "8", "--rounds", "1", "--threads", "1", "--json"])
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["command"] == "fedkin bench throughput --clients 8 --rounds 1 --threads 1"
    (r,) = out["results"]
    assert r["clients"] == 8 and r["loop_clients_timed"] == 8 and r["threads"] == 1
    assert r["fedkin_updates_per_s"] > 0 and r["loop_updates_per_s"] > 0
    assert r["speedup"] == r["fedkin_updates_per_s"] / r["loop_updates_per_s"]
    assert r["peak_rss_mb"] > 0


def test_throughput_bench_rejects_bad_sizes(capsys):
    assert main(["bench", "throughput", "--clients", "ten"]) == 2
    assert "--clients" in capsys.readouterr().err
