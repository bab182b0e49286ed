"""`fedkin bench throughput`: client updates per second, vectorized engine vs a plain PyTorch loop.

Two workloads, both FedAvg with every client running 5 local SGD steps (batch 16, lr 0.1) per
round and all clients sampled each round:

* ``mlp`` (the foundation issue's standard workload): digits features, MLP 64-128-10.
* ``cnn``: Fashion-MNIST 28×28 images, the zoo CNN (two 5×5 conv blocks with 32 and 64
  channels, FC 512). Images come from ``/usr/share/datasets/fashion-mnist``; when that is
  absent, uniform random tensors of the same shape stand in (the output's ``data`` says which —
  the timing depends only on the shapes).

Four implementations consume the same pre-drawn batches in the same process:

* fedkin: the FedAvg local solver through the vectorized engine, the channel (non-finite
  filter + weighted mean) and the population update — the code path of ``fedkin run``.
* fedkin vmap: the same with ``engine.fast_path=false`` (``vmap`` even where the hand-batched
  FedAvg/SGD local solve of the MLP or CNN applies; ``fast_path_speedup`` = vmap round ÷ fedkin
  round; ``fedkin_path`` says which path fedkin's engine ran, e.g. ``fast:cnn``).
* fedkin sequential: the same through the sequential engine (one client at a time).
* reference: the loop people write by hand — for each client deep-copy the global model,
  ``torch.optim.SGD``, 5 steps, then a weighted average of the client models.

They are timed round by round in alternation (medians reported), so their ratios are
meaningful on a shared machine even when absolute times are not. Each cohort size runs in its
own subprocess so its peak memory (max RSS) is its own. For cohorts above ``--loop-cap``
clients the sequential engine and the reference loop are timed on ``--loop-cap`` of them: their
cost is strictly per client. When they run the whole cohort, all of them train the same model from
the same batches, and the largest absolute difference between the final models is reported
(``final_max_abs_diff``).

The FLOP limit. ``flops_per_update`` is what ``torch.utils.flop_counter.FlopCounterMode``
counts for one client's local update (forward and backward of every step) of the reference
loop; ``sgemm_gflops`` is the rate of a timed square ``torch.mm`` in the same process and at
the same thread count; and

    fraction_of_limit = fedkin_updates_per_s · flops_per_update / (sgemm_gflops · 10⁹),

the share of the machine's dense-matmul rate that fedkin's vectorized engine turns into
client updates.
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
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from fedkin.display import print_table

STEPS, BATCH, LR, HIDDEN = 5, 16, 0.1, 128
WORKLOADS = ("mlp", "cnn")
FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
#: side of the square matrices of the sgemm measurement (2·n³ ≈ 2.1 GFLOP per product)
SGEMM_N = 1024
LOOP_CAP = 1000


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.data / 16.0, dtype=torch.float32), torch.tensor(d.target)


def _fashion_mnist() -> tuple[torch.Tensor, torch.Tensor, str]:
    """Fashion-MNIST images as ``float32 [N, 784]`` in [0, 1], or synthetic stand-ins."""
    from fedkin.core.errors import DataError
    from fedkin.data.fashion_mnist import load_fashion_mnist

    try:
        x, y = load_fashion_mnist(FASHION_MNIST_ROOT)
    except DataError:  # not installed: same shapes, random values
        g = torch.Generator().manual_seed(0)
        x = torch.rand(2048, 784, generator=g)
        return x, torch.randint(0, 10, (2048,), generator=g), "synthetic (Fashion-MNIST shapes)"
    x = torch.from_numpy(x.reshape(len(x), -1)).float() / 255.0
    return x, torch.from_numpy(y), f"fashion-mnist ({FASHION_MNIST_ROOT})"


_CACHE: dict[str, tuple[torch.Tensor, torch.Tensor, str]] = {}


def _data(workload: str = "mlp") -> tuple[torch.Tensor, torch.Tensor, str]:
    """The workload's pooled examples ``(x, y, description)``, loaded once per process."""
    if workload not in _CACHE:
        _CACHE[workload] = (*_digits(), "digits") if workload == "mlp" else _fashion_mnist()
    return _CACHE[workload]


def _digits_cache() -> tuple[torch.Tensor, torch.Tensor]:
    x, y, _ = _data("mlp")
    return x, y


