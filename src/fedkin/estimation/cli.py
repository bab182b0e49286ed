"""`fedkin estimate`: personalized estimates from a CSV of samples, optionally with user-level DP.

Reads ``client,value`` rows (:mod:`fedkin.estimation.io`), runs :func:`fedkin.estimation.api.
estimate`, writes one row per client, and prints the fitted population, every fallback taken
and, when private, the (ε, δ) the accountant reports. ``--simulate`` runs the estimation
benchmark instead (:mod:`fedkin.estimation.bench`).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from fedkin.core.errors import UserError
from fedkin.core.rng import Stream
from fedkin.estimation.api import METHODS, EstimationResult, estimate
from fedkin.estimation.bench import DEFAULT_OUT, add_simulation_arguments, run_bench, spec_from_args
from fedkin.estimation.io import read_samples_csv, write_estimates_csv
from fedkin.estimation.private import PrivacyConfig

DEFAULT_DELTA = 1e-6

EPILOG = """examples:
  fedkin estimate data.csv --out est.csv
  fedkin estimate data.csv --out est.csv --method james-stein --sigma2 4
  fedkin estimate data.csv --out est.csv --epsilon 1 --delta 1e-6 --clip-range 0 100
  fedkin estimate --simulate                 (same as: fedkin bench estimation)

data.csv has a header with 'client' and 'value' (or 'value_a', 'value_b', … for vectors)
and one row per sample. Model: θ_i ~ N(μ, τ²), x_ij ~ N(θ_i, σ²); the empirical-Bayes
estimate is the posterior mean with μ, τ² (and σ² unless --sigma2) estimated from all
clients. 0/1 data use a Beta–Bernoulli model (auto-detected)."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "estimate",
        help="personalized estimates per client (empirical Bayes, optionally private)",
        description="Estimate each client's own quantity, borrowing strength from the others.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("data", nargs="?", type=Path, metavar="DATA.csv", help="samples: client,value")
    p.add_argument(
        "--out", type=Path, metavar="EST.csv", help="output CSV (with --simulate: PNG directory)"
    )
    p.add_argument(
        "--method",
        choices=METHODS,
        default="empirical-bayes",
        help="estimator (default empirical-bayes)",
    )
    p.add_argument(
        "--family",
        choices=("auto", "gaussian", "bernoulli"),
        default="auto",
        help="data model (default auto: bernoulli when every value is 0 or 1)",
    )
    p.add_argument(
        "--sigma2",
        type=float,
        help="known within-client variance σ² (default: pooled from the data); "
        "with --simulate, the σ² of the simulated data (default 4)",
    )
    p.add_argument(
        "--per-coordinate",
        action="store_true",
        help="vector data: fit τ², σ² per coordinate (default: shared, isotropic)",
    )
    priv = p.add_argument_group("privacy (user-level differential privacy)")
    priv.add_argument("--epsilon", type=float, help="privacy budget ε > 0 (enables DP)")
    priv.add_argument(
        "--delta", type=float, help=f"δ in (0, 1) (default {DEFAULT_DELTA:g}; keep it << 1/clients)"
    )
    clip = priv.add_mutually_exclusive_group()
    clip.add_argument(
        "--clip-range",
        type=float,
        nargs=2,
        metavar=("LO", "HI"),
        help="public range of the values; client means are clamped into it "
        "(default 0 1 for 0/1 data, -10 10 otherwise)",
    )
    clip.add_argument(
        "--clip-range-from-data",
        action="store_true",
        help="read the range from the data (leaks; voids the guarantee)",
    )
    priv.add_argument(
        "--accountant",
        choices=("pld", "rdp"),
        default="pld",
        help="dp-accounting backend (default pld)",
    )
    p.add_argument(
        "--seed",
        type=int,
        help="seed for the privacy noise (default: secret); with --simulate, the "
        "simulation seed (default 0)",
    )
    sim = p.add_argument_group("simulation (--simulate)")
    sim.add_argument(
        "--simulate",
        action="store_true",
        help="benchmark the methods on simulated data instead of reading DATA.csv",
    )
    add_simulation_arguments(sim)
    p.set_defaults(func=cmd_estimate)


