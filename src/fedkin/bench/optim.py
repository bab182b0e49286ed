"""fedkin bench optim: every optimizer as FedAvg's client optimizer on two workloads.

Workloads: the digits MLP (64-128-10) and a Fashion-MNIST CNN (16-32 channels, 128 hidden). For
each optimizer (and FedKSeed's zeroth-order clients) the learning rate is chosen from the small
grid ``GRIDS`` (+ ``DIGITS_UP`` on the MLP) on the validation split
(``data.validation_fraction``), then the test accuracy of the global model after the same
number of rounds is reported with the optimizer's state bytes per parameter (measured from its
stored state), the storage bytes per parameter of the weights a client holds during its
local solve (``weight_bytes_per_param``: 4 in fp32, 2 for the bf16 optimizers, which hold them
as bf16 tensors; measured after one local step) and the uplink bytes per client and round (4·d
for an fp32 delta; for FedKSeed the mean length of the buffers its clients sent — float32
scalars and ⌈log₂ K⌉-bit pool indices, :func:`fedkin.algorithms.fedkseed.encode_scalars` — as
the channel counted them). Rows ``…@1e-4`` use one fixed small learning rate instead of a grid
(the regime where bf16 round-to-nearest loses Adam's steps).
``peak_mem_mb`` is one client's measured peak for one local step on one batch (weights,
optimizer state and batch held, plus the peak of live tensor allocations while the step runs;
:mod:`fedkin.optim.memory`), and ``inference_peak_mem_mb`` the same model's forward pass on the
same batch; FedKSeed's steps are its algorithm's, not an optimizer's (``null``). DiLoCo
(``configs/diloco.yaml``) is compared with FedAvg (its outer optimizer replaced by w ← w + Δ̄)
at equal rounds, and ``--plot`` draws accuracy against measured peak memory.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

GRIDS = {
    "sgd": [0.03, 0.1, 0.3],
    "adam": [1e-3, 3e-3, 1e-2],
    "adamw": [1e-3, 3e-3, 1e-2],
    "avgrad": [1e-3, 3e-3, 1e-2],
    "mada": [1e-3, 3e-3, 1e-2],
    "diffgrad": [1e-3, 3e-3, 1e-2],
    "sgd-sai": [0.01, 0.03, 0.1],
    "muon": [0.01, 0.02, 0.05],
    "muonbp": [0.01, 0.02, 0.05],
    "swan": [1e-3, 3e-3, 1e-2],
    "frugal": [1e-3, 3e-3, 1e-2],
    "sam": [0.03, 0.1, 0.3],
    "asam": [0.03, 0.1, 0.3],
    "adamw-bf16-nearest": [1e-3, 3e-3, 1e-2],
    "adamw-bf16-stochastic": [1e-3, 3e-3, 1e-2],
    "adamw@1e-4": [1e-4],
    "adamw-bf16-nearest@1e-4": [1e-4],
    "adamw-bf16-stochastic@1e-4": [1e-4],
    "fedkseed": [1e-3, 3e-3, 1e-2],
    "mezo": [1e-3, 3e-3, 1e-2],
    "zo-sgd": [3e-3, 1e-2, 3e-2],
    "zo-adam": [3e-4, 1e-3, 3e-3],
    "sparse-mezo": [3e-3, 1e-2, 3e-2],
}
#: one larger learning rate per grid on the digits MLP, where the best of ``GRIDS`` sat at its
#: upper edge for most first-order optimizers (10 rounds of a small model favour large steps)
DIGITS_UP = {
    "sgd": 1.0,
    "adam": 3e-2,
    "adamw": 3e-2,
    "avgrad": 3e-2,
    "mada": 3e-2,
    "diffgrad": 3e-2,
    "sgd-sai": 0.3,
    "muon": 0.1,
    "muonbp": 0.1,
    "swan": 3e-2,
    "frugal": 3e-2,
    "sam": 1.0,
    "asam": 1.0,
    "adamw-bf16-nearest": 3e-2,
    "adamw-bf16-stochastic": 3e-2,
}
WORKLOADS = {
    "digits-mlp": [
        "data.name=digits",
        "data.num_clients=50",
        "data.partition.name=iid",
        "data.validation_fraction=0.2",
        "model.name=mlp",
        "model.hidden=[128]",
        "cohort.clients_per_round=10",
        "client.local_steps=10",
        "client.batch_size=16",
        "eval.holdout_clients=0",
    ],
    "fmnist-cnn": [
        "data.name=fashion-mnist",
        "data.max_samples=8000",
        "data.num_clients=20",
        "data.partition.name=iid",
        "data.validation_fraction=0.2",
        "model.name=cnn",
        "model.channels=[16,32]",
        "model.hidden=128",
        "cohort.clients_per_round=5",
        "client.local_steps=10",
        "client.batch_size=32",
        "eval.holdout_clients=0",
    ],
}
DILOCO = Path(__file__).parents[3] / "configs" / "diloco.yaml"
#: the outer optimizer that makes DiLoCo FedAvg: w ← w + Δ̄
FEDAVG_OUTER = [
    "server.optimizer.lr=1.0",
    "server.optimizer.momentum=0.0",
    "server.optimizer.nesterov=false",
]


def grid(name: str, workload: str) -> list[float]:
    """The learning rates tried for ``name`` on ``workload``."""
    up = DIGITS_UP.get(name) if workload == "digits-mlp" else None
    return GRIDS[name] + ([up] if up else [])


def _overrides(name: str, lr: float) -> list[str]:
    if name == "fedkseed":
        return ["algorithm.name=fedkseed", f"algorithm.lr={lr}"]
    opt, _, precision = name.split("@")[0].partition("-bf16-")
    out = ["algorithm.name=fedavg", f"client.optimizer.name={opt}", f"client.optimizer.lr={lr}"]
    return out + ([f"client.optimizer.precision=bf16-{precision}"] if precision else [])


def run_one(
    name: str, lr: float, rounds: int, seed: int, workload: str = "digits-mlp"
) -> dict[str, Any]:
    from fedkin.config import load_config
    from fedkin.core.tree import tree_leaves
    from fedkin.experiment import Experiment
    from fedkin.optim.optimizer import state_bytes_per_param

    overrides = [*WORKLOADS[workload], *_overrides(name, lr), f"rounds={rounds}", f"seed={seed}"]
    cfg = load_config(None, overrides)
    exp = Experiment(cfg)
    for _ in range(rounds):
        exp.run_round()
    record = exp.evaluate_clients()
    params = exp.population["global"]
    d = sum(t.numel() for t in tree_leaves(params))
    alg = exp.groups[0].algorithm
    step_mb, inference_mb, weight_bytes = memory_mb(exp)
    if name == "fedkseed":  # the mean length of the encoded buffers the clients sent
        sent = rounds * cfg.cohort.clients_per_round
        uplink = round(exp.channel_state.uplink_total / sent, 2)
        state, step_mb, weight_bytes = 0.0, None, None
    else:
        state, uplink = state_bytes_per_param(alg.client_optimizer, params), 4 * d
    return {
        "val": record.get("val_global_acc_mean"),
        "accuracy": record.get("global_acc_mean"),
        "state_bytes_per_param": state,
        "weight_bytes_per_param": None if weight_bytes is None else weight_bytes / d,
        "peak_mem_mb": step_mb,
        "inference_peak_mem_mb": inference_mb,
        "uplink_bytes_per_round": uplink,
        "params": d,
    }


def memory_mb(exp) -> tuple[float, float, int]:
    """(one local step's peak, the forward pass's peak) in MB for one client batch of ``exp``'s
    global model and client optimizer, and the storage bytes of the client's weights after
    that step (bf16 optimizers hold them in bf16; :mod:`fedkin.optim.memory`)."""
    import torch

    from fedkin.optim.memory import MB, held_bytes, inference_bytes, step_bytes

    alg = exp.groups[0].algorithm
    size = exp.config.client.batch_size
    xs, ys = exp.dataset.sample_train_batches(
        torch.tensor([0]), exp.stream.child("mem"), 0, 1, size
    )
    x, y = xs[0, 0], ys[0, 0]
    params = exp.population["global"]
    step = step_bytes(alg.plain_objective, alg.client_optimizer, params, x, y)
    weights, _ = held_bytes(alg.plain_objective, alg.client_optimizer, params, x, y)
    inference = inference_bytes(alg.logits, params, x)
    return round(step / MB, 4), round(inference / MB, 4), weights


def run_diloco(rounds: int, seed: int, every: int) -> dict[str, Any]:
    """Global test accuracy of DiLoCo (``configs/diloco.yaml``: inner AdamW, outer Nesterov SGD)
    and of FedAvg (the same clients, outer w ← w + Δ̄) after every ``every`` rounds."""
    from fedkin.config import load_config
    from fedkin.experiment import Experiment

    curves: dict[str, dict[int, float]] = {}
    for variant, extra in (("diloco", []), ("fedavg", FEDAVG_OUTER)):
        cfg = load_config(DILOCO, [*extra, f"rounds={rounds}", f"seed={seed}"])
        exp = Experiment(cfg)
        curves[variant] = {}
        for r in range(1, rounds + 1):
            exp.run_round()
            if r % every == 0 or r == rounds:
                curves[variant][r] = exp.evaluate_clients()["global_acc_mean"]
    return {"config": "configs/diloco.yaml", "rounds": rounds, **curves}


def run(
    names: list[str], workloads: list[str], rounds: dict[str, int], seed: int
) -> dict[str, Any]:
    rows, inference = [], {}
    for workload in workloads:
        for name in names:
            t0 = time.perf_counter()
            tried = {
                lr: run_one(name, lr, rounds[workload], seed, workload)
                for lr in grid(name, workload)
            }
            lr = max(tried, key=lambda k: tried[k]["val"] or 0.0)
            best = tried[lr]
            rows.append(
                {
                    "workload": workload,
                    "optimizer": name,
                    "lr": lr,
                    "val_accuracy": best["val"],
                    "accuracy": best["accuracy"],
                    "state_bytes_per_param": round(best["state_bytes_per_param"], 3),
                    "weight_bytes_per_param": best["weight_bytes_per_param"],
                    "peak_mem_mb": best["peak_mem_mb"],
                    "uplink_bytes_per_round": best["uplink_bytes_per_round"],
                    "params": best["params"],
                    "seconds": round(time.perf_counter() - t0, 1),
                }
            )
            inference[workload] = best["inference_peak_mem_mb"]
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return {
        "rows": rows,
        "inference_peak_mem_mb": inference,
        "rounds": rounds,
    }


def plot(result: dict[str, Any], path: str) -> None:
    """Test accuracy against one local step's measured peak memory, one panel per workload
    (the forward pass's peak as a dashed line; rows without a measured peak are left out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(dict.fromkeys(r["workload"] for r in result["rows"]))
    fig, axes = plt.subplots(1, len(workloads), figsize=(7 * len(workloads), 5.5), squeeze=False)
    for ax, workload in zip(axes[0], workloads, strict=True):
        rows = [
            r
            for r in result["rows"]
            if r["workload"] == workload and r.get("peak_mem_mb") is not None
        ]
        for r in rows:
            ax.scatter(r["peak_mem_mb"], r["accuracy"], s=18)
            ax.annotate(r["optimizer"], (r["peak_mem_mb"], r["accuracy"]), fontsize=7)
        inference = result["inference_peak_mem_mb"].get(workload)
        if inference is not None:
            ax.axvline(inference, ls="--", c="grey", lw=1, label="inference (forward) peak")
            ax.legend(fontsize=8, loc="lower right")
        ax.set_xscale("log")
        ax.set_xlabel("peak memory of one local step, MB (measured)")
        ax.set_ylabel("global test accuracy")
        ax.set_title(f"{workload}, {result['rounds'][workload]} rounds")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def cmd_optim(args: argparse.Namespace) -> int:
    names = args.optimizers or list(GRIDS)
    workloads = args.workloads or list(WORKLOADS)
    rounds = {"digits-mlp": args.rounds, "fmnist-cnn": args.cnn_rounds}
    result = run(names, workloads, rounds, args.seed)
    if args.diloco_rounds:
        result["diloco"] = run_diloco(args.diloco_rounds, args.seed, every=10)
    result["command"] = "fedkin bench optim " + " ".join(
        [f"--rounds {args.rounds}", f"--cnn-rounds {args.cnn_rounds}", f"--seed {args.seed}"]
        + [f"--diloco-rounds {args.diloco_rounds}"]
        + (["--workloads", *args.workloads] if args.workloads else [])
        + (["--optimizers", *args.optimizers] if args.optimizers else [])
        + (["--plot", args.plot] if args.plot else [])
        + (["--json"] if args.json else [])
    )
    if args.plot:
        plot(result, args.plot)
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(
        f"{'workload':11} {'optimizer':27} {'lr':>7} {'val':>6} {'test':>6} {'weights B/p':>11} "
        f"{'state B/p':>9} {'peak MB':>8} {'uplink B':>9}"
    )
    for r in result["rows"]:
        weights = r.get("weight_bytes_per_param")
        print(
            f"{r['workload']:11} {r['optimizer']:27} {r['lr']:>7} {r['val_accuracy']:6.3f} "
            f"{r['accuracy']:6.3f} "
            f"{weights if weights is not None else '-':>11} "
            f"{r['state_bytes_per_param']:9.2f} "
            f"{r['peak_mem_mb'] if r['peak_mem_mb'] is not None else '-':>8} "
            f"{r['uplink_bytes_per_round']:>9}"
        )
    print(f"inference peak MB: {result['inference_peak_mem_mb']}")
    if "diloco" in result:
        for variant in ("diloco", "fedavg"):
            curve = ", ".join(f"r{k}: {v:.3f}" for k, v in result["diloco"][variant].items())
            print(f"{variant}: {curve}")
    print(result["command"])
    return 0


def register_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "optim",
        help="every optimizer as the client optimizer (digits MLP, Fashion-MNIST CNN): "
        "accuracy, state, uplink; DiLoCo vs FedAvg",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--rounds", type=int, default=10, help="rounds per digits-MLP run")
    p.add_argument("--cnn-rounds", type=int, default=6, help="rounds per Fashion-MNIST CNN run")
    p.add_argument(
        "--diloco-rounds",
        type=int,
        default=50,
        help="rounds of DiLoCo and of FedAvg on configs/diloco.yaml (0: skip)",
    )
    p.add_argument("--seed", type=int, default=0, help="experiment seed")
    p.add_argument("--optimizers", nargs="+", choices=list(GRIDS), help="subset (default: all)")
    p.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), help="subset (default: all)")
    p.add_argument("--plot", help="write a PNG of accuracy against peak memory here")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_optim)
