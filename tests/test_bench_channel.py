"""`fedkin bench compress` / `bench robust`: the JSON they print and the files they write."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_bench_compress_json_and_files(cli, capsys, tmp_path):
    assert cli(["bench", "compress", "--rounds", "1", "--json", "--out", str(tmp_path)]) == 0
    result = json.loads(capsys.readouterr().out)
    base = result["uncompressed"]
    assert set(base) == {"accuracy", "uplink_bytes"} and base["uplink_bytes"] > 0
    by_name = {r["compressor"]: r for r in result["rows"]}
    # 20 clients × one round: float32 d values vs uint16 index + float32 value per kept one
    d = base["uplink_bytes"] / (20 * 4)
    assert by_name["top_k 10% EF"]["uplink_bytes"] == 20 * 6 * -(-d // 10)
    assert by_name["bf16"]["uplink_bytes"] == base["uplink_bytes"] / 2
    assert all(0 <= r["accuracy"] <= 1 for r in result["rows"])
    assert {p.name for p in tmp_path.iterdir()} == {"compress.json", "compress.md", "compress.png"}


@pytest.mark.slow
def test_bench_robust_json_shape(cli, capsys, tmp_path, monkeypatch):
    from fedkin.bench import channel

    attacks = {"sign_flip": ["attack.name=sign_flip"], "nonfinite": ["attack.name=nonfinite"]}
    monkeypatch.setattr(channel, "ATTACKS", attacks)
    monkeypatch.setattr(
        channel, "_aggregators", lambda f: {"median": ["channel.aggregator.name=median"]}
    )
    args = ["bench", "robust", "--rounds", "1", "--fractions", "0.2", "--json"]
    assert cli([*args, "--out", str(tmp_path)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert 0 <= result["clean_fedavg"] <= 1
    assert [(r["attack"], r["aggregator"], r["fraction"]) for r in result["rows"]] == [
        ("sign_flip", "median", 0.2),
        ("nonfinite", "median", 0.2),
    ]
    assert (tmp_path / "robust.png").exists() and (tmp_path / "robust.md").exists()
    assert "Bar: best rule within 5 points of clean FedAvg" in (tmp_path / "robust.md").read_text()


def test_bench_robust_filters_name_the_allowed_labels(cli, capsys):
    with pytest.raises(SystemExit):
        cli(["bench", "robust", "--rules", "mean,medain"])
    err = capsys.readouterr().err
    assert "unknown ['medain']" in err and "trusted_direction+mean" in err


def test_robust_heatmap_draws_a_subset_of_the_attacks(tmp_path):
    """``--attacks`` with fewer attacks than the bench has: one labelled cell per run."""
    from fedkin.bench.channel import robust_heatmap

    rows = [
        {"attack": a, "aggregator": "monna", "fraction": 0.2, "accuracy": acc}
        for a, acc in (("sign_flip", 0.8), ("alie", float("nan")))
    ]
    robust_heatmap({"clean_fedavg": 0.9, "rows": rows}, tmp_path / "h.png")
    assert (tmp_path / "h.png").stat().st_size > 0


def test_compress_rows_merge_only_onto_a_reproduced_baseline():
    from fedkin.bench.channel import compress_markdown, merge_rows

    base = {"accuracy": 0.8, "uplink_bytes": 1000.0}
    old = {
        "command": "fedkin bench compress --data digits --rounds 5",
        "seconds": 1.0,
        "uncompressed": base,
        "rows": [
            {"compressor": "fedzip 10% EF", "accuracy": 0.79, "uplink_bytes": 50.0, "ratio": 20.0},
            {"compressor": "top_k 1% EF", "accuracy": 0.7, "uplink_bytes": 15.0, "ratio": 66.7},
        ],
    }
    row = {"compressor": "fedzip 5% EF", "accuracy": 0.785, "uplink_bytes": 12.5, "ratio": 80.0}
    cmd = "fedkin bench compress --data digits --rounds 5 --compressors 'fedzip 5% EF'"
    merged = merge_rows(old, {"uncompressed": dict(base), "rows": [row]}, cmd)
    # in the bench's order, the new row tagged with its command, the stored ones untouched
    assert [r["compressor"] for r in merged["rows"]] == [
        "top_k 1% EF",
        "fedzip 5% EF",
        "fedzip 10% EF",
    ]
    assert merged["rows"][1] == {**row, "command": cmd} and merged["command"] == old["command"]
    text = compress_markdown(merged, merged["command"])
    assert "| fedzip 5% EF† | 0.785 | -1.5 |" in text and f"† Added by `{cmd}`" in text
    assert "**met** by fedzip 5% EF;" in text  # 80× at -1.5 points; top-k 1% is -10 points
    missed = {**merged, "rows": [r for r in merged["rows"] if r["compressor"] != "fedzip 5% EF"]}
    assert "**missed**" in compress_markdown(missed, merged["command"])
    other = {"uncompressed": {**base, "accuracy": 0.81}, "rows": [row]}
    with pytest.raises(SystemExit, match="does not match"):
        merge_rows(old, other, cmd)
    with pytest.raises(SystemExit, match="does not match"):
        merge_rows(old, {"uncompressed": dict(base), "rows": [row]}, cmd.replace("5", "6", 1))