def cmd_estimate(args: argparse.Namespace) -> int:
    if args.simulate:
        return _simulate(args)
    if args.data is None:
        raise UserError("give DATA.csv (columns client,value) or --simulate")
    if args.out is None:
        raise UserError("--out EST.csv is required (where to write the estimates)")
    privacy = _privacy(args)
    data = read_samples_csv(args.data)
    generator = None
    if privacy is not None and args.seed is not None:
        _warn(
            "--seed makes the privacy noise reproducible; anyone who knows the seed can "
            "remove it (use it for testing only)"
        )
        generator = Stream(args.seed).child("dp-noise").generator()
    if privacy is not None and privacy.delta >= 1 / data.m:
        _warn(f"δ={privacy.delta:g} is not much smaller than 1/clients = {1 / data.m:.3g}")
    result = estimate(
        data,
        method=args.method,
        family=args.family,
        sigma2=args.sigma2,
        pooled=not args.per_coordinate,
        privacy=privacy,
        generator=generator,
    )
    write_estimates_csv(args.out, result)
    _summary(result, args.out)
    return 0


def _privacy(args: argparse.Namespace) -> PrivacyConfig | None:
    if args.epsilon is None:
        for flag, value in (
            ("--delta", args.delta),
            ("--clip-range", args.clip_range),
            ("--clip-range-from-data", args.clip_range_from_data or None),
        ):
            if value is not None:
                raise UserError(f"{flag} needs --epsilon (privacy is off without it)")
        return None
    if not (math.isfinite(args.epsilon) and args.epsilon > 0):
        raise UserError(f"--epsilon must be a number > 0, got {args.epsilon:g}")
    delta = DEFAULT_DELTA if args.delta is None else args.delta
    if not 0 < delta < 1:
        raise UserError(f"--delta must be in (0, 1), got {delta:g}")
    clip = (
        "data"
        if args.clip_range_from_data
        else (None if args.clip_range is None else tuple(args.clip_range))
    )
    return PrivacyConfig(args.epsilon, delta, clip, args.accountant)


def _simulate(args: argparse.Namespace) -> int:
    if args.data is not None:
        raise UserError("--simulate generates its own data: drop DATA.csv")
    if args.epsilon is not None:
        raise UserError("with --simulate, give privacy levels as --epsilons EPS [EPS …]")
    spec = spec_from_args(
        args,
        sigma2=4.0 if args.sigma2 is None else args.sigma2,
        delta=DEFAULT_DELTA if args.delta is None else args.delta,
        seed=0 if args.seed is None else args.seed,
        out=DEFAULT_OUT if args.out is None else args.out,
    )
    return run_bench(spec)


def _warn(message: str) -> None:
    print(f"fedkin: warning: {message}", file=sys.stderr)


def _fmt(values: list[float]) -> str:
    text = ", ".join(f"{v:.4g}" for v in values)
    return text if len(values) == 1 else f"[{text}]"


def _summary(result: EstimationResult, out: Path) -> None:
    how = (
        "auto-detected: every value is 0 or 1"
        if result.family == "bernoulli"
        else "auto-detected: not all values are 0 or 1"
    )
    family = f"{result.family} ({how})" if result.family_detected else result.family
    print(f"family: {family}")
    print(
        f"method: {result.method}; {len(result.clients)} clients, "
        f"{int(result.counts.sum())} samples, {len(result.columns)} coordinate(s)"
    )
    if result.hyper:
        print("population: " + "; ".join(f"{k} = {_fmt(v)}" for k, v in result.hyper.items()))
    for note in result.notes:
        if note.startswith("warning: "):
            _warn(note.removeprefix("warning: "))
        else:
            print(f"note: {note}")
    report = result.privacy
    if report is not None:
        acc = report.accountant
        releases = ", ".join(
            f"{e.label.removeprefix('estimation: ')} (z={e.noise_multiplier:.4g})"
            for e in acc.ledger
        )
        print(
            f"privacy: spent ε = {report.epsilon_spent:.4f} at δ = {report.delta:g} "
            f"(requested ε = {report.epsilon:g}; {acc.kind.upper()} accountant, dp-accounting)"
        )
        pairs = zip(report.clip_low, report.clip_high, strict=True)
        ranges = ", ".join(dict.fromkeys(f"[{lo:.4g}, {hi:.4g}]" for lo, hi in pairs))
        print(
            f"privacy: releases {releases}; equivalent single Gaussian z = "
            f"{report.noise_multiplier:.4g}; clip range {ranges}"
        )
    print(f"wrote {out}")