def _batches(
    clients: int, seed: int, round_: int, workload: str = "mlp", steps: int = STEPS
) -> tuple[torch.Tensor, torch.Tensor]:
    """[steps, clients, batch] draws from the workload's data, counter-based in
    (seed, round, client)."""
    from fedkin.core.rng import Stream

    x, y, _ = _data(workload)
    u = (
        Stream(seed)
        .child("bench")
        .uniform(
            round_,
            torch.arange(steps)[:, None, None],
            torch.arange(clients)[None, :, None],
            torch.arange(BATCH)[None, None, :],
        )
    )
    idx = (u * len(y)).long()
    return x[idx], y[idx]


def build_workload_model(workload: str, seed: int = 0) -> torch.nn.Module:
    """The workload's model at ``seed``: MLP 64-128-10 or the zoo CNN on 1×28×28 images."""
    from fedkin.models import CnnConfig, MlpConfig, build_model

    if workload == "mlp":
        return build_model(MlpConfig(hidden=[HIDDEN]), (64,), None, 10, seed=seed)
    return build_model(CnnConfig(), (784,), (1, 28, 28), 10, seed=seed)


def local_update(model: torch.nn.Module, xs: torch.Tensor, ys: torch.Tensor) -> torch.nn.Module:
    """One client's update the way a PyTorch user writes it: copy, ``torch.optim.SGD``, steps."""
    local = copy.deepcopy(model)
    opt = torch.optim.SGD(local.parameters(), lr=LR)
    for s in range(len(xs)):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(local(xs[s]), ys[s]).backward()
        opt.step()
    return local


def flops_per_update(workload: str, seed: int = 0) -> int:
    """FLOPs of one client's local update (forward + backward of every step), as counted by
    ``torch.utils.flop_counter.FlopCounterMode`` on the reference loop's update."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build_workload_model(workload, seed).requires_grad_(True)
    xs, ys = _batches(1, seed, 0, workload)
    counter = FlopCounterMode(display=False)
    with counter:
        local_update(model, xs[:, 0], ys[:, 0])
    return int(counter.get_total_flops())


def sgemm_gflops(n: int = SGEMM_N, repeats: int = 5) -> float:
    """GFLOP/s of a square float32 ``torch.mm`` (2·n³ FLOPs) at the current thread count:
    the median over ``repeats`` timed products after one warm-up."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times) / 1e9


