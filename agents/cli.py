"""The ``m2mpay`` command line. Each role's commands live with that role's agent."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser; roles register their sub-commands here as they are built."""
    parser = argparse.ArgumentParser(prog="m2mpay", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser("demo", help="run the whole system on this machine")
    demo.add_argument("--duration", type=float, default=30.0, help="seconds of scripted traffic")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``m2mpay`` console script."""
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        print("m2mpay demo: not built yet (the protocol core is; agents come next)")
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
