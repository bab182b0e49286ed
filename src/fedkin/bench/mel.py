"""`fedkin bench mel`: MEL multi-level ensembles against failover baselines under server failures.

For each dataset (scikit-learn digits; Fashion-MNIST from its IDX files), with the standard
train/test split (digits: a seeded 80/20 split), every method is trained on the pooled train
split with Adam and evaluated on the test split under each failure pattern:

* ``original``: the full-size model on one edge server. Pattern ``server`` (it fails): the
  request fails over to the cloud, answered by a remote fallback model of the same
  architecture trained from another seed (its extra latency is not modelled).
* ``mel``: the MEL ensemble (``fedkin.models.mel``), K = 2 branches of the original's depth and
  a combiner, all widths scaled by one factor to ``--ratio`` × the original's parameters;
  every pattern of :meth:`~fedkin.models.mel.MEL.failure_patterns`.
* ``mel-nodrop``: the same without branch feature dropout (p = 0), an ablation.
* ``compressed``: the original on the primary server plus a compressed backup — a model of the
  original's architecture with widths scaled to MEL's total size, distilled from the original
  (Hinton et al. 2015: (1−α)·CE + α·T²·KL(p_T^teacher ‖ p_T^student), α = 0.5, T = 4).
  Pattern ``primary`` (the original's server fails): the backup answers.
* ``independent``: K independently trained small models of MEL's total size, no joint loss
  (MEL with w_0 = 0: the loss separates), served by averaging their probabilities.

Each row gives the accuracy and the parameters of the components that answered. The summary
per method gives normal-mode accuracy, the mean over single-component failures and their
ratio (the paper's "preserving 95.6% of ensemble accuracy").
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from fedkin.models import MelConfig, MlpConfig, build_model
from fedkin.models.mel import MEL, count_parameters, pattern_name

KD_ALPHA, KD_T = 0.5, 4.0


@dataclass(frozen=True)
class Spec:
    """One dataset's models and training budget."""

    original: MlpConfig
    branch: MlpConfig  # template of each MEL branch (widths are rescaled to the ratio)
    combiner_hidden: list[int]
    epochs: int
    batch: int


SPECS = {
    "digits": Spec(MlpConfig(hidden=[128]), MlpConfig(hidden=[32]), [32], 60, 64),
    "fashion_mnist": Spec(MlpConfig(hidden=[256, 128]), MlpConfig(hidden=[64, 32]), [32], 10, 128),
}


def load(name: str, root: str, seed: int):
    """``(x_train, y_train, x_test, y_test)`` as float [N, features] and int64 [N]."""
    if name == "digits":
        from sklearn.datasets import load_digits

        bunch = load_digits()
        x = torch.as_tensor(bunch.data, dtype=torch.float32) / 16.0
        y = torch.as_tensor(bunch.target, dtype=torch.int64)
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
        cut = int(0.8 * len(y))
        return x[perm[:cut]], y[perm[:cut]], x[perm[cut:]], y[perm[cut:]]
    from fedkin.data.fashion_mnist import load_fashion_mnist

    images, labels = load_fashion_mnist(root)
    x = torch.from_numpy(images.reshape(len(images), -1)).to(torch.float32) / 255.0
    y = torch.from_numpy(labels)
    return x[:60000], y[:60000], x[60000:], y[60000:]


def train(model: nn.Module, loss_fn, x, y, spec: Spec, lr: float, seed: int) -> float:
    """Adam on ``loss_fn(x_batch, y_batch)`` for ``spec.epochs``; returns seconds taken."""
    t0 = time.perf_counter()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(spec.epochs):
        for idx in torch.randperm(len(y), generator=gen).split(spec.batch):
            opt.zero_grad()
            loss_fn(x[idx], y[idx]).backward()
            opt.step()
    return time.perf_counter() - t0


@torch.no_grad()
def accuracy(predict, x, y, chunk: int = 4096) -> float:
    hits = sum(
        int((predict(x[i : i + chunk]).argmax(-1) == y[i : i + chunk]).sum())
        for i in range(0, len(y), chunk)
    )
    return hits / len(y)


def ce(model: nn.Module):
    return lambda xb, yb: F.cross_entropy(model(xb), yb)


def distill(student: nn.Module, teacher: nn.Module):
    def loss(xb, yb):
        z = student(xb)
        with torch.no_grad():
            t = teacher(xb)
        kl = F.kl_div(
            F.log_softmax(z / KD_T, -1),
            F.log_softmax(t / KD_T, -1),
            log_target=True,
            reduction="batchmean",
        )
        return (1 - KD_ALPHA) * F.cross_entropy(z, yb) + KD_ALPHA * KD_T**2 * kl

    return loss


