"""`fedkin bench robust` and `fedkin bench compress`: what the channel costs and protects.

Workload (both): digits (scikit-learn's 8×8, 1,797 images) split among 50 clients with
Dirichlet(0.5) label skew, an MLP 64-32-10, fixed cohorts of 20 clients per round, 5 local SGD
steps of batch 16 (lr 0.1), server SGD lr 1, uniform client weights, seed 0; ``--rounds``
rounds (default 100 robust, 150 compress). Reported: the global model's test accuracy after the
last round, weighted by test-set size over the training clients (``global_acc_weighted``).
``--data fashion-mnist`` switches to Fashion-MNIST (784 features, MLP 784-64-10, 100 clients).
One torch intra-op thread by default (``--threads``): the models are tiny and the machine shared.

Robust. Every attack × every aggregation rule, with 10% and 20% of the population Byzantine
(a fixed seeded subset, so about 2 or 4 of the 20 in a cohort); rules that take f declare
f = fraction × cohort. Each row also carries the rule's clean accuracy (no attack, same f), and
the run reports clean FedAvg (weighted mean, no attack). Attacks and rules use their default
options (``fedkin list attacks`` / ``aggregators``), plus labelled variants:
``sign_flip×5`` (sign flip with scale 5: a unit flip leaves the mean's aggregate
(1 − 2f/n)·μ, still a descent direction, while s > n/f − 1 = 4 reverses it at 20%);
``centered_clipping τ=0.2 L=3`` (the default τ = 1 never binds here — honest updates lie
0.33–0.53 from the round mean in clean FedAvg — so that row equals the mean; τ = 0.2 is about half
that distance, with the 3 iterations of Karimireddy et al.'s experiments), and the same with the
clients' momentum β = 0.9 (``channel.momentum``, as Karimireddy et al. pair it); ``monna`` is
the clients' momentum (β = 0.9, implied) then nearest-neighbour averaging, ``monna β=0`` the
averaging alone;
``trusted_direction+mean`` (the mean after the trusted-direction step: the orthogonal part of
each update clipped to its norm inside the top-8 singular directions of 16 updates the server
computes on 64 trusted examples every 5 rounds). ``nnm+trimmed_mean`` is trimmed mean after
nearest-neighbour mixing (both with f). 100 rounds by default: at 30 rounds clean FedAvg is
still climbing (0.879, vs 0.934 at 100), and a table taken there measures slowdown as much as
robustness.

Compress. One run per compressor (error feedback where it is the default), the mean rule
(= FedAvg under uniform weights) so the byte counts are recorded; uplink bytes are the encoded
buffers' lengths summed over all clients and rounds. ``uncompressed`` is the ``none`` codec
(float32, 4 bytes per coordinate). ``--compressors`` runs the uncompressed baseline and the
listed rows only, and adds them (marked with their command) to the stored result of the same
workload — only if the baseline reproduces the stored one exactly.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

DEFAULT_OUT = Path("benchmarks/results")
COHORT = 20
#: Attack label → overrides (``attack.fraction`` is added per run).
ATTACKS: dict[str, list[str]] = {
    name: [f"attack.name={name}"]
    for name in (
        "sign_flip",
        "scaled",
        "gaussian",
        "label_flip",
        "nonfinite",
        "alie",
        "ipm",
        "mimic",
    )
}
ATTACKS["sign_flip×5"] = ["attack.name=sign_flip", "attack.scale=5"]
#: The trusted-direction step of the bench: clip the part of each update outside the top-8
#: singular directions of 16 trusted updates to its in-subspace norm.
TRUSTED = "{name: trusted_direction, k: 8, updates: 16, mode: clip, ratio: 1}"


def _aggregators(f: int) -> dict[str, list[str]]:
    """Rule label → overrides (the rules that take f get it)."""
    fr = f"channel.aggregator.f={f}"
    return {
        "mean": ["channel.aggregator.name=mean"],
        "median": ["channel.aggregator.name=median"],
        "trimmed_mean": ["channel.aggregator.name=trimmed_mean", fr],
        "krum": ["channel.aggregator.name=krum", fr],
        "multi_krum": ["channel.aggregator.name=multi_krum", fr],
        "geometric_median": ["channel.aggregator.name=geometric_median"],
        "centered_clipping": ["channel.aggregator.name=centered_clipping"],
        "centered_clipping τ=0.2 L=3": [
            "channel.aggregator.name=centered_clipping",
            "channel.aggregator.tau=0.2",
            "channel.aggregator.iterations=3",
        ],
        "centered_clipping τ=0.2 L=3 β=0.9": [
            "channel.aggregator.name=centered_clipping",
            "channel.aggregator.tau=0.2",
            "channel.aggregator.iterations=3",
            "channel.momentum.beta=0.9",
        ],
        "mda": ["channel.aggregator.name=mda", fr],
        "monna": ["channel.aggregator.name=monna", fr],
        "monna β=0": ["channel.aggregator.name=monna", fr, "channel.momentum.beta=0"],
        "edit": ["channel.aggregator.name=edit"],
        "nnm+trimmed_mean": [
            "channel.aggregator.name=trimmed_mean",
            fr,
            f"channel.aggregator.pre=[{{name: nnm, f: {f}}}]",
        ],
        "trusted_direction+mean": [
            "channel.aggregator.name=mean",
            f"channel.aggregator.pre=[{TRUSTED}]",
        ],
    }


COMPRESSORS: dict[str, list[str]] = {
    "top_k 1% EF": ["channel.compress.name=top_k", "channel.compress.density=0.01"],
    "top_k 1% no EF": [
        "channel.compress.name=top_k",
        "channel.compress.density=0.01",
        "channel.compress.error_feedback=false",
    ],
    "top_k 10% EF": ["channel.compress.name=top_k", "channel.compress.density=0.1"],
    "random_k 10% EF": ["channel.compress.name=random_k", "channel.compress.density=0.1"],
    "qsgd s=4": ["channel.compress.name=qsgd", "channel.compress.levels=4"],
    "sign EF": ["channel.compress.name=sign"],
    "int8": ["channel.compress.name=int8"],
    "bf16": ["channel.compress.name=bf16"],
    "fedzip 1% EF": ["channel.compress.name=fedzip", "channel.compress.density=0.01"],
    "fedzip 2% EF": ["channel.compress.name=fedzip", "channel.compress.density=0.02"],
    "fedzip 2% EF 16 clusters": [
        "channel.compress.name=fedzip",
        "channel.compress.density=0.02",
        "channel.compress.clusters=16",
    ],
    "fedzip 5% EF": ["channel.compress.name=fedzip", "channel.compress.density=0.05"],
    "fedzip 7% EF": ["channel.compress.name=fedzip", "channel.compress.density=0.07"],
    "fedzip 10% EF": ["channel.compress.name=fedzip", "channel.compress.density=0.1"],
}


def workload(data: str, rounds: int) -> list[str]:
    common = [
        f"rounds={rounds}",
        "data.partition.name=dirichlet",
        "data.partition.alpha=0.5",
        f"cohort.clients_per_round={COHORT}",
        "cohort.weighting=uniform",
        "model.name=mlp",
        "client.local_steps=5",
        "client.batch_size=16",
        "client.optimizer.name=sgd",
        "client.optimizer.lr=0.1",
        "eval.holdout_clients=0",
        "seed=0",
    ]
    if data == "digits":
        return ["data.name=digits", "data.num_clients=50", "model.hidden=[32]", *common]
    return ["data.name=fashion-mnist", "data.num_clients=100", "model.hidden=[64]", *common]


class Trainer:
    """Runs configs that share one dataset (built once) and returns their final records."""

    def __init__(self, base: list[str]) -> None:
        from fedkin.config import load_config
        from fedkin.data import build_dataset

        self.base = base
        config = load_config(None, base)
        self.dataset = build_dataset(config.data, config.seed)

    def __call__(self, overrides: list[str]) -> dict[str, Any]:
        from fedkin.config import load_config
        from fedkin.core.errors import NonFiniteModelError
        from fedkin.experiment import Experiment

        exp = Experiment(load_config(None, [*self.base, *overrides]), dataset=self.dataset)
        uplink = 0.0
        try:
            for _ in range(exp.config.rounds):
                uplink = exp.run_round().get("uplink_bytes_total", uplink)
        except NonFiniteModelError:  # the attack made the model diverge: chance-level
            return {"accuracy": float("nan"), "uplink_bytes": uplink, "diverged": True}
        acc = exp.evaluate()["global_acc_weighted"]
        return {"accuracy": acc, "uplink_bytes": uplink, "diverged": False}


# ----- robust ----------------------------------------------------------------------------------


def robust(
    data: str,
    rounds: int,
    fractions: list[float],
    log=print,
    rules: list[str] | None = None,
    attacks: list[str] | None = None,
) -> dict[str, Any]:
    """Every attack × every rule (or the labels in ``rules`` / ``attacks``)."""
    train = Trainer(workload(data, rounds))
    chosen = {a: o for a, o in ATTACKS.items() if attacks is None or a in attacks}
    t0 = time.perf_counter()
    clean_fedavg = train([])["accuracy"]
    rows = []
    for fraction in fractions:
        f = round(fraction * COHORT)
        for label, agg in _aggregators(f).items():
            if rules is not None and label not in rules:
                continue
            clean = train(agg)["accuracy"]
            for attack, overrides in chosen.items():
                out = train([*agg, *overrides, f"attack.fraction={fraction}"])
                rows.append(
                    {
                        "attack": attack,
                        "aggregator": label,
                        "fraction": fraction,
                        "accuracy": out["accuracy"],
                        "clean_accuracy": clean,
                        "diverged": out["diverged"],
                    }
                )
            log(f"{fraction:.0%} {label}: clean {clean:.3f}  ({time.perf_counter() - t0:.0f} s)")
    return {"clean_fedavg": clean_fedavg, "rows": rows}


def robust_markdown(result: dict[str, Any], command: str) -> str:
    rows, clean = result["rows"], result["clean_fedavg"]
    lines = [
        "# fedkin bench robust",
        "",
        f"Command: `{command}` ({result['seconds']:.0f} s). Workload and definitions: the "
        "docstring of `fedkin/bench/channel.py`.",
        "",
        f"Clean FedAvg (weighted mean, no attack): **{clean:.3f}**. Cells: final global test "
        "accuracy; `div` = the population model became NaN/Inf and the run stopped.",
    ]
    attacks = list(dict.fromkeys(r["attack"] for r in rows))
    for fraction in sorted({r["fraction"] for r in rows}):
        sub = [r for r in rows if r["fraction"] == fraction]
        aggs = list(dict.fromkeys(r["aggregator"] for r in sub))
        lines += ["", f"## {fraction:.0%} Byzantine", ""]
        lines.append("| rule | clean | " + " | ".join(attacks) + " |")
        lines.append("|---" * (len(attacks) + 2) + "|")
        for agg in aggs:
            cells = {r["attack"]: r for r in sub if r["aggregator"] == agg}
            clean_acc = next(iter(cells.values()))["clean_accuracy"]
            vals = [
                "div" if cells[a]["diverged"] else f"{cells[a]['accuracy']:.3f}" for a in attacks
            ]
            lines.append(f"| {agg} | {clean_acc:.3f} | " + " | ".join(vals) + " |")
        lines += ["", "Best rule per attack (gap to clean FedAvg):", ""]
        for attack in attacks:
            ok = [r for r in sub if r["attack"] == attack and not r["diverged"]]
            if not ok:
                lines.append(f"- {attack}: every rule diverged")
                continue
            best = max(ok, key=lambda r: r["accuracy"])
            gap = 100 * (clean - best["accuracy"])
            lines.append(
                f"- {attack}: {best['aggregator']} {best['accuracy']:.3f} ({gap:+.1f} points "
                "below clean FedAvg)"
            )
        lines += ["", *_bar(sub, clean)]
    return "\n".join(lines) + "\n"


def _bar(rows: list[dict[str, Any]], clean: float) -> list[str]:
    """The issue's bar, read off the measured rows: every attack's best rule within 5 points of
    clean FedAvg, and how far the plain mean falls under each attack."""
    gaps = {}
    for attack in dict.fromkeys(r["attack"] for r in rows):
        ok = [r["accuracy"] for r in rows if r["attack"] == attack and not r["diverged"]]
        gaps[attack] = 100 * (clean - max(ok)) if ok else float("inf")
    missed = [f"{a} ({g:.1f})" for a, g in gaps.items() if g > 5]
    mean = {r["attack"]: r for r in rows if r["aggregator"] == "mean"}
    falls = ", ".join(
        f"{a} " + ("div" if r["diverged"] else f"{100 * (clean - r['accuracy']):.1f}")
        for a, r in mean.items()
    )
    return [
        "Bar: best rule within 5 points of clean FedAvg for every attack: "
        + ("**met**" if not missed else "**missed** for " + ", ".join(missed)),
        "",
        f"Plain mean, points below clean FedAvg: {falls}.",
    ]


def robust_heatmap(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fractions = sorted({r["fraction"] for r in result["rows"]})
    fig, axes = plt.subplots(1, len(fractions), figsize=(8 * len(fractions), 6), squeeze=False)
    fig.subplots_adjust(wspace=0.45)
    for ax, fraction in zip(axes[0], fractions, strict=True):
        sub = [r for r in result["rows"] if r["fraction"] == fraction]
        aggs = list(dict.fromkeys(r["aggregator"] for r in sub))
        attacks = list(dict.fromkeys(r["attack"] for r in sub))
        grid = np.full((len(aggs), len(attacks)), np.nan)
        for r in sub:
            grid[aggs.index(r["aggregator"]), attacks.index(r["attack"])] = r["accuracy"]
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(len(attacks)), attacks, rotation=45, ha="right")
        ax.set_yticks(range(len(aggs)), aggs)
        for i in range(len(aggs)):
            for j in range(len(attacks)):
                text = "div" if np.isnan(grid[i, j]) else f"{grid[i, j]:.2f}"
                ax.text(j, i, text, ha="center", va="center", fontsize=7, color="w")
        ax.set_title(f"{fraction:.0%} Byzantine (clean FedAvg {result['clean_fedavg']:.2f})")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="global test accuracy")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


# ----- compress --------------------------------------------------------------------------------


def compress(data: str, rounds: int, log=print, labels: list[str] | None = None) -> dict[str, Any]:
    """The uncompressed run, then one run per compressor (or per label in ``labels``)."""
    train = Trainer(workload(data, rounds))
    mean = ["channel.aggregator.name=mean"]
    base = train([*mean, "channel.compress.name=none"])
    rows = []
    for label, overrides in COMPRESSORS.items():
        if labels is not None and label not in labels:
            continue
        out = train([*mean, *overrides])
        rows.append(
            {
                "compressor": label,
                "accuracy": out["accuracy"],
                "uplink_bytes": out["uplink_bytes"],
                "ratio": base["uplink_bytes"] / out["uplink_bytes"],
            }
        )
        log(f"{label}: {out['accuracy']:.3f}, {out['uplink_bytes']:.0f} B")
    return {
        "uncompressed": {"accuracy": base["accuracy"], "uplink_bytes": base["uplink_bytes"]},
        "rows": rows,
    }


def compress_markdown(result: dict[str, Any], command: str) -> str:
    base = result["uncompressed"]
    lines = [
        "# fedkin bench compress",
        "",
        f"Command: `{command}` ({result['seconds']:.0f} s). Workload and definitions: the "
        "docstring of `fedkin/bench/channel.py`.",
        "",
        "| compressor | accuracy | Δ vs uncompressed (points) | uplink bytes | fewer bytes |",
        "|---|---|---|---|---|",
        f"| uncompressed (float32) | {base['accuracy']:.3f} | 0 | {base['uplink_bytes']:.0f} | "
        "1× |",
    ]
    added = list(dict.fromkeys(r["command"] for r in result["rows"] if "command" in r))
    for r in result["rows"]:
        delta = 100 * (r["accuracy"] - base["accuracy"])
        mark = "†" * (added.index(r["command"]) + 1) if "command" in r else ""
        lines.append(
            f"| {r['compressor']}{mark} | {r['accuracy']:.3f} | {delta:+.1f} | "
            f"{r['uplink_bytes']:.0f} | {r['ratio']:.1f}× |"
        )
    if added:
        lines.append("")
    for i, cmd in enumerate(added):
        lines.append(
            f"{'†' * (i + 1)} Added by `{cmd}`, whose uncompressed run reproduced the row above "
            "exactly (same accuracy and bytes)."
        )
    return "\n".join([*lines, "", _compress_bar(result)]) + "\n"


def _compress_bar(result: dict[str, Any]) -> str:
    """The issue's bar, read off the rows: top-k with error feedback at 1% density, or a FedZip
    row, within 2 points of uncompressed accuracy with at least 50× fewer uplink bytes."""
    base = result["uncompressed"]["accuracy"]
    eligible = [
        r
        for r in result["rows"]
        if r["compressor"] == "top_k 1% EF" or r["compressor"].startswith("fedzip")
    ]
    meeting = [r for r in eligible if r["ratio"] >= 50 and 100 * (base - r["accuracy"]) <= 2]
    if meeting:
        best = max(meeting, key=lambda r: r["ratio"])
        return (
            "Bar (top_k 1% EF or FedZip within 2 points at ≥ 50× fewer uplink bytes): **met** by "
            + ", ".join(r["compressor"] for r in meeting)
            + f"; highest ratio {best['compressor']} {best['ratio']:.1f}× at "
            f"{100 * (best['accuracy'] - base):+.1f} points."
        )
    return (
        "Bar (top_k 1% EF or FedZip within 2 points at ≥ 50× fewer uplink bytes): **missed** — "
        "no eligible row is within 2 points at ≥ 50×."
    )


def merge_rows(old: dict[str, Any], new: dict[str, Any], command: str) -> dict[str, Any]:
    """Add the rows of a ``--compressors`` run (tagged with its command) to a stored result of
    the same workload. Refused unless the new run's uncompressed baseline equals the stored one
    exactly: only then are the rows comparable."""
    same_workload = old["command"].split(" --compressors")[0] == command.split(" --compressors")[0]
    if not same_workload or old["uncompressed"] != new["uncompressed"]:
        raise SystemExit(
            f"--compressors: the stored result ({old['command']}, uncompressed "
            f"{old['uncompressed']}) does not match this run ({new['uncompressed']}); "
            "rerun without --compressors or pass another --out"
        )
    fresh = {r["compressor"]: {**r, "command": command} for r in new["rows"]}
    rows = {r["compressor"]: r for r in old["rows"]} | fresh
    order = [label for label in COMPRESSORS if label in rows]
    return {**old, "rows": [rows[label] for label in order]}


def compress_plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    base = result["uncompressed"]
    ax.scatter([base["uplink_bytes"]], [base["accuracy"]], color="k", label="uncompressed")
    for r in result["rows"]:
        ax.scatter([r["uplink_bytes"]], [r["accuracy"]])
        ax.annotate(r["compressor"], (r["uplink_bytes"], r["accuracy"]), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("uplink bytes (all clients, all rounds)")
    ax.set_ylabel("global test accuracy")
    ax.legend(loc="lower right")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


# ----- CLI -------------------------------------------------------------------------------------


def register_bench(sub: argparse._SubParsersAction) -> None:
    summary = __doc__.split("\n\n")[0]
    for name, rounds, func in (("robust", 100, cmd_robust), ("compress", 150, cmd_compress)):
        p = sub.add_parser(name, help=summary.split(": ", 1)[1], description=__doc__)
        p.add_argument("--data", choices=["digits", "fashion-mnist"], default="digits")
        p.add_argument("--rounds", type=int, default=rounds, help=f"rounds (default {rounds})")
        p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results directory")
        p.add_argument("--json", action="store_true", help="print JSON instead of a summary")
        p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
        if name == "compress":
            p.add_argument(
                "--compressors",
                type=_labels(list(COMPRESSORS)),
                help="comma-separated compressor labels (default: all); their rows are added to "
                "the stored result of the same workload, which must reproduce its uncompressed "
                "run exactly",
            )
        if name == "robust":
            p.add_argument(
                "--fractions", default="0.1,0.2", help="Byzantine fractions (default 0.1,0.2)"
            )
            p.add_argument(
                "--rules",
                type=_labels(list(_aggregators(1))),
                help="comma-separated rule labels (default: all)",
            )
            p.add_argument(
                "--attacks",
                type=_labels(list(ATTACKS)),
                help="comma-separated attacks (default: all)",
            )
        p.set_defaults(func=func)


def _labels(allowed: list[str]):
    """An argparse type: a comma-separated subset of ``allowed``."""

    def parse(text: str) -> list[str]:
        labels = [x.strip() for x in text.split(",")]
        unknown = [x for x in labels if x not in allowed]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {unknown}; allowed: {', '.join(allowed)}")
        return labels

    return parse


def _threads(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)


def _stem(name: str, data: str) -> str:
    return name if data == "digits" else f"{name}_{data.replace('-', '_')}"


def _finish(args, name: str, result: dict[str, Any], markdown, plot, command: str) -> int:
    args.out.mkdir(parents=True, exist_ok=True)
    stem = _stem(name, args.data)
    result = {"command": command, **result}
    command = result["command"]
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(result, command))
    plot(result, args.out / f"{stem}.png")
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(markdown(result, command))
    return 0


def cmd_robust(args: argparse.Namespace) -> int:
    fractions = [float(x) for x in args.fractions.split(",")]
    command = f"fedkin bench robust --data {args.data} --rounds {args.rounds}"
    command += f" --fractions {args.fractions}"
    for flag in ("rules", "attacks"):
        if getattr(args, flag) is not None:
            command += f" --{flag} '{','.join(getattr(args, flag))}'"
    _threads(args)
    t0 = time.perf_counter()
    log = (lambda *_: None) if args.json else print
    result = robust(args.data, args.rounds, fractions, log, args.rules, args.attacks)
    result["seconds"] = time.perf_counter() - t0
    return _finish(args, "robust", result, robust_markdown, robust_heatmap, command)


def cmd_compress(args: argparse.Namespace) -> int:
    command = f"fedkin bench compress --data {args.data} --rounds {args.rounds}"
    if args.compressors is not None:
        command += f" --compressors '{','.join(args.compressors)}'"
    _threads(args)
    t0 = time.perf_counter()
    log = (lambda *_: None) if args.json else print
    result = compress(args.data, args.rounds, log, args.compressors)
    result["seconds"] = time.perf_counter() - t0
    stored = args.out / f"{_stem('compress', args.data)}.json"
    if args.compressors is not None and stored.exists():
        result = merge_rows(json.loads(stored.read_text()), result, command)
    return _finish(args, "compress", result, compress_markdown, compress_plot, command)
