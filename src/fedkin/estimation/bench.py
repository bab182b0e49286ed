"""`fedkin bench estimation` (also `fedkin estimate --simulate`): estimators against closed forms.

Draws hierarchical Gaussian data (``θ_i ~ N(μ, τ²)``, ``x_ij ~ N(θ_i, σ²)``, ``n`` samples per
client, :mod:`fedkin.estimation.simulate`) ``reps`` times and reports, for local, global,
James–Stein, empirical Bayes and private empirical Bayes at a few ε, the mean squared error
``(1/m) Σ (θ̂_i − θ_i)²`` averaged over repetitions with its standard error (from the spread of
the per-repetition MSEs), the method's closed form where one exists, the Bayes-optimal oracle
``τ²s²/(τ² + s²)`` and the ratio MSE/oracle. σ² is estimated by every method (not given).
Private rows also show the ε the accountant reports for one estimate (each repetition is a
separate dataset). Then it sweeps the number of clients, samples per client, τ² and ε (fewer
repetitions) and writes one PNG per sweep into ``--out``.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from fedkin.core.errors import ConfigError
from fedkin.core.rng import Stream
from fedkin.display import print_table
from fedkin.estimation.api import estimate
from fedkin.estimation.private import PrivacyConfig
from fedkin.estimation.simulate import (
    global_mse,
    local_mse,
    oracle_mse,
    plugin_mean_mse,
    simulate_gaussian,
)

DEFAULT_OUT = Path("runs/estimation-bench")
BASE_METHODS = ("local", "global", "james-stein", "empirical-bayes")
SWEEPS = {
    "clients": (10, 30, 100, 300, 1000, 3000),
    "samples": (2, 5, 10, 20, 50),
    "tau2": (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0),
    "epsilon": (0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0),
}


@dataclass(frozen=True)
class BenchSpec:
    """One benchmark: the population, repetitions, privacy levels, seed and output."""

    clients: int = 1000
    samples: int = 10
    tau2: float = 1.0
    sigma2: float = 4.0
    reps: int = 20
    epsilons: tuple[float, ...] = (0.1, 1.0, 10.0)
    delta: float = 1e-6
    seed: int = 0
    out: Path = DEFAULT_OUT
    plots: bool = True

    def __post_init__(self) -> None:
        checks = [
            (self.clients >= 2, f"--clients must be >= 2, got {self.clients}"),
            (self.samples >= 2, f"--samples must be >= 2 (σ² is estimated), got {self.samples}"),
            (self.tau2 > 0, f"--tau2 must be > 0, got {self.tau2}"),
            (self.sigma2 > 0, f"--sigma2 must be > 0, got {self.sigma2}"),
            (self.reps >= 2, f"--reps must be >= 2 (for a standard error), got {self.reps}"),
            (all(e > 0 for e in self.epsilons), f"--epsilons must be > 0, got {self.epsilons}"),
            (0 < self.delta < 1, f"--delta must be in (0, 1), got {self.delta}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    def command(self) -> str:
        eps = " ".join(f"{e:g}" for e in self.epsilons)
        parts = [
            f"fedkin bench estimation --clients {self.clients} --samples {self.samples}",
            f"--tau2 {self.tau2:g} --sigma2 {self.sigma2:g} --reps {self.reps}",
            f"--epsilons {eps} --delta {self.delta:g} --seed {self.seed} --out {self.out}",
        ]
        return " ".join(parts) + ("" if self.plots else " --no-plots")


@dataclass(frozen=True)
class Row:
    """MSE over repetitions (mean, standard error) and, for private rows, ε spent."""

    mse: float
    se: float
    epsilon_spent: float | None = None


def private_name(epsilon: float) -> str:
    return f"private EB ε={epsilon:g}"


def measure(spec: BenchSpec, methods: Sequence[str] = BASE_METHODS) -> dict[str, Row]:
    """MSE of every method (and private EB at each of ``spec.epsilons``) over ``spec.reps``."""
    errors: dict[str, list[float]] = {}
    spent: dict[str, float] = {}
    data_stream = Stream(spec.seed).child("estimation-bench").child("data")
    noise_stream = Stream(spec.seed).child("estimation-bench").child("dp-noise")
    for rep in range(spec.reps):
        data, theta = simulate_gaussian(
            spec.clients,
            spec.samples,
            tau2=spec.tau2,
            sigma2=spec.sigma2,
            generator=data_stream.generator(rep),
        )
        for method in methods:
            est = estimate(data, method=method, family="gaussian").estimates
            errors.setdefault(method, []).append(float(((est - theta) ** 2).mean()))
        for k, eps in enumerate(spec.epsilons):
            result = estimate(
                data,
                family="gaussian",
                privacy=PrivacyConfig(eps, spec.delta),
                generator=noise_stream.generator(rep, k),
            )
            name = private_name(eps)
            errors.setdefault(name, []).append(float(((result.estimates - theta) ** 2).mean()))
            assert result.privacy is not None
            spent[name] = result.privacy.epsilon_spent
    rows = {}
    for name, values in errors.items():
        t = torch.tensor(values, dtype=torch.float64)
        rows[name] = Row(float(t.mean()), float(t.std() / math.sqrt(len(values))), spent.get(name))
    return rows


def closed_forms(spec: BenchSpec) -> dict[str, float]:
    """Local and global exactly; empirical Bayes by its τ²-known idealization (``≈``)."""
    m, n, t2, s2 = spec.clients, spec.samples, spec.tau2, spec.sigma2
    return {
        "local": local_mse(s2, n),
        "global": global_mse(t2, s2, n, m),
        "empirical-bayes": plugin_mean_mse(t2, s2, n, m),
    }


FORMULAS = (
    "closed forms (s² = σ²/n): local s²; global τ²(1−1/m) + s²/m; empirical Bayes ≈ "
    "s²(τ² + s²/m)/(τ² + s²) (τ² known, μ estimated); oracle τ²s²/(τ² + s²)"
)


def table(spec: BenchSpec, rows: dict[str, Row]) -> Table:
    oracle = oracle_mse(spec.tau2, spec.sigma2, spec.samples)
    forms = closed_forms(spec)
    t = Table(
        title=f"MSE of personalized estimates (mean over {spec.reps} repetitions ± SE; "
        f"private rows at δ={spec.delta:g})"
    )
    t.add_column("method", no_wrap=True)
    for col in ("MSE", "± SE", "closed form", "oracle (Bayes)", "MSE / oracle"):
        t.add_column(col, justify="right")
    t.add_column("ε spent", justify="right")
    for name, row in rows.items():
        form = forms.get(name)
        t.add_row(
            name,
            f"{row.mse:.4f}",
            f"{row.se:.4f}",
            "" if form is None else f"{form:.4f}",
            f"{oracle:.4f}",
            f"{row.mse / oracle:.3f}",
            "" if row.epsilon_spent is None else f"{row.epsilon_spent:.4f}",
        )
    return t


def sweep(spec: BenchSpec, field: str, values: Sequence[float], reps: int) -> dict[str, list[Row]]:
    """Rows for each value of ``field`` (a :class:`BenchSpec` field, or ``"epsilon"``)."""
    curves: dict[str, list[Row]] = {}
    for value in values:
        if field == "epsilon":
            point = replace(spec, reps=reps, epsilons=(value,))
            rows = measure(point, methods=("local", "empirical-bayes"))
            rows["private EB"] = rows.pop(private_name(value))
        else:
            point = replace(
                spec, reps=reps, epsilons=(1.0,), **{field: type(getattr(spec, field))(value)}
            )
            rows = measure(point)
            rows["private EB ε=1"] = rows.pop(private_name(1.0))
        for name, row in rows.items():
            curves.setdefault(name, []).append(row)
    return curves


def plot(
    path: Path,
    field: str,
    values: Sequence[float],
    curves: dict[str, list[Row]],
    oracle: Callable[[float], float],
    title: str,
) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.add_subplot()
    for name, rows in curves.items():
        ax.errorbar(
            values,
            [r.mse for r in rows],
            yerr=[r.se for r in rows],
            marker="o",
            markersize=3,
            capsize=2,
            label=name,
        )
    ax.plot(values, [oracle(v) for v in values], "k--", label="Bayes oracle (closed form)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(
        {
            "clients": "number of clients m",
            "samples": "samples per client n",
            "tau2": "heterogeneity τ²",
            "epsilon": "privacy ε",
        }[field]
    )
    ax.set_ylabel("MSE")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=120)


def write_plots(spec: BenchSpec, console: Console) -> list[Path]:
    """The four sweeps, each with ``max(2, reps // 4)`` repetitions per point."""
    reps = max(2, spec.reps // 4)
    spec.out.mkdir(parents=True, exist_ok=True)
    fixed = {
        "clients": f"m={spec.clients}",
        "samples": f"n={spec.samples}",
        "tau2": f"τ²={spec.tau2:g}",
        "epsilon": "private EB at ε=1",
    }
    oracles: dict[str, Callable[[float], float]] = {
        "clients": lambda v: oracle_mse(spec.tau2, spec.sigma2, spec.samples),
        "samples": lambda v: oracle_mse(spec.tau2, spec.sigma2, v),
        "tau2": lambda v: oracle_mse(v, spec.sigma2, spec.samples),
        "epsilon": lambda v: oracle_mse(spec.tau2, spec.sigma2, spec.samples),
    }
    paths = []
    for field, values in SWEEPS.items():
        with console.status(f"sweeping {field} …"):
            curves = sweep(spec, field, values, reps)
        path = spec.out / f"mse_vs_{field}.png"
        others = ", ".join(v for k, v in fixed.items() if k != field)
        title = (
            f"MSE vs {field} ({others}, σ²={spec.sigma2:g}, δ={spec.delta:g}, {reps} reps/point)"
        )
        plot(path, field, values, curves, oracles[field], title)
        paths.append(path)
    return paths


def run_bench(spec: BenchSpec, console: Console | None = None) -> int:
    """Measure, print the table and the reproducing command, write the PNGs."""
    console = console or Console()
    start = time.perf_counter()
    console.print(
        "Measured: MSE of each estimator on hierarchical Gaussian data "
        f"θ_i ~ N(0, τ²={spec.tau2:g}), x_ij ~ N(θ_i, σ²={spec.sigma2:g}), "
        f"m={spec.clients} clients × n={spec.samples} samples, {spec.reps} repetitions "
        f"(seed {spec.seed}); σ² estimated; private EB at δ={spec.delta:g} with the default "
        "clip range [-10, 10]."
    )
    rows = measure(spec)
    print_table(table(spec, rows), console)
    console.print(FORMULAS)
    paths = write_plots(spec, console) if spec.plots else []
    for path in paths:
        console.print(f"wrote {path}")
    console.print(f"time: {time.perf_counter() - start:.1f} s")
    console.print(f"reproduce: {spec.command()}", soft_wrap=True, highlight=False)
    return 0


def add_simulation_arguments(p: argparse.ArgumentParser) -> None:
    """Options shared by `fedkin bench estimation` and `fedkin estimate --simulate`."""
    d = BenchSpec()
    p.add_argument(
        "--clients", type=int, default=d.clients, help=f"clients m (default {d.clients})"
    )
    p.add_argument(
        "--samples", type=int, default=d.samples, help=f"samples per client n (default {d.samples})"
    )
    p.add_argument(
        "--tau2",
        type=float,
        default=d.tau2,
        help=f"between-client variance τ² (default {d.tau2:g})",
    )
    p.add_argument("--reps", type=int, default=d.reps, help=f"repetitions (default {d.reps})")
    p.add_argument(
        "--epsilons",
        type=float,
        nargs="+",
        default=list(d.epsilons),
        metavar="EPS",
        help="ε values for private EB (default 0.1 1 10)",
    )
    p.add_argument("--no-plots", action="store_true", help="skip the sweeps and PNGs")


def spec_from_args(
    args: argparse.Namespace, *, sigma2: float, delta: float, seed: int, out: Path
) -> BenchSpec:
    return BenchSpec(
        clients=args.clients,
        samples=args.samples,
        tau2=args.tau2,
        sigma2=sigma2,
        reps=args.reps,
        epsilons=tuple(args.epsilons),
        delta=delta,
        seed=seed,
        out=out,
        plots=not args.no_plots,
    )


def register_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "estimation",
        help="personalized estimation: MSE of each method vs the Bayes-optimal closed form",
        description=(__doc__ or "").split("\n\n")[1],
    )
    add_simulation_arguments(p)
    d = BenchSpec()
    p.add_argument(
        "--sigma2",
        type=float,
        default=d.sigma2,
        help=f"within-client variance σ² (default {d.sigma2:g})",
    )
    p.add_argument("--delta", type=float, default=d.delta, help=f"δ (default {d.delta:g})")
    p.add_argument("--seed", type=int, default=d.seed, help="seed (default 0)")
    p.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help=f"directory for the PNGs (default {DEFAULT_OUT})",
    )
    p.set_defaults(
        func=lambda a: run_bench(
            spec_from_args(a, sigma2=a.sigma2, delta=a.delta, seed=a.seed, out=a.out)
        )
    )