def live_params(model: MEL, dead) -> int:
    parts = [b for k, b in enumerate(model.branches) if k + 1 not in dead]
    if model.combiner is not None and 0 not in dead:
        parts.append(model.combiner)
    return sum(count_parameters(p) for p in parts)


def mel_rows(model: MEL, method: str, x, y) -> list[dict]:
    return [
        {
            "method": method,
            "pattern": pattern_name(dead),
            "accuracy": accuracy(lambda xb, d=dead: model.predict(xb, d), x, y),
            "params": live_params(model, dead),
        }
        for dead in model.failure_patterns()
    ]


def run_dataset(name: str, root: str, ratio: float, seed: int, lr: float, epochs: int) -> dict:
    spec = SPECS[name] if not epochs else replace(SPECS[name], epochs=epochs)
    xtr, ytr, xte, yte = load(name, root, seed)
    features, classes = (xtr.shape[1],), 10

    def build(cfg, s):
        return build_model(cfg, features, None, classes, seed=s)

    times: dict[str, float] = {}
    original, fallback = build(spec.original, seed), build(spec.original, seed + 1000)
    times["original"] = train(original, ce(original), xtr, ytr, spec, lr, seed)
    times["fallback"] = train(fallback, ce(fallback), xtr, ytr, spec, lr, seed + 1000)
    n_orig = count_parameters(original)

    mel_cfg = MelConfig(
        branches=[spec.branch, spec.branch],
        combiner_hidden=spec.combiner_hidden,
        size_ratio=ratio,
        reference=spec.original,
    )
    mel = build(mel_cfg, seed)
    times["mel"] = train(mel, mel, xtr, ytr, spec, lr, seed)
    n_mel = count_parameters(mel)
    nodrop = build(mel_cfg.model_copy(update={"branch_dropout": 0.0}), seed)
    times["mel-nodrop"] = train(nodrop, nodrop, xtr, ytr, spec, lr, seed)

    # the compressed backup and the independent ensemble get MEL's total size
    total = n_mel / n_orig
    backup_cfg = MelConfig(
        branches=[spec.original], combiner_weight=0, size_ratio=total, reference=spec.original
    ).resolved(features, None, classes)
    backup = build(backup_cfg.branches[0], seed + 2000)
    times["compressed"] = train(backup, distill(backup, original), xtr, ytr, spec, lr, seed)
    indep = build(
        mel_cfg.model_copy(update={"combiner_weight": 0.0, "size_ratio": total}), seed + 3000
    )
    times["independent"] = train(indep, indep, xtr, ytr, spec, lr, seed)

    acc_orig = accuracy(original, xte, yte)
    rows = [
        {"method": "original", "pattern": "none", "accuracy": acc_orig, "params": n_orig},
        {
            "method": "original",
            "pattern": "server",
            "accuracy": accuracy(fallback, xte, yte),
            "params": count_parameters(fallback),
        },
        *mel_rows(mel, "mel", xte, yte),
        *mel_rows(nodrop, "mel-nodrop", xte, yte),
        {"method": "compressed", "pattern": "none", "accuracy": acc_orig, "params": n_orig},
        {
            "method": "compressed",
            "pattern": "primary",
            "accuracy": accuracy(backup, xte, yte),
            "params": count_parameters(backup),
        },
        *mel_rows(indep, "independent", xte, yte),
    ]
    for r in rows:
        r["dataset"] = name
    sizes = {
        "original": n_orig,
        "mel": n_mel,
        "compressed_backup": count_parameters(backup),
        "independent": count_parameters(indep),
        "mel_widths": {
            "branches": [b.hidden for b in mel_cfg.resolved(features, None, classes).branches],
            "combiner_hidden": mel_cfg.resolved(features, None, classes).combiner_hidden,
        },
    }
    return {"rows": rows, "sizes": sizes, "train_s": times}


