"""`fedkin bench peers`: the standard throughput workload through fedkin, pfl-research and Flower.

The workload of ``fedkin bench throughput``: digits features, MLP 64-128-10, FedAvg, every
client runs 5 local SGD steps (batch 16, lr 0.1) per round, all clients sampled each round.
Both runs start from the same initial model and draw the same batches (counter-based in
(seed, round, client)), so they compute the same FedAvg rounds; the final models are compared.

* fedkin: the FedAvg local solver through the vectorized engine, the channel and the
  population update (the code path of ``fedkin run``).
* Flower: what a Flower user writes — a ``ClientApp`` whose ``train`` loads the received
  ``ArrayRecord`` into a torch model and runs ``torch.optim.SGD``, the built-in ``FedAvg``
  strategy in a ``ServerApp``, one virtual SuperNode per client, run by Flower's Simulation
  Runtime (``flwr.simulation.run_simulation`` on Ray, one CPU per ClientApp actor, so the
  2-core machine runs two clients at a time).
* pfl-research: what a pfl user writes — a ``PyTorchModel`` (local ``torch.optim.SGD``, central
  SGD of rate 1), a ``FederatedDataset`` of the same per-client draws, the built-in
  ``FederatedAveraging`` on pfl's in-process ``SimulatedBackend`` (clients one after another).

Each runs in its own subprocess after its imports; fedkin twice, with 1 torch thread and with
one per CPU (on a shared, oversubscribed machine intra-op threads can be much slower than
one). Reported per run: client updates per second in steady state (median over rounds after
the first) and end to end including startup (model and data set-up, Ray start and actor
warm-up for Flower, the first round's vmap tracing for fedkin), and the ratios fedkin /
pfl-research and fedkin / Flower (for the peers that are installed).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from fedkin.bench.throughput import BATCH, HIDDEN, LR, STEPS, _batches, _digits_cache

SEED = 0


def client_batches(client: int, seed: int, round_: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Client ``client``'s ``[steps, batch]`` draws of round ``round_``: exactly the slice
    ``_batches(clients, seed, round_)[:, client]`` of the cohort draw, computed alone."""
    from fedkin.core.rng import Stream

    x, y = _digits_cache()
    u = (
        Stream(seed)
        .child("bench")
        .uniform(round_, torch.arange(STEPS)[:, None], client, torch.arange(BATCH)[None, :])
    )
    idx = (u * len(y)).long()
    return x[idx], y[idx]


def initial_model() -> torch.nn.Module:
    """fedkin's MLP 64-128-10 at the bench seed: the initial weights of both runs."""
    from fedkin.models import MlpConfig, build_model

    return build_model(MlpConfig(hidden=[HIDDEN]), (64,), None, 10, seed=SEED)


