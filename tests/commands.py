"""Running the ``m2mpay`` command as a user does, and reading what it says: shared by the CLI tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

CLI = (sys.executable, "-m", "m2mpay.agents.cli")
"""The command line, as installed (``python -m`` so the test's environment is the one used)."""


def m2mpay(*args: str | Path | int, check: bool = True, cwd: Path | None = None,
           env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``m2mpay ARGS`` to its end; with ``check`` a non-zero exit fails the test, showing what it said."""
    result = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=cwd,
                            env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"m2mpay {args} failed: {result.stdout}{result.stderr}")
    return result


def one_line(stderr: str | subprocess.CompletedProcess[str]) -> str:
    """The one line a failed command prints (``m2mpay: ...``), failing the test on anything more."""
    text = stderr if isinstance(stderr, str) else stderr.stderr
    lines = text.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in text, text
    assert lines[0].startswith("m2mpay: "), text
    return lines[0]
