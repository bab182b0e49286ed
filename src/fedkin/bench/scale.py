"""`fedkin bench scale`: a personalized algorithm over 10⁴–10⁶ clients with client state on disk.

Shows that memory stays bounded and time per round does not grow with the population: a
round costs what its cohort costs, and the client-state store only occupies disk for the
clients that have trained.

Workload. Ditto (persistent personal model per client; ``local`` if Ditto is unavailable),
MLP 64-128-10, 5 local SGD steps of batch 8 (lr 0.1) for each of its two solvers, client states
in a lazily initialized memory-mapped store (``store.backend=disk``) with a checkpoint after
every round — the code path of ``fedkin run``. One warm-up round, then ``--rounds`` timed
rounds (median reported; a round's time includes its checkpoint). Each (population, cohort)
pair runs in its own subprocess, so its peak memory (max RSS) is its own.

Data (:func:`scale_dataset`). A million clients cannot come from digits partitions (1797
samples), so each client *draws* a few digits samples by a counter-based rng, ``h(·) =
Stream(seed).child("scale-data").keys(·)`` (a 32-bit hash of seed and counters):

* ``n_train(i) = 3 + h(i, 0) mod 6`` (3–8 samples), ``n_test(i) = 2``;
* two classes per client (label skew, so personalization matters): ``c0 = h(i, 1) mod 10``,
  ``c1 = (c0 + 1 + h(i, 2) mod 9) mod 10``;
* slot ``j`` (train slots 0–7, test slots 8–9), with ``u = h(i, 3, j)``, takes class
  ``c_{u mod 2}`` and within it sample ``(u >> 1) mod count(class)`` of the digits of that
  class.

Samples are drawn with replacement, so different clients may share a digits image; the data
of client ``i`` depends only on ``(seed, i)``. The tables are built with tensor ops in chunks of
clients — ``x`` stays the 1797 digits, and the only per-client memory is the padded index
tables (10 int64 per client), never Python objects per client or per sample.

What still grows with the population: a few hundred bytes per client of index metadata (the
dataset's padded index tables, the experiment's id/group/initialized vectors and transient
sort keys), and cohort sampling, which hashes and sorts every training client's key each round
(O(N), vectorized: a few tenths of a second per million clients on a loaded 2-core machine).
The engine and the store cost what the cohort costs.

Store size is the space the files actually occupy (``st_blocks``, like ``du``) after an
``fsync``; the dense size (population × state bytes) is what an eagerly allocated store would
take. Rows are written at page granularity (4 KiB per touched page of each state tensor), so a
trained client costs a little more than its state bytes when the population is sparse.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

TRAIN_MIN, TRAIN_MAX, TEST_SIZE = 3, 8, 2
HIDDEN, STEPS, BATCH, LR = 128, 5, 8, 0.1
CHUNK = 1 << 16  # clients per construction chunk (bounds temporaries)


def default_algorithm() -> str:
    from fedkin.algorithms import ALGORITHMS

    return "ditto" if "ditto" in ALGORITHMS else "local"


# ----- data -------------------------------------------------------------------------------------


def scale_dataset(num_clients: int, seed: int = 0):
    """A :class:`~fedkin.data.federated.FederatedDataset` of ``num_clients`` clients, each with
    3–8 train and 2 test digits samples of two classes, drawn by counter-based rng (module
    docstring). Vectorized, in chunks of clients; memory O(num_clients · 10) int64."""
    from sklearn.datasets import load_digits

    from fedkin.core.rng import Stream
    from fedkin.data.federated import FederatedDataset

    digits = load_digits()
    x = torch.as_tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.as_tensor(digits.target, dtype=torch.int64)
    by_class = torch.argsort(y, stable=True)  # sample ids grouped by class
    count = torch.bincount(y, minlength=10)
    start = torch.cumsum(count, 0) - count
    h = Stream(seed).child("scale-data").keys

    width = TRAIN_MAX + TEST_SIZE
    slots = torch.arange(width)[None, :]
    train_index = torch.empty(num_clients, TRAIN_MAX, dtype=torch.int64)
    test_index = torch.empty(num_clients, TEST_SIZE, dtype=torch.int64)
    train_sizes = torch.empty(num_clients, dtype=torch.int64)
    for lo in range(0, num_clients, CHUNK):
        i = torch.arange(lo, min(lo + CHUNK, num_clients))
        n_train = TRAIN_MIN + h(i, 0) % (TRAIN_MAX - TRAIN_MIN + 1)
        c0 = h(i, 1) % 10
        c1 = (c0 + 1 + h(i, 2) % 9) % 10
        u = h(i[:, None], 3, slots)  # [n, width]
        cls = torch.where((u & 1).bool(), c1[:, None], c0[:, None])
        rows = by_class[start[cls] + (u >> 1) % count[cls]]
        train = rows[:, :TRAIN_MAX]
        train_index[lo : lo + len(i)] = torch.where(
            slots[:, :TRAIN_MAX] < n_train[:, None], train, -1
        )
        test_index[lo : lo + len(i)] = rows[:, TRAIN_MAX:]
        train_sizes[lo : lo + len(i)] = n_train
    test_sizes = torch.full((num_clients,), TEST_SIZE, dtype=torch.int64)
    return FederatedDataset(
        "digits-scale",
        x,
        y,
        10,
        train_index,
        train_sizes,
        test_index,
        test_sizes,
        image_shape=(1, 8, 8),
    )


def scale_config(population: int, cohort: int, rounds: int, algorithm: str, seed: int = 0):
    """The experiment config of one measurement (``data`` only sizes the population: the
    dataset itself is :func:`scale_dataset`)."""
    from fedkin.config import validate_config

    return validate_config(
        {
            "name": "bench-scale",
            "seed": seed,
            "rounds": rounds,
            "data": {"name": "digits", "num_clients": population},
            "model": {"name": "mlp", "hidden": [HIDDEN]},
            "algorithm": {"name": algorithm},
            "client": {"local_steps": STEPS, "batch_size": BATCH},
            "cohort": {"clients_per_round": cohort},
            "store": {"backend": "disk"},
        }
    )


# ----- measurement ------------------------------------------------------------------------------


def disk_usage(path: Path) -> tuple[int, int]:
    """(allocated bytes, apparent bytes) of the files under ``path``, after fsync-ing them so
    pages written through memory maps are counted."""
    allocated = apparent = 0
    for f in path.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
                st = os.fstat(fd)
            finally:
                os.close(fd)
            allocated += st.st_blocks * 512
            apparent += st.st_size
    return allocated, apparent


class _Timers:
    """Accumulated wall time per label of wrapped callables."""

    def __init__(self) -> None:
        self.total: dict[str, float] = {}

    def wrap(self, label: str, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.total[label] = self.total.get(label, 0.0) + time.perf_counter() - t0

        return timed

    def take(self) -> dict[str, float]:
        out, self.total = self.total, {}
        return out


def anon_rss_mb() -> float | None:
    """Current anonymous (non file-backed) resident memory, from /proc (Linux; else None)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def measure(
    population: int,
    cohort: int,
    rounds: int,
    algorithm: str | None = None,
    seed: int = 0,
    workdir: str | None = None,
) -> dict:
    """Build the population, run one warm-up and ``rounds`` timed rounds (each followed by a
    checkpoint) on a disk store under a temporary directory; return the measurements.

    A round's time is split into the engine (local training of the cohort), the client store
    (gather + scatter, incl. the undo log) with the checkpoint, and cohort sampling."""
    from fedkin.experiment import Experiment

    algorithm = algorithm or default_algorithm()
    t0 = time.perf_counter()
    dataset = scale_dataset(population, seed)
    build_s = time.perf_counter() - t0
    config = scale_config(population, cohort, rounds + 1, algorithm, seed)
    with tempfile.TemporaryDirectory(prefix="fedkin-scale-", dir=workdir) as tmp:
        run_dir = Path(tmp)
        t0 = time.perf_counter()
        experiment = Experiment(config, run_dir, dataset=dataset)
        setup_s = time.perf_counter() - t0
        store = experiment.store
        timers = _Timers()  # instance attributes shadow the methods the round calls
        experiment.sample_cohort = timers.wrap("sample", experiment.sample_cohort)
        experiment.engine.map = timers.wrap("engine", experiment.engine.map)
        store.gather = timers.wrap("store", store.gather)
        store.scatter = timers.wrap("store", store.scatter)
        rows: list[dict[str, float]] = []
        for r in range(rounds + 1):
            t0 = time.perf_counter()
            experiment.run_round()
            t1 = time.perf_counter()
            experiment.save_checkpoint(run_dir)
            parts = timers.take()
            parts.update(total=time.perf_counter() - t0, checkpoint=time.perf_counter() - t1)
            if r:  # round 0 warms up
                rows.append(parts)
        allocated, apparent = disk_usage(run_dir / "client_state")
        trained = int(store.initialized.sum())
        state_bytes = sum(
            t.numel() * t.element_size()
            for t in store.template.values(include_nested=True, leaves_only=True)
        )
        checkpoint_bytes = (run_dir / "checkpoint.pt").stat().st_size
        anon = anon_rss_mb()

    def median(key: str) -> float:
        return statistics.median(r.get(key, 0.0) for r in rows)

    return {
        "population": population,
        "clients_per_round": cohort,
        "algorithm": algorithm,
        "rounds_timed": rounds,
        "s_per_round": median("total"),
        "s_per_round_min": min(r["total"] for r in rows),
        "engine_s": median("engine"),
        "store_s": median("store") + median("checkpoint"),
        "sample_s": median("sample"),
        "us_per_client": 1e6 * median("total") / cohort,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "anon_rss_mb_end": anon,
        "clients_trained": trained,
        "state_bytes_per_client": state_bytes,
        "store_allocated_bytes": allocated,
        "store_apparent_bytes": apparent,
        "store_bytes_per_trained_client": allocated / max(trained, 1),
        "dense_store_bytes": population * state_bytes,
        "checkpoint_bytes": checkpoint_bytes,
        "build_dataset_s": build_s,
        "setup_s": setup_s,
        "threads": torch.get_num_threads(),
    }


