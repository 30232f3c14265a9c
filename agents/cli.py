"""The ``m2mpay`` command line. Each role's commands live with that role's agent."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .bank.cli import add_bank_commands, add_broker_commands
from .bench.cli import add_parser as add_bench_command
from .user.cli import add_user_commands
from .vendor.cli import add_vendor_commands


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every role's sub-commands."""
    parser = argparse.ArgumentParser(prog="m2mpay", description="Anonymous hash-chain micropayments.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_broker_commands(commands)
    add_bank_commands(commands)
    add_vendor_commands(commands)
    add_user_commands(commands)
    demo = commands.add_parser("demo", help="run the whole system on this machine")
    demo.add_argument("--duration", type=float, default=30.0, help="seconds of scripted traffic")
    demo.set_defaults(handler=_demo)
    add_bench_command(commands)
    return parser


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args.duration)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``m2mpay`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except (FileExistsError, FileNotFoundError, KeyError, ValueError) as exc:
        print(f"m2mpay: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
