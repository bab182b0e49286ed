"""Tables printed off a terminal (CI logs, pipes) keep every cell whole."""

from __future__ import annotations

import io

from rich.console import Console
from rich.table import Table

from fedkin.bench.scale import print_table as print_scale_table
from fedkin.display import print_table


def _wide_table() -> tuple[Table, list[str]]:
    table = Table(title="twelve numeric columns")
    cells = [f"{1_000_000 + i:,}" for i in range(12)]
    for i in range(12):
        table.add_column(f"column number {i}", justify="right")
    table.add_row(*cells)
    return table, cells


def test_cells_stay_whole_when_not_a_terminal():
    table, cells = _wide_table()
    cut = Console(file=io.StringIO(), width=80)
    cut.print(table)  # what rich does by default: cells cut to "1,0…"
    assert not all(c in cut.file.getvalue() for c in cells)

    out = Console(file=io.StringIO(), width=80)
    print_table(table, out)
    assert all(c in out.file.getvalue() for c in cells)


def test_bench_scale_table_whole_in_a_pipe(capsys, monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    row = {
        "population": 1_000_000,
        "clients_per_round": 1_000,
        "s_per_round": 0.52,
        "s_per_round_min": 0.5,
        "engine_s": 0.3,
        "store_s": 0.2,
        "sample_s": 0.02,
        "peak_rss_mb": 1287.0,
        "anon_rss_mb_end": 900.0,
        "clients_trained": 3_000,
        "store_allocated_bytes": 185 * 2**20,
        "store_bytes_per_trained_client": 45 * 1024,
        "dense_store_bytes": 36_700 * 2**20,
        "state_bytes_per_client": 36_700,
        "threads": 2,
    }
    print_scale_table([row], "ditto", "fedkin bench scale")
    out = capsys.readouterr().out
    for cell in ("1,000,000", "1,000", "0.52 (0.50)", "1,287", "3,000", "36,700.0", "45.0"):
        assert cell in out, cell
