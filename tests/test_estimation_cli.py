"""`fedkin estimate` and `fedkin bench estimation` end to end, including every bad input."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest

from fedkin.cli.main import main


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def scalar_csv(tmp_path: Path) -> Path:
    lines = ["client,value"]
    for i in range(12):
        lines += [f"c{i},{i % 4 + j * 0.5}" for j in range(4)]
    lines.append("solo,2.5")  # a client with a single sample
    return write(tmp_path / "data.csv", "\n".join(lines) + "\n")


def run_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedkin: error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_estimate_writes_one_row_per_client(tmp_path: Path, capsys) -> None:
    out = tmp_path / "est" / "est.csv"
    assert main(["estimate", str(scalar_csv(tmp_path)), "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "family: gaussian" in stdout and "wrote" in stdout
    assert "1 client(s) have a single sample" in stdout
    table = rows(out)
    assert [r["client"] for r in table] == [f"c{i}" for i in range(12)] + ["solo"]
    assert list(table[0]) == ["client", "n", "estimate", "posterior_sd"]
    solo = table[-1]
    assert solo["n"] == "1" and float(solo["estimate"]) and float(solo["posterior_sd"]) > 0


@pytest.mark.parametrize("method", ["local", "global", "james-stein", "empirical-bayes"])
def test_every_method_runs(tmp_path: Path, capsys, method: str) -> None:
    out = tmp_path / "est.csv"
    assert main(["estimate", str(scalar_csv(tmp_path)), "--out", str(out), "--method", method]) == 0
    header = list(rows(out)[0])
    assert {"local": "std_error", "empirical-bayes": "posterior_sd"}.get(method, "n") in header
    assert f"method: {method}" in capsys.readouterr().out


def test_bernoulli_is_detected_and_stated(tmp_path: Path, capsys) -> None:
    lines = ["client,value"] + [f"u{i},{(i * j) % 3 == 0:d}" for i in range(10) for j in range(6)]
    data = write(tmp_path / "rates.csv", "\n".join(lines))
    out = tmp_path / "est.csv"
    assert main(["estimate", str(data), "--out", str(out)]) == 0
    assert "family: bernoulli (auto-detected: every value is 0 or 1)" in capsys.readouterr().out
    assert all(0 <= float(r["estimate"]) <= 1 for r in rows(out))


def test_vector_data(tmp_path: Path, capsys) -> None:
    lines = ["client,value_x,value_y,comment"]
    lines += [f"c{i},{i + j},{-i * j},note" for i in range(6) for j in range(3)]
    out = tmp_path / "est.csv"
    code = main(
        [
            "estimate",
            str(write(tmp_path / "v.csv", "\n".join(lines))),
            "--out",
            str(out),
            "--per-coordinate",
        ]
    )
    assert code == 0
    assert list(rows(out)[0]) == [
        "client",
        "n",
        "estimate_x",
        "estimate_y",
        "posterior_sd_x",
        "posterior_sd_y",
    ]


def test_private_estimate_prints_spent_epsilon(tmp_path: Path, capsys) -> None:
    out = tmp_path / "est.csv"
    code = main(
        [
            "estimate",
            str(scalar_csv(tmp_path)),
            "--out",
            str(out),
            "--epsilon",
            "2",
            "--delta",
            "1e-3",
            "--clip-range",
            "0",
            "5",
            "--seed",
            "1",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0
    spent = float(re.search(r"spent ε = ([0-9.]+)", captured.out).group(1))
    assert 1.99 < spent <= 2.0
    assert "PLD accountant" in captured.out and "clip range [0, 5]" in captured.out
    assert "--seed makes the privacy noise reproducible" in captured.err
    assert len(rows(out)) == 13


def test_data_dependent_clip_range_warns(tmp_path: Path, capsys) -> None:
    code = main(
        [
            "estimate",
            str(scalar_csv(tmp_path)),
            "--out",
            str(tmp_path / "e.csv"),
            "--epsilon",
            "1",
            "--clip-range-from-data",
        ]
    )
    assert code == 0
    err = capsys.readouterr().err
    assert "fedkin: warning: the clip range was read from the data" in err
    assert "voids the (ε, δ) guarantee" in err


def test_all_single_sample_clients(tmp_path: Path, capsys) -> None:
    data = write(tmp_path / "s.csv", "client,value\na,1\nb,2.5\nc,4\nd,0.5\n")
    message = run_error(capsys, ["estimate", str(data), "--out", str(tmp_path / "e.csv")])
    assert "single sample" in message and "--sigma2" in message
    assert main(["estimate", str(data), "--out", str(tmp_path / "e.csv"), "--sigma2", "1"]) == 0


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("", "is empty"),
        ("\n\n", "is empty"),
        ("client,value\n", "no data rows"),
        ("id,value\na,1\n", "no 'client' column; found: id, value"),
        ("client,score\na,1\n", "no 'value' column"),
        ("client,value,value_a\na,1,2\n", "not both"),
        ("client,value\na,1\nb,abc\n", "line 3, column 'value': 'abc' is not a number"),
        ("client,value\na,1\nb,\n", "line 3, column 'value': empty value"),
        ("client,value\na,nan\n", "not a finite number"),
        ("client,value\na,1,2\n", "line 2: 3 fields, but the header has 2"),
        ("client,value\n,1\n", "line 2: the 'client' field is empty"),
    ],
)
def test_bad_files(tmp_path: Path, capsys, content: str, expected: str) -> None:
    data = write(tmp_path / "bad.csv", content)
    assert expected in run_error(capsys, ["estimate", str(data), "--out", str(tmp_path / "e.csv")])


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--epsilon", "0"], "--epsilon must be a number > 0"),
        (["--epsilon", "-1"], "--epsilon must be a number > 0"),
        (["--epsilon", "1", "--delta", "0"], "--delta must be in (0, 1)"),
        (["--epsilon", "1", "--delta", "1.5"], "--delta must be in (0, 1)"),
        (["--delta", "1e-6"], "--delta needs --epsilon"),
        (["--clip-range", "0", "1"], "--clip-range needs --epsilon"),
        (["--epsilon", "1", "--clip-range", "3", "1"], "finite LO < HI"),
        (["--epsilon", "1", "--method", "local"], "shares nothing"),
        (["--family", "bernoulli"], "0 or 1"),
        (["--sigma2", "-2"], "sigma2 must be a finite number > 0"),
    ],
)
def test_bad_options(tmp_path: Path, capsys, extra: list[str], expected: str) -> None:
    argv = ["estimate", str(scalar_csv(tmp_path)), "--out", str(tmp_path / "e.csv"), *extra]
    assert expected in run_error(capsys, argv)


def test_missing_arguments_and_files(tmp_path: Path, capsys) -> None:
    assert "no such file" in run_error(
        capsys, ["estimate", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "e.csv")]
    )
    assert "--out EST.csv is required" in run_error(capsys, ["estimate", str(scalar_csv(tmp_path))])
    assert "give DATA.csv" in run_error(capsys, ["estimate", "--out", "x.csv"])
    assert "drop DATA.csv" in run_error(
        capsys, ["estimate", str(scalar_csv(tmp_path)), "--simulate"]
    )


def test_simulate_prints_table_and_command(tmp_path: Path, capsys) -> None:
    argv = [
        "estimate",
        "--simulate",
        "--clients",
        "60",
        "--reps",
        "2",
        "--epsilons",
        "1",
        "--no-plots",
        "--out",
        str(tmp_path),
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for name in ("local", "global", "james-stein", "empirical-bayes", "private EB ε=1", "oracle"):
        assert name in out
    assert "reproduce: fedkin bench estimation --clients 60 --samples 10" in out
    assert "--no-plots" in out


def test_bench_writes_the_four_plots(tmp_path: Path, capsys) -> None:
    argv = [
        "bench",
        "estimation",
        "--clients",
        "50",
        "--samples",
        "5",
        "--reps",
        "2",
        "--epsilons",
        "0.5",
        "--out",
        str(tmp_path / "plots"),
    ]
    assert main(argv) == 0
    for name in ("clients", "samples", "tau2", "epsilon"):
        path = tmp_path / "plots" / f"mse_vs_{name}.png"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert run_error(capsys, ["bench", "estimation", "--reps", "1"]).endswith(
        "--reps must be >= 2 (for a standard error), got 1"
    )
