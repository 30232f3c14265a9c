"""The ``m2mpay`` command line. Each role's commands live with that role's agent.

Whatever ends a command ends here as one line on stderr, ``m2mpay: <command>: <what went
wrong>``, and a documented exit status (usage 2, policy refusal 3, bank or vendor refusal 4,
unreachable 5, internal 70, interrupted 130); ``--debug`` adds the traceback. A reader that goes
away (``m2mpay … | head``) ends the command quietly.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import traceback
from collections.abc import Sequence
from importlib import metadata

from .bank.cli import add_bank_commands
from .broker_cli import add_broker_commands
from .bench.cli import add_parser as add_bench_command
from .completion import add_completion_command
from .doctor import add_doctor_command
from .settings import add_config_command, apply_settings
from .user.cli import add_user_commands
from .vendor.cli import add_vendor_commands


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every role's sub-commands."""
    parser = argparse.ArgumentParser(prog="m2mpay", description="Anonymous hash-chain micropayments.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_broker_commands(commands)
    add_bank_commands(commands)
    add_vendor_commands(commands)
    add_user_commands(commands)
    demo = commands.add_parser("demo", help="run the whole system on this machine")
    demo.add_argument("--duration", type=float, default=30.0, help="seconds of scripted traffic")
    demo.set_defaults(handler=_demo)
    add_bench_command(commands)
    add_doctor_command(commands)
    add_completion_command(commands)
    add_config_command(commands)
    return parser


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args.duration)


def _version() -> str:
    try:
        return metadata.version("m2mpay")
    except metadata.PackageNotFoundError:  # run from a checkout that is not installed
        return "unknown"


def _describe(exc: BaseException) -> tuple[int, str]:
    """The exit status and the one line for an error that ended a command."""
    from .bank.sqlite import StoreError
    from .user.errors import EXIT, describe, exit_status

    if isinstance(exc, StoreError):
        cause = str(exc.__cause__).strip().splitlines()[0] if exc.__cause__ is not None else ""
        return EXIT["unreachable"], f"{exc} ({cause})" if cause else str(exc)
    if isinstance(exc, FileNotFoundError) and exc.filename:
        return EXIT["usage"], f"no such file: {exc.filename}"
    if type(exc).__name__ == "BrokerError":  # broker.launcher's, not imported: it is not always needed
        return EXIT["usage"], str(exc)
    if isinstance(exc, FileExistsError):
        return EXIT["usage"], str(exc)
    if isinstance(exc, PermissionError):
        return EXIT["usage"], f"permission denied: {exc.filename or exc}"
    if isinstance(exc, IsADirectoryError):
        return EXIT["usage"], f"a directory, where a file was expected: {exc.filename or exc}"
    return exit_status(exc), describe(exc)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``m2mpay`` console script."""
    args = build_parser().parse_args(argv)
    try:
        apply_settings(args)  # what the command line left out: environment, then the role's file
        status = int(args.handler(args))
        sys.stdout.flush()  # here, not at exit: a reader that went away is met inside this try
        return status
    except BrokenPipeError:
        # Nobody reads any more: say nothing, and keep Python's exit-time flush from failing too.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - the one place every error becomes a line and a status
        status, line = _describe(exc)
        print(f"m2mpay: {args.command}: {line}", file=sys.stderr)
        if args.debug or status == 70:  # a bug, not a user's mistake: keep what finds it
            traceback.print_exception(exc, file=sys.stderr)
        return status


if __name__ == "__main__":
    sys.exit(main())
