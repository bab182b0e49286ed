"""`fedkin bench throughput`: client updates per second, vectorized engine vs a plain PyTorch loop.

The standard workload (the foundation issue): digits features, MLP 64-128-10, FedAvg, every
client runs 5 local SGD steps (batch 16, lr 0.1) per round, all clients sampled each round.

* fedkin: the FedAvg local solver through the vectorized engine, the channel (non-finite
  filter + weighted mean) and the population update — the code path of ``fedkin run``.
* reference: the loop people write by hand — for each client deep-copy the global model,
  ``torch.optim.SGD``, 5 steps, then a weighted average of the client models.

Both consume the same pre-drawn batches in the same process, timed round by round in
alternation (medians reported), so their ratio is meaningful on a shared machine even when
absolute times are not. Each cohort size runs in its own subprocess so
its peak memory (max RSS) is its own. For cohorts above ``--loop-cap`` clients the reference
loop is timed on ``--loop-cap`` of them: its cost is strictly per client. When the loop runs
the whole cohort, both implementations train the same model from the same batches, and the
largest absolute difference between their final models is reported (``final_max_abs_diff``).
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
from rich.console import Console
from rich.table import Table

from fedkin.display import print_table

STEPS, BATCH, LR, HIDDEN = 5, 16, 0.1, 128


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.data / 16.0, dtype=torch.float32), torch.tensor(d.target)


def _batches(clients: int, seed: int, round_: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[steps, clients, batch] draws from digits, counter-based in (seed, round, client)."""
    from fedkin.core.rng import Stream

    x, y = _digits_cache()
    u = (
        Stream(seed)
        .child("bench")
        .uniform(
            round_,
            torch.arange(STEPS)[:, None, None],
            torch.arange(clients)[None, :, None],
            torch.arange(BATCH)[None, None, :],
        )
    )
    idx = (u * len(y)).long()
    return x[idx], y[idx]


_CACHE: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}


def _digits_cache() -> tuple[torch.Tensor, torch.Tensor]:
    if "d" not in _CACHE:
        _CACHE["d"] = _digits()
    return _CACHE["d"]


def measure(clients: int, rounds: int, loop_cap: int, seed: int = 0) -> dict:
    """Time ``rounds`` rounds (after one warm-up) of both implementations on ``clients``."""
    from fedkin.algorithms.base import ServerStep
    from fedkin.algorithms.fedavg import FedAvg, FedAvgConfig
    from fedkin.core.channel import Channel
    from fedkin.engine import EngineConfig
    from fedkin.models import MlpConfig, build_model
    from fedkin.optim import sgd

    model = build_model(MlpConfig(hidden=[HIDDEN]), (64,), None, 10, seed=seed)
    data = [_batches(clients, seed, r) for r in range(rounds + 1)]
    weights = torch.full((clients,), float(STEPS * BATCH))

    # fedkin: vectorized engine + channel + server update
    algorithm = FedAvg(FedAvgConfig(), model, sgd(LR), STEPS)
    engine, channel, server = EngineConfig().build(), Channel(), ServerStep(sgd(1.0))
    population = algorithm.init_population(
        {k: v.detach().clone() for k, v in model.named_parameters()}
    )
    ctx = {"client_id": torch.arange(clients)}

    def fedkin_round(batches) -> None:
        nonlocal population
        messages, _, _ = engine.map(
            algorithm.client_update, (population, {}, batches, ctx), (None, None, 1, 0)
        )
        aggregate, _ = channel(messages, weights)
        population = algorithm.population_update(population, aggregate, server)

    # reference: a plain per-client PyTorch loop on (up to loop_cap of) the same clients
    loop_clients = min(clients, loop_cap)
    global_model = copy.deepcopy(model).requires_grad_(True)

    def loop_round(batches) -> None:
        xs, ys = batches
        total = weights[:loop_clients].sum()
        new_state = {k: torch.zeros_like(v) for k, v in global_model.state_dict().items()}
        for c in range(loop_clients):
            local = copy.deepcopy(global_model)
            opt = torch.optim.SGD(local.parameters(), lr=LR)
            for s in range(STEPS):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(local(xs[s, c]), ys[s, c]).backward()
                opt.step()
            for k, v in local.state_dict().items():
                new_state[k] += v * (weights[c] / total)
        global_model.load_state_dict(new_state)

    # interleave the two so both see the same machine load; take medians over rounds
    fedkin_round(data[0])
    loop_round(data[0])
    fedkin_times, loop_times = [], []
    for r in range(1, rounds + 1):
        t0 = time.perf_counter()
        fedkin_round(data[r])
        t1 = time.perf_counter()
        loop_round(data[r])
        fedkin_times.append(t1 - t0)
        loop_times.append(time.perf_counter() - t1)
    fedkin_s, loop_s = statistics.median(fedkin_times), statistics.median(loop_times)

    diff = None
    if loop_clients == clients:  # same cohort: both must end with the same model
        final = dict(global_model.named_parameters())
        diff = max(float((population["global"][k] - final[k].detach()).abs().max()) for k in final)
    fedkin_ups = clients / fedkin_s
    loop_ups = loop_clients / loop_s
    return {
        "clients": clients,
        "rounds_timed": rounds,
        "fedkin_s_per_round": fedkin_s,
        "fedkin_updates_per_s": fedkin_ups,
        "loop_clients_timed": loop_clients,
        "loop_updates_per_s": loop_ups,
        "speedup": fedkin_ups / loop_ups,
        "fedkin_us_per_update": 1e6 * fedkin_s / clients,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": torch.get_num_threads(),
        "final_max_abs_diff": diff,
    }


