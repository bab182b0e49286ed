"""`fedkin bench compile`: what compiling costs and saves — the calibration of ``compile=auto``.

Two measurements, each in fresh interpreters:

* **Compile time, cold and warm cache.** The throughput workload (``fedkin bench throughput``:
  FedAvg, MLP 64-128-10 or the Fashion-MNIST CNN, ``--steps`` SGD steps of batch 16) through
  the compiled engine, twice, with the same new, empty ``TORCHINDUCTOR_CACHE_DIR``: the first
  process compiles cold, the second from the persistent cache. Each reports its first
  compiled call (``compile_s``: Dynamo tracing + Inductor, or the cache hit; the engine
  compiles the hand-batched FedAvg/MLP solve where it applies, ``compile_vmap_s`` the vmap
  path) and then alternates eager and compiled rounds, with and without the fast path, for
  the steady-state ratio ``compiled_speedup`` (median eager round ÷ median compiled round,
  same process, interleaved) and ``speed_vs_eager_vmap`` (each engine against eager vmap).
* **Whole runs.** ``fedkin run`` of the default configuration (``--run-rounds`` rounds, 60 by
  default) with ``engine.compile=false``, ``auto`` and ``true`` (warm cache), wall time of the
  whole process including start-up and compilation: the target is ``auto`` ≤ eager.

The constants of :mod:`fedkin.engine.plan` (``COMPILED_SPEEDUP``, ``COMPILE_BASE_S``,
``COMPILE_PER_STEP_S``) come from this benchmark.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

WORKLOADS = ("mlp", "cnn")


def measure(workload: str, clients: int, steps: int, rounds: int) -> dict:
    """In this process: the first compiled call, then ``rounds`` interleaved eager/compiled
    rounds of the throughput workload."""
    import fedkin.bench.throughput as tp
    from fedkin.algorithms.fedavg import FedAvg, FedAvgConfig
    from fedkin.engine import VectorizedEngine
    from fedkin.engine.plan import EnginePlan
    from fedkin.optim import sgd

    model = tp.build_workload_model(workload)
    algorithm = FedAvg(FedAvgConfig(), model, sgd(tp.LR), steps)
    population = algorithm.init_population(algorithm.initial_params())
    ctx = {"client_id": torch.arange(clients), "round": torch.zeros(clients, dtype=torch.long)}
    plan = EnginePlan(rounds, clients, steps)
    engines = {
        "eager": VectorizedEngine(plan=plan),
        "compiled": VectorizedEngine(compile=True, plan=plan),
        "eager_vmap": VectorizedEngine(plan=plan, fast_path=False),
        "compiled_vmap": VectorizedEngine(compile=True, plan=plan, fast_path=False),
    }

    def call(name: str, r: int) -> float:
        batches = tp._batches(clients, 0, r, workload, steps)
        t0 = time.perf_counter()
        engines[name].map(
            algorithm.client_update, (population, {}, batches, ctx), (None, None, 1, 0)
        )
        return time.perf_counter() - t0

    first = {name: call(name, 0) for name in engines}
    times: dict[str, list[float]] = {name: [] for name in engines}
    for r in range(1, rounds + 1):
        for name in times:
            times[name].append(call(name, r))
    median = {name: statistics.median(t) for name, t in times.items()}
    eager, compiled = median["eager"], median["compiled"]
    return {
        "workload": workload,
        "clients": clients,
        "steps": steps,
        "compile_s": first["compiled"],
        "compile_vmap_s": first["compiled_vmap"],
        "s_per_round": median,
        "speed_vs_eager_vmap": {name: median["eager_vmap"] / m for name, m in median.items()},
        "eager_s_per_round": eager,
        "compiled_s_per_round": compiled,
        "compiled_speedup": eager / compiled,
        "threads": torch.get_num_threads(),
    }


def _python(args: list[str], env: dict[str, str], timeout: float) -> tuple[str, float]:
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=env, timeout=timeout
    )
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout, elapsed


def compile_times(workload: str, clients: int, steps: int, rounds: int, timeout: float) -> dict:
    """Cold then warm compile of the workload, sharing one new cache directory."""
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
        runs = []
        for cache_state in ("cold", "warm"):
            out, _ = _python(
                ["-m", "fedkin.bench.compile", workload, str(clients), str(steps), str(rounds)],
                env,
                timeout,
            )
            runs.append({"cache": cache_state, **json.loads(out.strip().splitlines()[-1])})
    return {"cold": runs[0], "warm": runs[1]}


def run_times(rounds: int, timeout: float) -> list[dict]:
    """Wall time of ``fedkin run`` (default configuration) per ``engine.compile`` value, with
    the user's persistent compile cache as it is (warm after an earlier compiled run)."""
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for value in ("false", "auto", "true"):
            args = ["-m", "fedkin.cli.main", "run", "--quiet", "--out", f"{tmp}/{value}"]
            _, elapsed = _python(
                [*args, f"rounds={rounds}", f"engine.compile={value}"], dict(os.environ), timeout
            )
            summary = json.loads(Path(f"{tmp}/{value}/summary.json").read_text())
            results.append({"compile": value, "wall_s": elapsed, "summary": summary})
    eager = results[0]["wall_s"]
    for r in results:
        r["vs_eager"] = r["wall_s"] / eager
    return results