class Net(torch.nn.Module):
    """The same MLP written the way a Flower quickstart does (same parameter names)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(64, HIDDEN), torch.nn.ReLU(), torch.nn.Linear(HIDDEN, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _summary(clients: int, round_times: list[float], total: float) -> dict:
    steady = statistics.median(round_times[1:]) if len(round_times) > 1 else round_times[0]
    return {
        "clients": clients,
        "rounds": len(round_times),
        "round_s": round_times,
        "steady_s_per_round": steady,
        "steady_updates_per_s": clients / steady,
        "total_s": total,
        "total_updates_per_s": clients * len(round_times) / total,
    }


# ----- fedkin -----------------------------------------------------------------------------------


def measure_fedkin(
    clients: int, rounds: int, out: Path | None = None, compile: bool = False
) -> dict:
    """FedAvg rounds through the vectorized engine; the clock starts before model and data
    (so with ``compile`` the first round includes torch.compile's compilation)."""
    from fedkin.algorithms.base import ServerStep
    from fedkin.algorithms.fedavg import FedAvg, FedAvgConfig
    from fedkin.core.channel import Channel
    from fedkin.engine import EngineConfig
    from fedkin.optim import sgd

    t0 = time.perf_counter()
    model = initial_model()
    _digits_cache()
    algorithm = FedAvg(FedAvgConfig(), model, sgd(LR), STEPS)
    engine = EngineConfig(compile=compile).build()
    channel, server = Channel(), ServerStep(sgd(1.0))
    population = algorithm.init_population(algorithm.initial_params())
    weights = torch.full((clients,), float(STEPS * BATCH))
    ctx = {"client_id": torch.arange(clients), "round": torch.zeros(clients, dtype=torch.long)}
    times, last = [], time.perf_counter()
    for r in range(rounds):
        batches = _batches(clients, SEED, r)
        messages, _, _ = engine.map(
            algorithm.client_update, (population, {}, batches, ctx), (None, None, 1, 0)
        )
        aggregate, _ = channel(messages, weights)
        population = algorithm.population_update(population, aggregate, server)
        now = time.perf_counter()
        times.append(now - last)
        last = now
    if out is not None:
        torch.save(population["global"], out)
    return {
        "runtime": "fedkin",
        "threads": torch.get_num_threads(),
        "compiled": compile,
        **_summary(clients, times, last - t0),
    }


# ----- Flower -----------------------------------------------------------------------------------


def _flower_apps(clients: int, rounds: int, result: dict):
    """A plain Flower app for the workload: torch model + torch.optim.SGD ClientApp, FedAvg."""
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp
    from flwr.serverapp.strategy import FedAvg

    client_app = ClientApp()

    @client_app.train()
    def train(msg, context):
        model = Net()
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        client = int(context.node_config["partition-id"])
        xs, ys = client_batches(client, SEED, int(msg.content["config"]["server-round"]) - 1)
        optimizer = torch.optim.SGD(model.parameters(), lr=LR)
        for s in range(STEPS):
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(xs[s]), ys[s])
            loss.backward()
            optimizer.step()
        metrics = MetricRecord({"train_loss": loss.item(), "num-examples": STEPS * BATCH})
        content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics})
        return Message(content=content, reply_to=msg)

    class TimedFedAvg(FedAvg):
        def aggregate_train(self, server_round, replies):
            out = super().aggregate_train(server_round, replies)
            result["round_end"].append(time.perf_counter())
            return out

    server_app = ServerApp()

    @server_app.main()
    def main(grid, context):
        strategy = TimedFedAvg(
            fraction_train=1.0,
            fraction_evaluate=0.0,
            min_train_nodes=clients,
            min_available_nodes=clients,
        )
        arrays = ArrayRecord(initial_model().state_dict())
        outcome = strategy.start(grid=grid, initial_arrays=arrays, num_rounds=rounds)
        result["final"] = outcome.arrays.to_torch_state_dict()

    return server_app, client_app


def measure_flower(clients: int, rounds: int, out: Path | None = None) -> dict:
    """The Flower app on the Simulation Runtime; the clock starts before Ray starts."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    from flwr.simulation import run_simulation

    result: dict = {"round_end": []}
    server_app, client_app = _flower_apps(clients, rounds, result)
    t0 = time.perf_counter()
    run_simulation(
        server_app,
        client_app,
        num_supernodes=clients,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    ends = result["round_end"]
    if len(ends) != rounds:
        raise RuntimeError(f"the Flower run finished {len(ends)} of {rounds} rounds")
    times = [ends[0] - t0] + [b - a for a, b in itertools.pairwise(ends)]
    if out is not None:
        torch.save(result["final"], out)
    return {
        "runtime": "flower",
        "workers": int(os.cpu_count() or 1),  # ClientApp actors: one CPU each
        **_summary(clients, times, ends[-1] - t0),
    }


# ----- pfl-research -----------------------------------------------------------------------------


class PflNet(Net):
    """The MLP with the ``loss`` and ``metrics`` methods pfl-research's ``PyTorchModel`` calls."""

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(self(x), y)

    @torch.no_grad()
    def metrics(self, x: torch.Tensor, y: torch.Tensor) -> dict:
        from pfl.metrics import Weighted

        return {"loss": Weighted(float(self.loss(x, y)) * len(y), len(y))}


