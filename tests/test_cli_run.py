"""`fedkin run` / `fedkin list` end to end: run directories, errors, interrupts, resume."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import drop_timings, hand_personal_accuracy, tiny
from fedkin.algorithms import ALGORITHMS
from fedkin.config import load_config
from fedkin.experiment import CHECKPOINT, Experiment
from fedkin.runs import resume_run
from fedkin.tracking import read_records

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EVAL_KEYS = {
    "global_acc_mean",
    "global_acc_weighted",
    "global_acc_std",
    "global_acc_p10",
    "personal_acc_mean",
    "personal_acc_weighted",
    "personal_acc_std",
    "personal_acc_p10",
}


# ----- a complete run ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """`fedkin run <tiny> rounds=2 --out DIR --quiet`, once for the module."""
    import contextlib
    import io

    from fedkin.cli.main import main

    out = tmp_path_factory.mktemp("cli") / "r"
    overrides = tiny("rounds=2", "name=e2e")
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = main(["run", *overrides, "--out", str(out), "--quiet"])
    return {"rc": rc, "out": out, "overrides": overrides, "stdout": stdout.getvalue()}


def test_run_exit_code_and_files(finished_run):
    assert finished_run["rc"] == 0
    out = finished_run["out"]
    for name in ("config.yaml", "metrics.jsonl", "summary.json", CHECKPOINT, "metrics.png"):
        assert (out / name).is_file(), name


def test_run_config_is_resolved_and_reloadable(finished_run):
    saved = load_config(finished_run["out"] / "config.yaml")
    assert saved == load_config(None, finished_run["overrides"])
    assert saved.rounds == 2 and saved.name == "e2e" and saved.data.num_clients == 20
    # resolved: defaults are written out, not left implicit
    text = (finished_run["out"] / "config.yaml").read_text()
    assert "local_steps" in text and "engine" in text and "checkpoint" in text


def test_run_metrics_records(finished_run):
    records = read_records(finished_run["out"])
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["round"] for r in train] == [1, 2]
    for r in train:
        assert r["clients"] == 5
        assert r["rejected_updates"] == 0 and r["accepted_updates"] == 5
        assert 0 < r["train_loss"] < 10
        assert "round_time_s" in r
    assert evals and evals[-1]["round"] == 2  # always evaluated after the last round
    for r in evals:
        assert r.keys() >= EVAL_KEYS
        assert r["personal_acc_p10"] <= r["personal_acc_mean"]
    # the logged accuracy is the final model's, recomputed client by client from the checkpoint
    final = resume_run(finished_run["out"])
    assert final.round == 2
    assert evals[-1]["personal_acc_mean"] == pytest.approx(hand_personal_accuracy(final), abs=1e-12)


def test_run_summary_matches_last_eval_and_stdout(finished_run):
    out = finished_run["out"]
    summary = json.loads((out / "summary.json").read_text())
    last_eval = [r for r in read_records(out) if r["kind"] == "eval"][-1]
    assert summary["rounds"] == 2 and summary["algorithm"] == "fedavg" and summary["name"] == "e2e"
    for key in EVAL_KEYS:
        assert summary[key] == last_eval[key]
    printed = json.loads(finished_run["stdout"])
    assert {k: v for k, v in summary.items() if not k.endswith("_by_client")} == printed


def test_run_checkpoint_and_plot(finished_run):
    out = finished_run["out"]
    state = torch.load(out / CHECKPOINT, weights_only=False)
    assert state["round"] == 2
    exp = Experiment(load_config(out / "config.yaml"))
    exp.load_checkpoint(out)
    assert exp.round == 2
    init = Experiment(load_config(out / "config.yaml")).population["global"]
    diff = max(float((exp.population["global"][k] - init[k]).abs().max()) for k in init)
    assert diff > 1e-4  # the checkpoint holds the trained model, not the initial one
    png = (out / "metrics.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 2000
    assert png[12:16] == b"IHDR"
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert width > 100 and height > 100


def test_second_run_into_same_dir_fails_naming_resume(cli, capsys, finished_run):
    out = finished_run["out"]
    before = (out / "metrics.jsonl").read_text()
    rc = cli(["run", *finished_run["overrides"], "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "--resume" in err and str(out) in err and "Traceback" not in err
    assert err.strip().count("\n") == 0
    assert (out / "metrics.jsonl").read_text() == before  # untouched


def test_run_with_progress_display(cli, capsys, tmp_path):
    out = tmp_path / "p"
    assert cli(["run", *tiny("rounds=1"), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "written:" in captured.err and str(out) in captured.err
    assert (out / "summary.json").is_file()


def test_run_command_from_the_docs(cli, tmp_path):
    out = tmp_path / "r"
    rc = cli(
        [
            "run",
            "rounds=2",
            "data.num_clients=20",
            "cohort.clients_per_round=5",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert rc == 0


# ----- list and help ------------------------------------------------------------------------------


def test_list_everything(cli, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    assert cli(["list"]) == 0
    out = capsys.readouterr().out
    for name in ALGORITHMS:
        assert name in out
    for name in ("fedavg", "fedprox", "local", "digits", "synthetic", "dirichlet", "mlp", "adam"):
        assert name in out
    assert "mu = 0.01" in out  # fedprox's option with its default
    assert "algorithm.name" in out  # the config key to use


def test_list_algorithms_only(cli, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    assert cli(["list", "algorithms"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("fedavg", "fedprox", "local"))
    assert "mu = 0.01" in out and "proximal" in out
    assert "datasets (config key" not in out and "partitions (config key" not in out


def test_list_unknown_kind_is_a_usage_error(cli, capsys):
    with pytest.raises(SystemExit) as info:
        cli(["list", "bogus"])
    assert info.value.code == 2
    assert "bogus" in capsys.readouterr().err


def test_run_help(cli, capsys):
    with pytest.raises(SystemExit) as info:
        cli(["run", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--resume" in out and "--out" in out and "key=value" in out


# ----- failures during a run ----------------------------------------------------------------------


def test_nonfinite_model_exits_1_and_keeps_last_good_checkpoint(cli, capsys, tmp_path, monkeypatch):
    cls = ALGORITHMS["fedavg"]
    original = cls.population_update
    calls = {"n": 0}

    def update(self, population, aggregate, server):
        calls["n"] += 1
        new = original(self, population, aggregate, server)
        if calls["n"] == 3:
            new = {**new, "global": {k: v * float("nan") for k, v in new["global"].items()}}
        return new

    monkeypatch.setattr(cls, "population_update", update)
    out = tmp_path / "nan"
    rc = cli(["run", *tiny("rounds=5", "checkpoint.every=1"), "--out", str(out), "--quiet"])
    captured = capsys.readouterr()
    assert rc == 1
    err = captured.err.strip()
    assert err.startswith("fedkin: error: ") and err.count("\n") == 0
    assert "NaN/Inf in round 3" in err and "checkpoint is round 2" in err and str(out) in err
    assert "Traceback" not in captured.err
    state = torch.load(out / CHECKPOINT, weights_only=False)
    assert state["round"] == 2
    assert all(torch.isfinite(t).all() for t in state["population"]["global"].values())
    # once the cause is gone the run continues from the good checkpoint
    monkeypatch.setattr(cls, "population_update", original)
    assert cli(["run", "--resume", str(out), "--quiet"]) == 0
    assert [r["round"] for r in read_records(out) if r["kind"] == "train"] == [1, 2, 3, 4, 5]


def test_keyboard_interrupt_exits_130_and_resume_completes(cli, capsys, tmp_path, monkeypatch):
    original = Experiment.run_round

    def run_round(self):
        if self.round == 2:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(Experiment, "run_round", run_round)
    out = tmp_path / "int"
    overrides = tiny("rounds=4", "eval.every=1")
    assert cli(["run", *overrides, "--out", str(out), "--quiet"]) == 130
    err = capsys.readouterr().err
    assert "interrupted after round 2" in err and f"fedkin run --resume {out}" in err
    assert "Traceback" not in err
    monkeypatch.setattr(Experiment, "run_round", original)
    assert cli(["run", "--resume", str(out), "--quiet"]) == 0
    ref = tmp_path / "ref"
    assert cli(["run", *overrides, "--out", str(ref), "--quiet"]) == 0
    assert drop_timings(read_records(out)) == drop_timings(read_records(ref))


# ----- a real SIGINT to a real process ------------------------------------------------------------


def _wait_for_round(run_dir: Path, proc: subprocess.Popen, round_: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the run ended (rc={proc.returncode}) before it could be interrupted")
        if (run_dir / CHECKPOINT).exists():
            rounds = [r["round"] for r in _safe_records(run_dir) if r["kind"] == "train"]
            if rounds and max(rounds) >= round_:
                return
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f"round {round_} not reached within {timeout} s")


def _safe_records(run_dir: Path) -> list[dict]:
    try:
        return read_records(run_dir)
    except json.JSONDecodeError:  # a line being written right now
        return []


@pytest.mark.slow
def test_sigint_then_resume_matches_uninterrupted(cli, tmp_path):
    overrides = tiny("rounds=12", "eval.every=4", "checkpoint.every=1")
    out = tmp_path / "sig"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedkin.cli.main", "run", *overrides, "--out", str(out), "--quiet"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        # round 3's train record is written only after round 2's checkpoint
        _wait_for_round(out, proc, 3, timeout=120)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    assert "interrupted after round" in stderr and "--resume" in stderr
    assert "Traceback" not in stderr
    state = torch.load(out / CHECKPOINT, weights_only=False)
    assert 2 <= state["round"] < 12
    # "interrupted after round k": k is the checkpoint's round, or one more if the signal came
    # between finishing round k and writing its checkpoint
    said = int(re.search(r"interrupted after round (\d+)", stderr).group(1))
    assert said in (state["round"], state["round"] + 1)
    assert cli(["run", "--resume", str(out), "--quiet"]) == 0
    ref = tmp_path / "ref"
    assert cli(["run", *overrides, "--out", str(ref), "--quiet"]) == 0
    resumed, expected = drop_timings(read_records(out)), drop_timings(read_records(ref))
    assert [r["round"] for r in resumed if r["kind"] == "train"] == list(range(1, 13))
    assert resumed == expected


# ----- crash leftovers ----------------------------------------------------------------------------


def test_resume_after_crash_mid_write_of_metrics(cli, capsys, tmp_path):
    out = tmp_path / "crash"
    overrides = tiny("rounds=3", "eval.every=1")
    assert cli(["run", *overrides, "--out", str(out), "--quiet"]) == 0
    complete = drop_timings(read_records(out))
    # simulate a crash in round 3 after round 2's checkpoint: round 3's records are cut off
    lines = (out / "metrics.jsonl").read_text().splitlines(keepends=True)
    kept = [ln for ln in lines if json.loads(ln)["round"] <= 2]
    (out / "metrics.jsonl").write_text("".join(kept) + '{"round": 3, "ki')
    from fedkin.experiment import Experiment as Exp

    exp = Exp(load_config(out / "config.yaml"))
    exp.run_round()
    exp.run_round()
    exp.save_checkpoint(out)
    (out / "summary.json").unlink()
    assert cli(["run", "--resume", str(out), "--quiet"]) == 0
    assert drop_timings(read_records(out)) == complete


def test_rerun_after_interrupt_before_first_checkpoint(cli, capsys, tmp_path, monkeypatch):
    original = Experiment.evaluate

    def evaluate(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(Experiment, "evaluate", evaluate)
    out = tmp_path / "early"
    overrides = tiny("rounds=2", "eval.every=1")
    assert cli(["run", *overrides, "--out", str(out), "--quiet"]) == 130
    assert not (out / CHECKPOINT).exists()
    monkeypatch.setattr(Experiment, "evaluate", original)
    assert cli(["run", *overrides, "--out", str(out), "--quiet"]) == 0
    keys = [(r["round"], r["kind"]) for r in read_records(out)]
    assert keys == [(1, "train"), (1, "eval"), (2, "train"), (2, "eval")]


def test_interrupt_before_first_checkpoint_does_not_suggest_resume(
    cli, capsys, tmp_path, monkeypatch
):
    def run_round(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(Experiment, "run_round", run_round)
    out = tmp_path / "none"
    assert cli(["run", *tiny("rounds=2"), "--out", str(out), "--quiet"]) == 130
    err = capsys.readouterr().err
    assert not (out / CHECKPOINT).exists()
    assert "--resume" not in err


def test_resume_finished_run_without_summary_restores_eval_metrics(cli, tmp_path):
    out = tmp_path / "nosummary"
    assert cli(["run", *tiny("rounds=2"), "--out", str(out), "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    (out / "summary.json").unlink()
    assert cli(["run", "--resume", str(out), "--quiet"]) == 0
    again = json.loads((out / "summary.json").read_text())
    for key in EVAL_KEYS:
        assert again.get(key) == summary[key], key