def average_seeds(rows: list[dict]) -> list[dict]:
    """One row per (dataset, method, pattern): mean accuracy over seeds (and its std)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["method"], r["pattern"]), []).append(r)
    return [
        {
            "method": method,
            "dataset": dataset,
            "pattern": pattern,
            "accuracy": statistics.fmean(r["accuracy"] for r in rs),
            "accuracy_std": statistics.pstdev(r["accuracy"] for r in rs),
            "params": rs[0]["params"],
        }
        for (dataset, method, pattern), rs in groups.items()
    ]


def summarize(rows: list[dict]) -> list[dict]:
    """Per (dataset, method): normal accuracy, mean over single-component failures, ratio."""
    out = []
    keys = dict.fromkeys((r["dataset"], r["method"]) for r in rows)
    for dataset, method in keys:
        mine = [r for r in rows if (r["dataset"], r["method"]) == (dataset, method)]
        normal = next(r["accuracy"] for r in mine if r["pattern"] == "none")
        single = [r["accuracy"] for r in mine if r["pattern"] != "none" and "+" not in r["pattern"]]
        mean = statistics.fmean(single)
        out.append(
            {
                "dataset": dataset,
                "method": method,
                "normal": normal,
                "single_failure_mean": mean,
                "retained": mean / normal,
            }
        )
    return out


def targets(summary: list[dict]) -> dict[str, dict[str, bool]]:
    """The issue's result checks, evaluated on the measured numbers."""
    out = {}
    for dataset in dict.fromkeys(s["dataset"] for s in summary):
        by = {s["method"]: s for s in summary if s["dataset"] == dataset}
        mel = by["mel"]
        out[dataset] = {
            "normal_within_1pt_of_original": mel["normal"] >= by["original"]["normal"] - 0.01,
            "retains_90pct_under_single_failures": mel["retained"] >= 0.9,
            **{
                f"{kind}_above_{other}": mel[key] > by[other][key]
                for other in ("compressed", "independent")
                for kind, key in (("failure_acc", "single_failure_mean"), ("retained", "retained"))
            },
        }
    return out


def register_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "mel",
        help="MEL ensembles vs cloud failover, compressed backups, independent ensembles",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument(
        "--datasets", default="digits,fashion_mnist", help=f"comma-separated of {list(SPECS)}"
    )
    p.add_argument("--ratio", type=float, default=0.4, help="MEL size / original size")
    p.add_argument("--seed", type=int, default=0, help="first seed (split, inits, batches)")
    p.add_argument("--seeds", type=int, default=3, help="seeds averaged (default 3)")
    p.add_argument(
        "--epochs", type=int, default=0, help="epochs per model (0: per dataset, 60 and 10)"
    )
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument(
        "--root", default="/usr/share/datasets/fashion-mnist", help="Fashion-MNIST IDX files"
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_mel)


def cmd_mel(args: argparse.Namespace) -> int:
    from fedkin.core.errors import UserError

    names = [n for n in args.datasets.split(",") if n]
    unknown = [n for n in names if n not in SPECS]
    if unknown or not names:
        raise UserError(f"--datasets {args.datasets!r}: allowed values are {', '.join(SPECS)}")
    if not 0 < args.ratio <= 1:
        raise UserError(f"--ratio {args.ratio}: must be in (0, 1]")
    if args.seeds < 1 or args.epochs < 0:
        raise UserError(f"--seeds {args.seeds} must be >= 1 and --epochs {args.epochs} >= 0")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    command = (
        f"fedkin bench mel --datasets {','.join(names)} --ratio {args.ratio} --seed {args.seed}"
        f" --seeds {args.seeds}"
        + (f" --epochs {args.epochs}" if args.epochs else "")
        + f" --lr {args.lr} --threads {args.threads}"
        + (" --json" if args.json else "")
    )
    seeds = list(range(args.seed, args.seed + args.seeds))
    results = {
        n: [run_dataset(n, args.root, args.ratio, s, args.lr, args.epochs) for s in seeds]
        for n in names
    }
    rows = average_seeds([r for runs in results.values() for res in runs for r in res["rows"]])
    summary = summarize(rows)
    report = {
        "command": command,
        "seeds": seeds,
        "rows": rows,
        "summary": summary,
        "targets": targets(summary),
        "sizes": {n: runs[0]["sizes"] for n, runs in results.items()},
        "train_s": {n: [res["train_s"] for res in runs] for n, runs in results.items()},
        "epochs": {n: args.epochs or SPECS[n].epochs for n in names},
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    from fedkin.display import print_table

    console = Console()
    title = f"MEL under failures (ensemble at {args.ratio:.0%} of the original; {len(seeds)} seeds)"
    table = Table(title=title)
    for col in ("dataset", "method", "pattern", "accuracy", "± std", "params"):
        table.add_column(col, justify="right" if col in ("accuracy", "params") else "left")
    for r in rows:
        table.add_row(
            r["dataset"],
            r["method"],
            r["pattern"],
            f"{r['accuracy']:.4f}",
            f"{r['accuracy_std']:.4f}",
            f"{r['params']:,}",
        )
    print_table(table, console)
    table = Table(title="normal mode vs mean over single-component failures")
    for col in ("dataset", "method", "normal", "single-failure mean", "retained"):
        table.add_column(col)
    for s in summary:
        table.add_row(
            s["dataset"],
            s["method"],
            f"{s['normal']:.4f}",
            f"{s['single_failure_mean']:.4f}",
            f"{s['retained']:.1%}",
        )
    print_table(table, console)
    console.print(f"targets: {report['targets']}")
    console.print(f"reproduce with: {command}")
    return 0