def measure_pfl(clients: int, rounds: int, out: Path | None = None) -> dict:
    """What a pfl-research user writes: a ``PyTorchModel`` with ``torch.optim.SGD`` as the local
    optimizer and a central SGD of rate 1 (FedAvg's server step), a ``FederatedDataset`` whose
    user ``c`` holds its ``STEPS·BATCH`` draws of the current round in step order (pfl iterates a
    user's data in order, ``local_batch_size=BATCH``, one epoch: exactly the fedkin steps),
    the built-in ``FederatedAveraging`` on the ``SimulatedBackend`` with every user in the
    cohort. The clock starts before model and data set-up."""
    from pfl.aggregate.simulate import SimulatedBackend
    from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
    from pfl.callback.base import TrainingProcessCallback
    from pfl.data.dataset import Dataset
    from pfl.data.federated_dataset import FederatedDataset
    from pfl.data.sampling import get_user_sampler
    from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams
    from pfl.metrics import Metrics
    from pfl.model.pytorch import PyTorchModel

    t0 = time.perf_counter()
    net = PflNet()
    net.load_state_dict(initial_model().state_dict())
    _digits_cache()
    round_of = dict.fromkeys(range(clients), 0)  # each user is drawn once per round

    def make_dataset(user: int) -> Dataset:
        xs, ys = client_batches(user, SEED, round_of[user])
        round_of[user] += 1
        return Dataset(raw_data=[xs.reshape(-1, 64), ys.reshape(-1)], user_id=str(user))

    data = FederatedDataset(make_dataset, get_user_sampler("minimize_reuse", list(range(clients))))
    ends: list[float] = []

    class RoundTimer(TrainingProcessCallback):
        def after_central_iteration(self, aggregate_metrics, model, *, central_iteration):
            ends.append(time.perf_counter())
            return False, Metrics()

    model = PyTorchModel(
        model=net,
        local_optimizer_create=torch.optim.SGD,
        central_optimizer=torch.optim.SGD(net.parameters(), lr=1.0),
    )
    FederatedAveraging().run(
        algorithm_params=NNAlgorithmParams(
            central_num_iterations=rounds,
            evaluation_frequency=rounds + 1,
            train_cohort_size=clients,
            val_cohort_size=0,
        ),
        backend=SimulatedBackend(training_data=data, val_data=data),
        model=model,
        model_train_params=NNTrainHyperParams(
            local_learning_rate=LR, local_num_epochs=1, local_batch_size=BATCH
        ),
        model_eval_params=NNEvalHyperParams(local_batch_size=BATCH),
        callbacks=[RoundTimer()],
    )
    if len(ends) != rounds:
        raise RuntimeError(f"the pfl-research run finished {len(ends)} of {rounds} rounds")
    times = [ends[0] - t0] + [b - a for a, b in itertools.pairwise(ends)]
    if out is not None:
        torch.save({k: v.detach() for k, v in net.state_dict().items()}, out)
    return {
        "runtime": "pfl",
        "threads": torch.get_num_threads(),
        **_summary(clients, times, ends[-1] - t0),
    }


# ----- driver -----------------------------------------------------------------------------------


def _installed(*modules: str) -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in modules)


def flower_available() -> bool:
    return _installed("flwr", "ray")


def pfl_available() -> bool:
    return _installed("pfl")


#: peer runtimes in the order they run: (name, JSON key suffix, availability, install hint);
#: availability is looked up when called (tests replace it)
PEERS = (
    ("pfl", "pfl", lambda: pfl_available(), "pip install 'fedkin[pfl]'"),
    ("flower", "flower", lambda: flower_available(), "pip install 'fedkin[flower]'"),
)


