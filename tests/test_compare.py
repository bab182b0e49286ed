"""`fedkin compare`: same partitions per seed, reuse of finished runs, table/JSON/plots."""

from __future__ import annotations

import json

from conftest import tiny
from fedkin.cli.main import main


def _compare(tmp_path, *extra: str) -> int:
    return main(
        [
            "compare",
            *tiny("eval.every=3", "eval.holdout_clients=0.2", "cohort.clients_per_round=4"),
            "--algorithms=fedavg,local",
            "--seeds=2",
            "--out",
            str(tmp_path / "cmp"),
            "--quiet",
            *extra,
        ]
    )


def test_compare_writes_table_json_and_plots_and_reuses_finished_runs(tmp_path, capsys):
    assert _compare(tmp_path) == 0
    out = tmp_path / "cmp"
    table = (out / "results.md").read_text()
    assert "| fedavg |" in table and "| local |" in table and "Command: `fedkin compare" in table
    result = json.loads((out / "results.json").read_text())
    rows = {r["algorithm"]: r for r in result["rows"]}
    assert rows["fedavg"]["seeds"] == 2
    assert "global_acc_weighted" in rows["fedavg"] and "global_acc_weighted" not in rows["local"]
    for name in ("accuracy_over_rounds.png", "client_accuracy.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # every algorithm of a seed saw the same clients; the seeds differ
    def config(alg: str, seed: int) -> str:
        return (out / "runs" / f"{alg}-seed{seed}" / "config.yaml").read_text()

    summaries = {
        (a, s): json.loads((out / "runs" / f"{a}-seed{s}" / "summary.json").read_text())
        for a in ("fedavg", "local")
        for s in (0, 1)
    }
    assert "seed: 0" in config("fedavg", 0) and "seed: 1" in config("local", 1)
    assert summaries[("fedavg", 0)] != summaries[("fedavg", 1)]

    # a second invocation reuses finished runs: metrics files are not rewritten
    metrics = out / "runs" / "fedavg-seed0" / "metrics.jsonl"
    stamp = metrics.stat().st_mtime_ns
    assert _compare(tmp_path) == 0
    assert metrics.stat().st_mtime_ns == stamp
    assert json.loads((out / "results.json").read_text())["rows"] == result["rows"]


def test_compare_rejects_unknown_algorithms(tmp_path, capsys):
    code = main(["compare", "--algorithms=fedavg,nope", "--out", str(tmp_path / "x"), "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert "nope" in err and "fedavg" in err and "Traceback" not in err


def test_compare_tunes_on_validation_data_and_reports_the_choice(tmp_path, capsys):
    """compare.tune: every grid point runs with a validation split; the winner is the best mean
    final val_personal_acc_mean, and the reported runs train on all training data with it."""
    out = tmp_path / "cmp"
    code = main(
        [
            "compare",
            *tiny("eval.every=3", "compare.tune={fedprox: {mu: [0.001, 3.0]}}"),
            "--algorithms=fedprox",
            "--seeds=2",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert code == 0
    result = json.loads((out / "results.json").read_text())
    tuning = result["tuning"]["fedprox"]
    val = {}
    for mu in (0.001, 3.0):
        runs = [
            json.loads(
                (out / "runs" / f"tune-fedprox-mu={mu}-seed{s}" / "summary.json").read_text()
            )
            for s in (0, 1)
        ]
        config = (out / "runs" / f"tune-fedprox-mu={mu}-seed0" / "config.yaml").read_text()
        assert "validation_fraction: 0.2" in config
        val[mu] = sum(r["val_personal_acc_mean"] for r in runs) / 2
    assert [p["val_personal_acc_mean"] for p in tuning["grid"]] == [val[0.001], val[3.0]]
    assert val[0.001] != val[3.0]
    best = max(val, key=val.get)
    assert tuning["chosen"] == {"mu": best}
    final = (out / "runs" / "fedprox-seed0" / "config.yaml").read_text()
    assert f"mu: {best}" in final and "validation_fraction: 0.0" in final
    assert f"chose mu={best}" in (out / "results.md").read_text()


def test_compare_rejects_tuning_an_algorithm_not_compared(tmp_path, capsys):
    code = main(
        [
            "compare",
            *tiny("compare.tune={ditto: {lam: [0.1, 1]}}"),
            "--algorithms=fedavg",
            "--out",
            str(tmp_path / "x"),
            "--quiet",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "compare.tune" in err and "ditto" in err and "fedavg" in err