def register_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compile",
        help="compile time (cold/warm cache), compiled vs eager speed, and whole runs with "
        "engine.compile=false|auto|true",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--workload", choices=WORKLOADS, default="mlp")
    p.add_argument("--clients", type=int, default=100, help="cohort size (default 100)")
    p.add_argument("--steps", default="5", help="comma-separated local step counts (default 5)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per engine (default 5)")
    p.add_argument(
        "--run-rounds",
        type=int,
        default=60,
        help="rounds of the default `fedkin run` (0: skip the whole-run comparison)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_compile)


def cmd_compile(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from fedkin.core.errors import UserError
    from fedkin.display import print_table

    try:
        steps = [int(s) for s in str(args.steps).split(",")]
    except ValueError:
        raise UserError(f"--steps {args.steps!r}: give integers, e.g. 2,5,10") from None
    if args.clients < 1 or args.rounds < 1 or args.run_rounds < 0 or min(steps) < 1:
        raise UserError("--clients, --steps and --rounds must be positive, --run-rounds >= 0")
    command = (
        f"fedkin bench compile --workload {args.workload} --clients {args.clients} "
        f"--steps {args.steps} --rounds {args.rounds} --run-rounds {args.run_rounds}"
    )
    timeout = 3600.0
    compiles = [compile_times(args.workload, args.clients, s, args.rounds, timeout) for s in steps]
    runs = run_times(args.run_rounds, timeout) if args.run_rounds else []
    if args.json:
        print(json.dumps({"command": command, "compile": compiles, "runs": runs}, indent=2))
        return 0
    console = Console()
    table = Table(
        title=f"torch.compile of the local solve ({args.workload}, {args.clients} clients)"
    )
    for col in ("steps", "cold compile s", "warm compile s", "compiled / eager speed"):
        table.add_column(col, justify="right")
    for c in compiles:
        table.add_row(
            str(c["cold"]["steps"]),
            f"{c['cold']['compile_s']:.1f}",
            f"{c['warm']['compile_s']:.1f}",
            f"{c['cold']['compiled_speedup']:.2f}x / {c['warm']['compiled_speedup']:.2f}x",
        )
    print_table(table, console)
    if runs:
        table = Table(title=f"fedkin run (default config, {args.run_rounds} rounds), wall time")
        for col in ("engine.compile", "wall s", "÷ eager"):
            table.add_column(col, justify="right")
        for r in runs:
            table.add_row(r["compile"], f"{r['wall_s']:.1f}", f"{r['vs_eager']:.2f}")
        print_table(table, console)
    console.print(
        "compile s: first compiled call (cold: empty cache; warm: same cache, new process); "
        f"speed: median eager / compiled round, interleaved. threads={torch.get_num_threads()}",
        soft_wrap=True,
    )
    console.print(f"reproduce with: {command}", soft_wrap=True, markup=False)
    return 0


if __name__ == "__main__":
    print(json.dumps(measure(sys.argv[1], *(int(a) for a in sys.argv[2:5]))))