def run_isolated(population: int, cohort: int, rounds: int, algorithm: str) -> dict:
    """:func:`measure` in a fresh interpreter (a clean peak-memory reading)."""
    cmd = [
        sys.executable,
        "-m",
        "fedkin.bench.scale",
        str(population),
        str(cohort),
        str(rounds),
        algorithm,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(
            f"scale measurement {population=} {cohort=} failed:\n{out.stderr.strip()}"
        )
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----- command line -----------------------------------------------------------------------------


def _ints(text: str, flag: str) -> list[int]:
    from fedkin.core.errors import UserError

    try:
        values = [int(s.replace("_", "")) for s in str(text).split(",")]
    except ValueError:
        raise UserError(f"{flag} {text!r}: give comma-separated integers, e.g. 100,1000") from None
    if any(v < 1 for v in values):
        raise UserError(f"{flag} {text!r}: values must be positive")
    return values


def register_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "scale",
        help="personalized FL over 10^4-10^6 clients: memory, s/round, disk store size",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument(
        "--populations",
        default="10000,100000,1000000",
        help="comma-separated population sizes (default 10000,100000,1000000)",
    )
    p.add_argument(
        "--clients-per-round",
        default="100,1000",
        help="comma-separated cohort sizes (default 100,1000)",
    )
    p.add_argument("--rounds", type=int, default=3, help="timed rounds after a warm-up (3)")
    p.add_argument(
        "--algorithm", default=None, help="algorithm (default: ditto, or local without it)"
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_scale)


def cmd_scale(args: argparse.Namespace) -> int:
    from fedkin.algorithms import ALGORITHMS
    from fedkin.core.errors import UserError

    populations = _ints(args.populations, "--populations")
    cohorts = _ints(args.clients_per_round, "--clients-per-round")
    if args.rounds < 1:
        raise UserError("--rounds must be positive")
    algorithm = args.algorithm or default_algorithm()
    if algorithm not in ALGORITHMS:
        raise UserError(f"--algorithm {algorithm!r}: one of {', '.join(ALGORITHMS)}")
    too_big = [(p, c) for p in populations for c in cohorts if c > p]
    if too_big:
        raise UserError(f"--clients-per-round exceeds the population in {too_big[0]}")
    results = [run_isolated(p, c, args.rounds, algorithm) for p in populations for c in cohorts]
    command = (
        f"fedkin bench scale --populations {args.populations} "
        f"--clients-per-round {args.clients_per_round} --rounds {args.rounds}"
        + (f" --algorithm {args.algorithm}" if args.algorithm else "")
    )
    if args.json:
        print(
            json.dumps({"command": command, "algorithm": algorithm, "results": results}, indent=2)
        )
        return 0
    print_table(results, algorithm, command)
    return 0


def _mb(n: float) -> str:
    return f"{n / 2**20:,.1f}"


def print_table(results: list[dict], algorithm: str, command: str) -> None:
    from rich.console import Console
    from rich.table import Table

    from fedkin.display import print_table

    table = Table(
        title=f"{algorithm} at scale (digits draws, MLP 64-{HIDDEN}-10, {STEPS} steps x batch "
        f"{BATCH}, disk store, checkpoint every round)"
    )
    for col in (
        "population",
        "clients/round",
        "s/round (min)",
        "engine s",
        "store+ckpt s",
        "sampling s",
        "peak RSS MB",
        "anon RSS MB",
        "clients trained",
        "store on disk MB",
        "KiB/trained client",
        "dense store MB",
    ):
        table.add_column(col, justify="right")
    for r in results:
        anon = r["anon_rss_mb_end"]
        table.add_row(
            f"{r['population']:,}",
            f"{r['clients_per_round']:,}",
            f"{r['s_per_round']:.2f} ({r['s_per_round_min']:.2f})",
            f"{r['engine_s']:.2f}",
            f"{r['store_s']:.2f}",
            f"{r['sample_s']:.3f}",
            f"{r['peak_rss_mb']:,.0f}",
            "-" if anon is None else f"{anon:,.0f}",
            f"{r['clients_trained']:,}",
            _mb(r["store_allocated_bytes"]),
            f"{r['store_bytes_per_trained_client'] / 1024:.1f}",
            _mb(r["dense_store_bytes"]),
        )
    console = Console()
    print_table(table, console)
    console.print(
        f"state per client {results[0]['state_bytes_per_client']:,} bytes; "
        f"threads={results[0]['threads']}; medians over timed rounds; s/round includes the "
        "checkpoint; anon RSS = resident memory minus file pages of the memory-mapped store "
        f"(at the end). Reproduce with: {command}"
    )


if __name__ == "__main__":
    pop, k, n_rounds = (int(a) for a in sys.argv[1:4])
    print(json.dumps(measure(pop, k, n_rounds, sys.argv[4] if len(sys.argv) > 4 else None)))
