"""`fedkin privacy`: plan a private run — ε for given noise, or noise for a target ε."""

from __future__ import annotations

import argparse

from rich.table import Table

from fedkin.display import print_table


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "privacy",
        help="privacy planning: epsilon for a noise multiplier, or the noise for a target epsilon",
        description="User-level DP accounting with dp-accounting (PLD and RDP side by side). "
        "Each round is a Gaussian mechanism on a Poisson-sampled cohort (probability q).",
    )
    what = p.add_subparsers(dest="what", metavar="epsilon|noise", required=True)
    for name, helptext in [
        ("epsilon", "ε spent by --rounds rounds at --noise"),
        ("noise", "smallest noise multiplier with ε <= --epsilon after --rounds rounds"),
    ]:
        q = what.add_parser(name, help=helptext)
        q.add_argument("--q", type=float, required=True, help="client sampling probability")
        q.add_argument("--rounds", type=int, required=True, help="number of rounds")
        q.add_argument("--delta", type=float, default=1e-5, help="δ (default 1e-5)")
        if name == "epsilon":
            q.add_argument("--noise", type=float, required=True, help="noise multiplier z")
        else:
            q.add_argument("--epsilon", type=float, required=True, help="target ε")
        q.set_defaults(func=cmd_privacy)


def cmd_privacy(args: argparse.Namespace) -> int:
    from fedkin.core.errors import UserError
    from fedkin.privacy.accountant import (
        PrivacyAccountant,
        PrivacyEvent,
        calibrate_noise_multiplier,
    )

    if not 0 < args.q <= 1:
        raise UserError(f"--q must be in (0, 1], got {args.q}")
    if args.rounds < 1:
        raise UserError(f"--rounds must be >= 1, got {args.rounds}")
    if not 0 < args.delta < 1:
        raise UserError(f"--delta must be in (0, 1), got {args.delta}")
    q = None if args.q == 1 else args.q
    table = Table(title=f"q={args.q:g}, rounds={args.rounds}, δ={args.delta:g}")
    if args.what == "epsilon":
        if args.noise <= 0:
            raise UserError(f"--noise must be > 0, got {args.noise}")
        table.add_column("accountant")
        table.add_column("ε", justify="right")
        for kind in ("pld", "rdp"):
            acc = PrivacyAccountant(kind)
            acc.record(PrivacyEvent.gaussian(args.noise, sampling_prob=q, count=args.rounds))
            table.add_row(kind, f"{acc.epsilon(args.delta):.6g}")
    else:
        if args.epsilon <= 0:
            raise UserError(f"--epsilon must be > 0, got {args.epsilon}")
        table.add_column("accountant")
        table.add_column("noise multiplier z", justify="right")
        for kind in ("pld", "rdp"):
            z = calibrate_noise_multiplier(args.epsilon, args.delta, args.q, args.rounds, kind)
            table.add_row(kind, f"{z:.6g}")
    print_table(table)
    return 0