def run_isolated(clients: int, rounds: int, loop_cap: int, threads: int) -> dict:
    """Measure one cohort size in a fresh interpreter (clean peak-memory reading); ``threads``
    torch intra-op threads for both implementations (0: torch's default)."""
    cmd = [
        sys.executable,
        "-m",
        "fedkin.bench.throughput",
        str(clients),
        str(rounds),
        str(loop_cap),
        str(threads),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def register_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "throughput",
        help="client updates/s: vectorized engine vs plain PyTorch loop",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument(
        "--clients", default="100,1000", help="comma-separated cohort sizes (default 100,1000)"
    )
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per size (default 5)")
    p.add_argument("--loop-cap", type=int, default=1000, help="max clients timed for the loop")
    p.add_argument(
        "--threads", type=int, default=0, help="torch threads for both (0: torch's default)"
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_throughput)


def cmd_throughput(args: argparse.Namespace) -> int:
    from fedkin.core.errors import UserError

    try:
        sizes = [int(s) for s in str(args.clients).split(",")]
    except ValueError:
        raise UserError(f"--clients {args.clients!r}: give integers, e.g. 100,1000") from None
    if any(s < 1 for s in sizes) or args.rounds < 1 or args.loop_cap < 1 or args.threads < 0:
        raise UserError("--clients, --rounds and --loop-cap must be positive, --threads >= 0")
    results = [run_isolated(n, args.rounds, args.loop_cap, args.threads) for n in sizes]
    command = f"fedkin bench throughput --clients {args.clients} --rounds {args.rounds}" + (
        f" --threads {args.threads}" if args.threads else ""
    )
    if args.json:
        print(json.dumps({"command": command, "results": results}, indent=2))
        return 0
    table = Table(title="FedAvg round throughput (digits, MLP 64-128-10, 5 SGD steps x batch 16)")
    for col in (
        "clients",
        "fedkin upd/s",
        "loop upd/s",
        "speedup",
        "fedkin µs/upd",
        "s/round",
        "peak RSS MB",
    ):
        table.add_column(col, justify="right")
    for r in results:
        loop_note = (
            "" if r["loop_clients_timed"] == r["clients"] else f" ({r['loop_clients_timed']})"
        )
        table.add_row(
            str(r["clients"]),
            f"{r['fedkin_updates_per_s']:,.0f}",
            f"{r['loop_updates_per_s']:,.0f}{loop_note}",
            f"{r['speedup']:.1f}x",
            f"{r['fedkin_us_per_update']:.0f}",
            f"{r['fedkin_s_per_round']:.3f}",
            f"{r['peak_rss_mb']:.0f}",
        )
    console = Console()
    print_table(table, console)
    diffs = [r["final_max_abs_diff"] for r in results if r["final_max_abs_diff"] is not None]
    if diffs:
        console.print(f"final models of fedkin and the loop differ by at most {max(diffs):.1e}")
    console.print(f"threads={results[0]['threads']}; reproduce with: {command}")
    return 0


if __name__ == "__main__":
    n, rounds, cap, threads = (int(a) for a in sys.argv[1:5])
    if threads:
        torch.set_num_threads(threads)
    print(json.dumps(measure(n, rounds, cap)))