def measure(
    clients: int,
    rounds: int,
    loop_cap: int,
    seed: int = 0,
    workload: str = "mlp",
    compile: bool = False,
) -> dict:
    """Time ``rounds`` rounds (after one warm-up) of the implementations on ``clients``
    (and of the compiled engine, if ``compile``: its warm-up round is the compilation), count
    the FLOPs of one update and measure the sgemm rate."""
    from fedkin.algorithms.base import ServerStep
    from fedkin.algorithms.fedavg import FedAvg, FedAvgConfig
    from fedkin.core.channel import Channel
    from fedkin.engine import EngineConfig, VectorizedEngine
    from fedkin.engine.plan import EnginePlan
    from fedkin.optim import sgd

    model = build_workload_model(workload, seed)
    data = [_batches(clients, seed, r, workload) for r in range(rounds + 1)]
    weights = torch.full((clients,), float(STEPS * BATCH))
    capped = min(clients, loop_cap)  # clients timed for the sequential engine and the loop

    # fedkin: an engine + channel + server update
    algorithm = FedAvg(FedAvgConfig(), model, sgd(LR), STEPS)
    channel, server = Channel(), ServerStep(sgd(1.0))
    initial = {k: v.detach().clone() for k, v in model.named_parameters()}

    def fedkin_round(engine_name: str, n: int):
        if engine_name == "compiled":
            plan = EnginePlan(rounds + 1, n, STEPS)
            engine = VectorizedEngine(compile=True, retain_freed_mb=1024, plan=plan)
        elif engine_name == "vmap":  # the vectorized engine without its fast path
            engine = EngineConfig(fast_path=False).build()
        else:
            engine = EngineConfig(name=engine_name).build()
        state = {"population": algorithm.init_population(dict(initial)), "engine": engine}
        ctx = {"client_id": torch.arange(n), "round": torch.zeros(n, dtype=torch.long)}

        def run(batches) -> None:
            xs, ys = batches
            messages, _, _ = engine.map(
                algorithm.client_update,
                (state["population"], {}, (xs[:, :n], ys[:, :n]), ctx),
                (None, None, 1, 0),
            )
            aggregate, _ = channel(messages, weights[:n])
            state["population"] = algorithm.population_update(
                state["population"], aggregate, server
            )

        return run, state

    vectorized, vec_state = fedkin_round("vectorized", clients)
    vmapped, vmap_state = fedkin_round("vmap", clients)
    sequential, seq_state = fedkin_round("sequential", capped)

    # reference: a plain per-client PyTorch loop on (up to loop_cap of) the same clients
    global_model = copy.deepcopy(model).requires_grad_(True)

    def loop_round(batches) -> None:
        xs, ys = batches
        total = weights[:capped].sum()
        new_state = {k: torch.zeros_like(v) for k, v in global_model.state_dict().items()}
        for c in range(capped):
            local = local_update(global_model, xs[:, c], ys[:, c])
            for k, v in local.state_dict().items():
                new_state[k] += v * (weights[c] / total)
        global_model.load_state_dict(new_state)

    # interleave them so all see the same machine load; take medians over rounds
    impls = {"fedkin": vectorized, "vmap": vmapped, "sequential": sequential, "loop": loop_round}
    if compile:
        impls["compiled"], compiled_state = fedkin_round("compiled", clients)
    warmup = {}
    for name, run in impls.items():
        t0 = time.perf_counter()
        run(data[0])
        warmup[name] = time.perf_counter() - t0
    times: dict[str, list[float]] = {k: [] for k in impls}
    for r in range(1, rounds + 1):
        for name, run in impls.items():
            t0 = time.perf_counter()
            run(data[r])
            times[name].append(time.perf_counter() - t0)
    fedkin_s = statistics.median(times["fedkin"])
    fedkin_ups = clients / fedkin_s
    seq_ups = capped / statistics.median(times["sequential"])
    loop_ups = capped / statistics.median(times["loop"])

    diff = None
    if capped == clients:  # same cohort: all must end with the same model
        final = {k: v.detach() for k, v in global_model.named_parameters()}
        others = tuple(st["population"]["global"] for st in (vec_state, vmap_state, seq_state))
        if compile:
            others += (compiled_state["population"]["global"],)
        diff = max(float((m[k] - final[k]).abs().max()) for m in others for k in final)
    flops = flops_per_update(workload, seed)
    gflops = sgemm_gflops()
    compiled = {}
    if compile:
        compiled_ups = clients / statistics.median(times["compiled"])
        compiled = {
            "compiled_compile_s": warmup["compiled"],
            "compiled_updates_per_s": compiled_ups,
            "compiled_speedup_vs_eager": compiled_ups / fedkin_ups,
            "compiled_fraction_of_limit": compiled_ups * flops / (gflops * 1e9),
        }
    return {
        "workload": workload,
        "data": _data(workload)[2],
        "clients": clients,
        "rounds_timed": rounds,
        "fedkin_s_per_round": fedkin_s,
        "fedkin_updates_per_s": fedkin_ups,
        "loop_clients_timed": capped,
        "sequential_updates_per_s": seq_ups,
        "loop_updates_per_s": loop_ups,
        "speedup": fedkin_ups / loop_ups,
        "speedup_vs_sequential": fedkin_ups / seq_ups,
        "vmap_updates_per_s": clients / statistics.median(times["vmap"]),
        "fast_path_speedup": statistics.median(times["vmap"]) / fedkin_s,
        "fedkin_path": vec_state["engine"].last_path,
        "fedkin_us_per_update": 1e6 * fedkin_s / clients,
        "flops_per_update": flops,
        "sgemm_gflops": gflops,
        "fraction_of_limit": fedkin_ups * flops / (gflops * 1e9),
        "sequential_fraction_of_limit": seq_ups * flops / (gflops * 1e9),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": torch.get_num_threads(),
        "final_max_abs_diff": diff,
        **compiled,
    }


