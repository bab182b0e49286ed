"""Trackers: subscribers to a run's records (console progress, metrics.jsonl, summary, plots)."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any, ClassVar

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from fedkin.display import print_table

METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
PLOT = "metrics.png"


def read_records(run_dir: Path) -> list[dict[str, Any]]:
    """Records of ``metrics.jsonl``; a last line cut off by a crash mid-write is skipped."""
    path = Path(run_dir) / METRICS
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines[:-1]]
    # an unparsable last line is a record whose write was interrupted; its round is recomputed
    with contextlib.suppress(json.JSONDecodeError, IndexError):
        records.append(json.loads(lines[-1]))
    return records


def truncate_records(run_dir: Path, last_round: int) -> None:
    """Drop records after ``last_round`` (those of rounds the checkpoint does not cover)."""
    kept = [r for r in read_records(run_dir) if r["round"] <= last_round]
    (Path(run_dir) / METRICS).write_text("".join(json.dumps(r) + "\n" for r in kept))


class JsonlTracker:
    """Appends one JSON line per record to ``metrics.jsonl``; writes ``summary.json`` at the end."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)

    def start(self, info: dict[str, Any]) -> None:
        self._file = open(self.run_dir / METRICS, "a")  # noqa: SIM115 (closed in finish)

    def record(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def finish(self, summary: dict[str, Any]) -> None:
        self._file.close()
        (self.run_dir / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")


class PlotTracker:
    """Writes ``metrics.png``: train loss and accuracies over rounds, from ``metrics.jsonl``."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)

    def start(self, info: dict[str, Any]) -> None: ...

    def record(self, record: dict[str, Any]) -> None: ...

    def finish(self, summary: dict[str, Any]) -> None:
        plot_run(self.run_dir)


def plot_run(run_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_records(run_dir)
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    # under DP without privacy.release_diagnostics only ε is recorded (fedkin.privacy.release)
    key, label = ("train_loss", "train loss (clients' mean)")
    if not any(key in r for r in train):
        key, label = ("epsilon", "ε spent")
    pts = [(r["round"], r[key]) for r in train if key in r]
    if pts:
        ax_loss.plot(*zip(*pts, strict=True))
    ax_loss.set(xlabel="round", ylabel=label, title=label)
    for key, label in [
        ("global_acc_weighted", "global model"),
        ("personal_acc_mean", "personal (mean over clients)"),
        ("personal_acc_p10", "personal (10th percentile)"),
    ]:
        pts = [(r["round"], r[key]) for r in evals if key in r]
        if pts:
            ax_acc.plot(*zip(*pts, strict=True), marker="o", label=label)
    ax_acc.set(xlabel="round", ylabel="test accuracy", title="accuracy on clients' test splits")
    if ax_acc.lines:
        ax_acc.legend()
    fig.tight_layout()
    out = Path(run_dir) / PLOT
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def _bytes(n: float) -> str:
    """A byte count for the progress line: 512 B, 3.4 kB, 12.0 MB, 1.5 GB (powers of 1000)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


class ConsoleTracker:
    """Live progress bar (round, elapsed, ETA, current metrics) and a final summary table."""

    #: record key → short label on the progress line
    SHOWN: ClassVar[dict[str, str]] = {
        "train_loss": "loss",
        "global_acc_weighted": "global acc",
        "personal_acc_mean": "personal acc",
        "epsilon": "ε",
        "rejected_updates": "rejected",
        "uplink_bytes_total": "uplink",
        "downlink_bytes_total": "downlink",
    }

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.latest: dict[str, Any] = {}

    def start(self, info: dict[str, Any]) -> None:
        ds = info["dataset"]
        self.console.print(
            f"[bold]{info['name']}[/]: {ds.get('name', '')} with "
            f"{ds.get('num_clients', '?')} clients; run directory [cyan]{info['run_dir']}[/]"
        )
        self.progress = Progress(
            TextColumn("round {task.completed}/{task.total}"),
            BarColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[metrics]}"),
            console=self.console,
            transient=False,
        )
        self.progress.start()
        self.task = self.progress.add_task(
            "train", total=info["rounds"], completed=info["start_round"], metrics=""
        )

    def record(self, record: dict[str, Any]) -> None:
        self.latest.update({k: v for k, v in record.items() if k in self.SHOWN})
        text = "  ".join(
            f"{self.SHOWN[k]} {_bytes(v) if k.endswith('_bytes_total') else _fmt(v)}"
            for k in self.SHOWN
            if (v := self.latest.get(k)) is not None
        )
        self.progress.update(self.task, completed=record["round"], metrics=text)

    def finish(self, summary: dict[str, Any]) -> None:
        self.progress.stop()
        print_table(summary_table(summary), self.console)

    def abort(self) -> None:
        self.progress.stop()


def summary_table(summary: dict[str, Any]) -> Table:
    table = Table(title=f"fedkin run: {summary.get('name', '')} ({summary.get('algorithm', '')})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in summary.items():
        if k not in ("name", "algorithm") and not k.endswith("_by_client"):
            table.add_row(k, _fmt(v))
    return table
