"""A run whose every client update is non-finite stops instead of idling to the end."""

from __future__ import annotations

from conftest import tiny
from fedkin.cli.main import main


def test_diverged_run_stops_with_a_clear_error(tmp_path, capsys):
    out = tmp_path / "dead"
    code = main(
        ["run", *tiny("rounds=10", "server.optimizer.lr=1e30"), "--out", str(out), "--quiet"]
    )
    err = capsys.readouterr().err
    assert code == 1
    assert "every client update was NaN/Inf" in err and "Traceback" not in err
    assert (out / "checkpoint.pt").exists()