def profile_paths(clients: int, workload: str, seed: int = 0, rows: int = 8) -> dict:
    """``torch.profiler`` over one cohort's local solve (after a warm-up call) through each
    engine path — fedkin's default (the hand-batched solve where it applies), ``vmap`` and the
    sequential engine: total self CPU time and the ``rows`` operators with the most."""
    from torch.profiler import ProfilerActivity, profile

    from fedkin.algorithms.fedavg import FedAvg, FedAvgConfig
    from fedkin.engine import SequentialEngine, VectorizedEngine
    from fedkin.optim import sgd

    algorithm = FedAvg(FedAvgConfig(), build_workload_model(workload, seed), sgd(LR), STEPS)
    population = algorithm.init_population(algorithm.initial_params())
    ctx = {"client_id": torch.arange(clients), "round": torch.zeros(clients, dtype=torch.long)}
    args = (population, {}, _batches(clients, seed, 0, workload), ctx)
    engines = {
        "fedkin": VectorizedEngine(),
        "vmap": VectorizedEngine(fast_path=False),
        "sequential": SequentialEngine(),
    }
    out = {}
    for name, engine in engines.items():
        engine.map(algorithm.client_update, args, (None, None, 1, 0))
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            engine.map(algorithm.client_update, args, (None, None, 1, 0))
        events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in events)
        out[name] = {
            "path": getattr(engine, "last_path", "sequential"),
            "self_cpu_ms": total / 1e3,
            "top": [
                {
                    "op": e.key,
                    "calls": e.count,
                    "self_cpu_ms": e.self_cpu_time_total / 1e3,
                    "share": e.self_cpu_time_total / total,
                }
                for e in events[:rows]
            ],
        }
    return out


def print_profile(profiles: dict, clients: int, command: str, console: Console) -> None:
    for name, p in profiles.items():
        table = Table(
            title=f"{name} ({p['path']}), {clients} clients: {p['self_cpu_ms']:,.0f} ms self CPU"
        )
        for col in ("operator", "calls", "self ms", "share"):
            table.add_column(col, justify="left" if col == "operator" else "right")
        for e in p["top"]:
            table.add_row(
                e["op"],
                str(e["calls"]),
                f"{e['self_cpu_ms']:,.0f}",
                f"{100 * e['share']:.0f}%",
            )
        print_table(table, console)
    console.print(f"reproduce with: {command}", soft_wrap=True, markup=False)


