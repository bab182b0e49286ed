"""Per-round curves of several `fedkin run` directories: one PNG and a Markdown table.

    python scripts/round_curves.py OUT_DIR LABEL=RUN_DIR [LABEL=RUN_DIR ...]

Reads each run's metrics.jsonl (eval records) and plots global-model accuracy, global-model
loss and personal accuracy against the round; writes OUT_DIR/curves.png and OUT_DIR/curves.md.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

PANELS = [
    ("global_acc_weighted", "global-model accuracy"),
    ("global_loss", "global-model test loss"),
    ("personal_acc_mean", "personal accuracy (mean)"),
]


def evals(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("kind") == "eval"]


def main(out: Path, runs: dict[str, Path]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    data = {label: evals(path) for label, path in runs.items()}
    fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 3.6))
    for ax, (key, title) in zip(axes, PANELS, strict=True):
        for label, rows in data.items():
            ax.plot([r["round"] for r in rows], [r.get(key) for r in rows], marker="o", label=label)
        ax.set_title(title)
        ax.set_xlabel("round")
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    header = "| run | round | " + " | ".join(t for _, t in PANELS) + " |"
    lines = [header, "|---|---:|" + "---:|" * len(PANELS)]
    for label, rows in data.items():
        for r in rows:
            cells = " | ".join(f"{r.get(k, float('nan')):.4f}" for k, _ in PANELS)
            lines.append(f"| {label} | {r['round']} | {cells} |")
    (out / "curves.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    pairs = (arg.rsplit("=", 1) for arg in sys.argv[2:])
    main(Path(sys.argv[1]), {label: Path(path) for label, path in pairs})
