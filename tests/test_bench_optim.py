"""fedkin bench optim: rows are measured runs (state bytes from the stored state, uplink from
the parameter count or the number of seed pairs)."""

from __future__ import annotations

import json

from fedkin.bench.optim import GRIDS, run_one


def test_bench_optim_rows_measure_the_configured_run():
    sgd = run_one("sgd", 0.1, rounds=1, seed=0)
    adam = run_one("adam", 1e-3, rounds=1, seed=0)
    zo = run_one("fedkseed", 1e-3, rounds=1, seed=0)
    d = 64 * 128 + 128 + 128 * 10 + 10
    assert sgd["uplink_bytes_per_round"] == 4 * d
    assert zo["uplink_bytes_per_round"] == 8 * 10  # 10 local steps
    assert sgd["state_bytes_per_param"] == 0 and adam["state_bytes_per_param"] > 8
    assert 0 <= sgd["accuracy"] <= 1 and sgd["val"] is not None
    assert set(GRIDS) >= {"muon", "mada", "fedkseed", "adamw-bf16-stochastic"}
    json.dumps(sgd)