def run_isolated(
    clients: int, rounds: int, loop_cap: int, threads: int, workload: str, compile: bool = False
) -> dict:
    """Measure one cohort size in a fresh interpreter (clean peak-memory reading); ``threads``
    torch intra-op threads for all implementations and the sgemm (0: torch's default)."""
    cmd = [
        sys.executable,
        "-m",
        "fedkin.bench.throughput",
        *(str(a) for a in (clients, rounds, loop_cap, threads)),
        workload,
        str(int(compile)),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def register_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "throughput",
        help="client updates/s: vectorized engine vs sequential engine vs plain PyTorch loop",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument(
        "--workload",
        choices=WORKLOADS,
        default="mlp",
        help="mlp: digits MLP 64-128-10 (default); cnn: Fashion-MNIST CNN",
    )
    p.add_argument(
        "--clients",
        default=None,
        help="comma-separated cohort sizes (default 100,1000 for mlp, 20,100 for cnn)",
    )
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per size (default 5)")
    p.add_argument(
        "--loop-cap",
        type=int,
        default=LOOP_CAP,
        help=f"max clients timed for the sequential engine and the loop (default {LOOP_CAP})",
    )
    p.add_argument(
        "--threads", type=int, default=0, help="torch threads for all (0: torch's default)"
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="also time the compiled engine (engine.compile=true; its warm-up compiles)",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="instead of timing: torch.profiler over one local solve of the first cohort size "
        "through fedkin's path, vmap and the sequential engine (top operators by self CPU)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_throughput)


def _rate(updates_per_s: float) -> str:
    """Updates/s with a decimal where it matters (the CNN runs a few per second)."""
    return f"{updates_per_s:,.1f}" if updates_per_s < 100 else f"{updates_per_s:,.0f}"


TITLES = {
    "mlp": "digits, MLP 64-128-10",
    "cnn": "Fashion-MNIST 1x28x28, CNN conv32-conv64-fc512",
}


def cmd_throughput(args: argparse.Namespace) -> int:
    from fedkin.core.errors import UserError

    clients = args.clients or ("100,1000" if args.workload == "mlp" else "20,100")
    try:
        sizes = [int(s) for s in str(clients).split(",")]
    except ValueError:
        raise UserError(f"--clients {clients!r}: give integers, e.g. 100,1000") from None
    if any(s < 1 for s in sizes) or args.rounds < 1 or args.loop_cap < 1 or args.threads < 0:
        raise UserError("--clients, --rounds and --loop-cap must be positive, --threads >= 0")
    if args.profile:
        if args.threads:
            torch.set_num_threads(args.threads)
        command = (
            f"fedkin bench throughput --workload {args.workload} --clients {sizes[0]} --profile"
            + (f" --threads {args.threads}" if args.threads else "")
        )
        profiles = profile_paths(sizes[0], args.workload)
        if args.json:
            print(json.dumps({"command": command, "profiles": profiles}, indent=2))
        else:
            print_profile(profiles, sizes[0], command, Console())
        return 0
    results = [
        run_isolated(n, args.rounds, args.loop_cap, args.threads, args.workload, args.compile)
        for n in sizes
    ]
    command = (
        "fedkin bench throughput"
        + (f" --workload {args.workload}" if args.workload != "mlp" else "")
        + f" --clients {clients} --rounds {args.rounds}"
        + (f" --loop-cap {args.loop_cap}" if args.loop_cap != LOOP_CAP else "")
        + (f" --threads {args.threads}" if args.threads else "")
        + (" --compile" if args.compile else "")
    )
    if args.json:
        print(json.dumps({"command": command, "results": results}, indent=2))
        return 0
    table = Table(
        title=f"FedAvg round throughput ({TITLES[args.workload]}, "
        f"{STEPS} SGD steps x batch {BATCH})"
    )
    for col in (
        "clients",
        "fedkin upd/s",
        "sequential upd/s",
        "loop upd/s",
        "x loop",
        "x sequential",
        "x vmap",
        "fedkin µs/upd",
        "s/round",
        "MFLOP/upd",
        "sgemm GFLOP/s",
        "% of limit",
        "peak RSS MB",
    ):
        table.add_column(col, justify="right")
    for r in results:
        capped = "" if r["loop_clients_timed"] == r["clients"] else f" ({r['loop_clients_timed']})"
        table.add_row(
            str(r["clients"]),
            _rate(r["fedkin_updates_per_s"]),
            f"{_rate(r['sequential_updates_per_s'])}{capped}",
            f"{_rate(r['loop_updates_per_s'])}{capped}",
            f"{r['speedup']:.1f}x",
            f"{r['speedup_vs_sequential']:.1f}x",
            f"{r['fast_path_speedup']:.2f}x",
            f"{r['fedkin_us_per_update']:.0f}",
            f"{r['fedkin_s_per_round']:.3f}",
            f"{r['flops_per_update'] / 1e6:,.1f}",
            f"{r['sgemm_gflops']:.0f}",
            f"{100 * r['fraction_of_limit']:.0f}%",
            f"{r['peak_rss_mb']:.0f}",
        )
    console = Console()
    print_table(table, console)
    diffs = [r["final_max_abs_diff"] for r in results if r["final_max_abs_diff"] is not None]
    if diffs:
        console.print(
            f"final models of fedkin, sequential and the loop differ by at most {max(diffs):.1e}"
        )
    if args.compile:
        table = Table(title="compiled engine (engine.compile=true), same rounds, interleaved")
        for col in ("clients", "compiled upd/s", "x eager", "% of limit", "compile s"):
            table.add_column(col, justify="right")
        for r in results:
            table.add_row(
                str(r["clients"]),
                _rate(r["compiled_updates_per_s"]),
                f"{r['compiled_speedup_vs_eager']:.2f}x",
                f"{100 * r['compiled_fraction_of_limit']:.0f}%",
                f"{r['compiled_compile_s']:.1f}",
            )
        print_table(table, console)
    console.print(
        "MFLOP/upd: FlopCounterMode on one client's update; sgemm: timed "
        f"{SGEMM_N}x{SGEMM_N} torch.mm in the same run; % of limit: fedkin upd/s x FLOP/upd / "
        "sgemm FLOP/s",
        soft_wrap=True,
    )
    console.print(
        f"data={results[0]['data']}; threads={results[0]['threads']}; "
        f"fedkin ran: {results[0]['fedkin_path']}; reproduce with: {command}",
        soft_wrap=True,
        markup=False,
    )
    return 0


if __name__ == "__main__":
    n, rounds, cap, threads = (int(a) for a in sys.argv[1:5])
    if threads:
        torch.set_num_threads(threads)
    print(json.dumps(measure(n, rounds, cap, workload=sys.argv[5], compile=sys.argv[6] == "1")))
