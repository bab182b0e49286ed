"""`fedkin flower deploy|run`: a Flower deployment with printed commands (see
:mod:`fedkin.backends.flower_deploy`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedkin.core.errors import RunFailure

EPILOG = """example (two SuperNodes on loopback, TLS, each with its own data file):
  fedkin flower deploy deploy/ data.name=local-files data.num_clients=2 \\
      data.input_shape=[6] data.num_classes=3 cohort.clients_per_round=2 rounds=3 \\
      --node-data node0.npz --node-data node1.csv
  # run the printed SuperLink and SuperNode commands (or deploy/commands.sh), then:
  fedkin flower run deploy/"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "flower",
        help="deploy on Flower: app, TLS certificates, the exact commands; submit a run",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    what = p.add_subparsers(dest="what", metavar="deploy|run", required=True)
    d = what.add_parser(
        "deploy",
        help="write the Flower app, certificates and flwr config; print the commands",
        description="Validate the experiment, write DIR/app, DIR/certs (TLS), "
        "DIR/flwr-home/config.toml and DIR/commands.sh, and print the SuperLink, SuperNode and "
        "submit commands. Results are written to DIR/run on the SuperLink's host.",
    )
    d.add_argument("directory", type=Path, metavar="DIR", help="new deployment directory")
    d.add_argument("items", nargs="*", metavar="CONFIG.yaml | key=value")
    d.add_argument(
        "--host",
        action="append",
        dest="hosts",
        metavar="HOST",
        help="the SuperLink's name or IP as nodes reach it (repeatable: every name goes into "
        "the certificate; the first is used in the commands); default 127.0.0.1",
    )
    d.add_argument("--port", type=int, default=9093, help="SuperLink port (default 9093)")
    d.add_argument(
        "--node-port",
        type=int,
        default=9094,
        help="runtime API port of SuperNode 0; SuperNode i uses NODE_PORT+i (default 9094)",
    )
    d.add_argument(
        "--insecure", action="store_true", help="no TLS (loopback or a trusted network only)"
    )
    d.add_argument(
        "--node-data",
        action="append",
        default=[],
        metavar="PATH",
        help="with data.name=local-files: the data file (CSV, NPZ or image folder) of SuperNode "
        "0, 1, … in order, one per client, as a path on that node's host",
    )
    d.set_defaults(func=cmd_deploy)
    r = what.add_parser("run", help="submit the deployment's run; non-zero unless it finished")
    r.add_argument("directory", type=Path, metavar="DIR", help="a `fedkin flower deploy` directory")
    r.set_defaults(func=cmd_run)


def cmd_deploy(args: argparse.Namespace) -> int:
    from fedkin.backends.flower_deploy import deploy
    from fedkin.cli.run import split_items

    path, overrides = split_items(args.items)
    deployment = deploy(
        args.directory,
        path,
        overrides,
        args.hosts or ["127.0.0.1"],
        args.port,
        args.node_port,
        args.insecure,
        args.node_data,
    )
    print(deployment.instructions(), end="")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from fedkin.backends.flower_deploy import submit

    try:
        submit(args.directory)
    except RunFailure as err:
        print(f"fedkin: error: {err}", file=sys.stderr)
        return 1
    return 0
