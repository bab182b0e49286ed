"""fedkin bench optim: every optimizer as FedAvg's client optimizer on the digits MLP.

For each optimizer (and FedKSeed's zeroth-order clients) the learning rate is chosen from a
small grid on the validation split (``data.validation_fraction``), then the test accuracy of
the global model after the same number of rounds is reported with the optimizer's state bytes
per parameter (measured from its stored state) and the uplink bytes per client and round
(4·d for an fp32 delta; 8 per local step for FedKSeed's (index, scalar) pairs). Peak memory is
not measured (``null``). Digits workload only.
"""

from __future__ import annotations

import argparse
import json
import time
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
    "adamw-bf16-nearest": [1e-3, 3e-3, 1e-2],
    "adamw-bf16-stochastic": [1e-3, 3e-3, 1e-2],
    "fedkseed": [1e-3, 3e-3],
}
BASE = [
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
]


def _overrides(name: str, lr: float) -> list[str]:
    if name == "fedkseed":
        return ["algorithm.name=fedkseed", f"algorithm.lr={lr}"]
    opt, _, precision = name.partition("-bf16-")
    out = ["algorithm.name=fedavg", f"client.optimizer.name={opt}", f"client.optimizer.lr={lr}"]
    return out + ([f"client.optimizer.precision=bf16-{precision}"] if precision else [])


def run_one(name: str, lr: float, rounds: int, seed: int) -> dict[str, Any]:
    from fedkin.config import load_config
    from fedkin.core.tree import tree_leaves
    from fedkin.experiment import Experiment
    from fedkin.optim.optimizer import state_bytes_per_param

    cfg = load_config(None, [*BASE, *_overrides(name, lr), f"rounds={rounds}", f"seed={seed}"])
    exp = Experiment(cfg)
    for _ in range(rounds):
        exp.run_round()
    record = exp.evaluate_clients()
    params = exp.population["global"]
    d = sum(t.numel() for t in tree_leaves(params))
    alg = exp.groups[0].algorithm
    if name == "fedkseed":
        state, uplink = 0.0, 8 * cfg.client.local_steps
    else:
        state, uplink = state_bytes_per_param(alg.client_optimizer, params), 4 * d
    return {
        "val": record.get("val_global_acc_mean"),
        "accuracy": record.get("global_acc_mean"),
        "state_bytes_per_param": state,
        "uplink_bytes_per_round": uplink,
    }


def run(names: list[str], rounds: int, seed: int) -> dict[str, Any]:
    rows = []
    for name in names:
        t0 = time.perf_counter()
        tried = {lr: run_one(name, lr, rounds, seed) for lr in GRIDS[name]}
        lr = max(tried, key=lambda k: tried[k]["val"] or 0.0)
        best = tried[lr]
        rows.append(
            {
                "workload": "digits-mlp",
                "optimizer": name,
                "lr": lr,
                "val_accuracy": best["val"],
                "accuracy": best["accuracy"],
                "state_bytes_per_param": round(best["state_bytes_per_param"], 3),
                "peak_mem_mb": None,
                "uplink_bytes_per_round": best["uplink_bytes_per_round"],
                "seconds": round(time.perf_counter() - t0, 1),
            }
        )
    return {"rows": rows, "inference_peak_mem_mb": {"digits-mlp": None}, "rounds": rounds}


def cmd_optim(args: argparse.Namespace) -> int:
    names = args.optimizers or list(GRIDS)
    result = run(names, args.rounds, args.seed)
    result["command"] = "fedkin bench optim " + " ".join(
        [f"--rounds {args.rounds}", f"--seed {args.seed}"]
        + (["--optimizers", *args.optimizers] if args.optimizers else [])
    )
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"{'optimizer':24} {'lr':>7} {'val':>6} {'test':>6} {'state B/p':>9} {'uplink B':>9}")
    for r in result["rows"]:
        print(
            f"{r['optimizer']:24} {r['lr']:>7} {r['val_accuracy']:6.3f} {r['accuracy']:6.3f} "
            f"{r['state_bytes_per_param']:9.2f} {r['uplink_bytes_per_round']:9d}"
        )
    print(result["command"])
    return 0


def register_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "optim",
        help="every optimizer as the client optimizer (digits MLP): accuracy, state, uplink",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--rounds", type=int, default=20, help="rounds per run")
    p.add_argument("--seed", type=int, default=0, help="experiment seed")
    p.add_argument("--optimizers", nargs="+", choices=sorted(GRIDS), help="subset (default: all)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_optim)
