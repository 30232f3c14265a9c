"""``m2mpay completion SHELL``: a completion script generated from the command's own parser.

shtab reads the same ``argparse`` tree as ``--help``, so the script knows every command and
option of the installed version and cannot drift from it. Options that take a file or a
directory complete paths.
"""

from __future__ import annotations

import argparse

__all__ = ["SHELLS", "add_completion_command"]

SHELLS = ("bash", "zsh", "tcsh")


def add_completion_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``completion bash|zsh|tcsh``."""
    parser = commands.add_parser("completion", help="print a shell completion script (see docs/CLI.md)")
    parser.add_argument("shell", choices=SHELLS, help="the shell to complete for")
    parser.set_defaults(handler=_completion)


def _completion(args: argparse.Namespace) -> int:
    import shtab  # only this command needs it

    from .cli import build_parser

    print(shtab.complete(build_parser(), shell=args.shell), end="")
    return 0