def run_isolated(
    runtime: str,
    clients: int,
    rounds: int,
    out: Path,
    timeout: float,
    threads: int = 0,
    compile: bool = False,
) -> dict:
    """One measurement in a fresh interpreter (its own imports, threads and memory)."""
    cmd = [sys.executable, "-m", "fedkin.bench.peers", runtime, str(clients), str(rounds), str(out)]
    proc = subprocess.run(
        [*cmd, str(threads), str(int(compile))],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{runtime} run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compare(clients: int, rounds: int, compile: bool = True, timeout: float = 1800.0) -> dict:
    """fedkin with 1 and with all torch threads (eager, and compiled with all threads), then each
    installed peer (pfl-research, Flower); fedkin's ratios to each peer and the final models'
    largest difference (all compute the same rounds)."""
    cpus = os.cpu_count() or 1
    results: dict = {"cpus": cpus, "runs": []}
    variants = [(threads, False) for threads in sorted({1, cpus})] + ([(cpus, True)] * compile)
    with tempfile.TemporaryDirectory() as tmp:
        outs = []
        for threads, compiled in variants:
            outs.append(Path(tmp) / f"fedkin{threads}{'c' * compiled}.pt")
            results["runs"].append(
                run_isolated("fedkin", clients, rounds, outs[-1], timeout, threads, compiled)
            )
        fedkin_runs = list(results["runs"])
        for name, key, available, _ in PEERS:
            results[f"{name}_installed"] = available()
            if not results[f"{name}_installed"]:
                continue
            outs.append(Path(tmp) / f"{name}.pt")
            peer = run_isolated(name, clients, rounds, outs[-1], timeout)
            results["runs"].append(peer)
            for run in fedkin_runs:
                for kind in ("steady", "total"):
                    run[f"{kind}_speedup_vs_{key}"] = (
                        run[f"{kind}_updates_per_s"] / peer[f"{kind}_updates_per_s"]
                    )
        if len(outs) > len(fedkin_runs):
            models = [torch.load(o) for o in outs]
            results["max_abs_model_diff"] = max(
                float((m[k] - models[0][k]).abs().max()) for m in models[1:] for k in m
            )
    return results


def register_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "peers",
        help="client updates/s: fedkin (vectorized) vs pfl-research and Flower on one workload",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--clients", type=int, default=100, help="clients, all train each round")
    p.add_argument("--rounds", type=int, default=5, help="FedAvg rounds per runtime (default 5)")
    p.add_argument(
        "--no-compile",
        dest="compile",
        action="store_false",
        help="skip the torch.compile'd fedkin run (its first round compiles, tens of seconds)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_peers)


def _label(run: dict) -> str:
    if run["runtime"] == "flower":
        return f"flower {run['workers']}x1 thr"
    if run["runtime"] == "pfl":
        return f"pfl-research {run['threads']} thr"
    return f"fedkin {run['threads']} thr" + (" compiled" if run["compiled"] else "")


def _ratio(x: float) -> str:
    """A speed ratio, with a decimal below 10 (start-up ratios can be below 1)."""
    return f"{x:,.0f}" if x >= 10 else f"{x:.1f}"


_PEER_NAMES = {"pfl": "pfl-research", "flower": "Flower"}


def cmd_peers(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from fedkin.core.errors import UserError
    from fedkin.display import print_table

    if args.clients < 1 or args.rounds < 2:
        raise UserError("--clients must be ≥ 1 and --rounds ≥ 2 (round 1 is the warm-up)")
    command = f"fedkin bench peers --clients {args.clients} --rounds {args.rounds}"
    command += "" if args.compile else " --no-compile"
    results = compare(args.clients, args.rounds, args.compile)
    if args.json:
        print(json.dumps({"command": command, **results}, indent=2))
        return 0
    table = Table(
        title=f"FedAvg, {args.clients} clients x {args.rounds} rounds (digits, MLP 64-128-10, "
        f"{STEPS} SGD steps x batch {BATCH}, lr {LR})"
    )
    columns = ("runtime", "steady upd/s", "s/round", "upd/s incl. startup", "total s")
    columns += ("x pfl-research", "x Flower")
    for i, col in enumerate(columns):
        table.add_column(col, justify="left" if i == 0 else "right")
    for run in results["runs"]:
        speedups = [
            f"{_ratio(run[f'steady_speedup_vs_{key}'])} / {_ratio(run[f'total_speedup_vs_{key}'])}"
            if f"steady_speedup_vs_{key}" in run
            else ""
            for _, key, _, _ in PEERS
        ]
        table.add_row(
            _label(run),
            f"{run['steady_updates_per_s']:,.1f}",
            f"{run['steady_s_per_round']:.3f}",
            f"{run['total_updates_per_s']:,.1f}",
            f"{run['total_s']:.1f}",
            *speedups,
        )
    console = Console()
    print_table(table, console)
    for name, _, _, hint in PEERS:
        if not results[f"{name}_installed"]:
            console.print(
                f"{_PEER_NAMES[name]} was not measured: it is not installed ({hint})",
                soft_wrap=True,
                markup=False,
            )
    console.print(
        "steady: median over rounds after the first; incl. startup: from before model/data "
        "(and Ray) set-up to the end of the last round; x peer: steady / incl. startup. "
        f"cpus={results['cpus']}."
        + (
            f" Final models agree to {results['max_abs_model_diff']:.1e}."
            if "max_abs_model_diff" in results
            else ""
        )
    )
    console.print(f"reproduce with: {command}")
    return 0


if __name__ == "__main__":
    runtime, n, rounds, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
    if runtime == "fedkin":
        threads, compiled = int(sys.argv[5]), bool(int(sys.argv[6]))
        if threads:
            torch.set_num_threads(threads)
        print(json.dumps(measure_fedkin(n, rounds, out, compiled)))
    elif runtime == "pfl":
        print(json.dumps(measure_pfl(n, rounds, out)))
    else:
        print(json.dumps(measure_flower(n, rounds, out)))
