"""fedkin bench compile: input checks, and (slow) one measurement with the real compiler."""

from __future__ import annotations

import pytest


def test_bench_compile_rejects_bad_arguments(cli, capsys):
    assert cli(["bench", "compile", "--steps", "five"]) == 2
    assert "--steps 'five': give integers" in capsys.readouterr().err
    assert cli(["bench", "compile", "--clients", "0"]) == 2
    assert "must be positive" in capsys.readouterr().err


@pytest.mark.slow
def test_measure_times_every_engine_in_one_process():
    from fedkin.bench.compile import measure

    result = measure("mlp", clients=3, steps=1, rounds=1)
    assert set(result["s_per_round"]) == {"eager", "compiled", "eager_vmap", "compiled_vmap"}
    assert result["compile_s"] > 0 and result["speed_vs_eager_vmap"]["eager_vmap"] == 1.0
