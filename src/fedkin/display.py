"""Printing tables that stay whole: on a terminal rich fits a table to the window, but piped
output (CI logs, ``| tee``) gets rich's default 80 columns, which cuts numeric cells to
``1,0…``. Off a terminal, a table is printed at the width it needs instead."""

from __future__ import annotations

from rich.console import Console
from rich.measure import Measurement
from rich.table import Table


def print_table(table: Table, console: Console | None = None) -> None:
    """Print ``table``; when ``console`` is not a terminal, at its full natural width."""
    console = console or Console()
    if console.is_terminal:
        console.print(table)
        return
    unbounded = console.options.update(max_width=1_000_000)
    needed = Measurement.get(console, unbounded, table).maximum
    width = console.width  # Console.print caps a per-call width at the console's own
    console.width = max(width, needed)
    try:
        console.print(table, crop=False)
    finally:
        console.width = width
