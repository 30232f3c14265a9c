"""``m2mpay`` commands left running, as an operator starts them: output to a log file, read while they run."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path
from typing import Any

from tests.commands import CLI
from tests.waiting import wait_until

__all__ = ["BROKER_REFUSED", "popen", "start", "stop", "wait_for_text"]

BROKER_REFUSED = ("refused the certificate {login}/{name}.crt ({why}): issue this device a certificate from the "
                  "broker's CA ('m2mpay broker pki add-client')")
"""The end of the one line a serving agent or a wallet prints when the broker refuses its login for
good (``{login}`` the login directory, ``{name}`` the certificate's name, ``{why}`` TLS's alert)."""


def popen(*args: str | Path, **options: Any) -> subprocess.Popen[str]:
    """Start ``m2mpay ARGS`` in the background, in text mode, with ``subprocess.Popen``'s ``options``."""
    process: subprocess.Popen[str] = subprocess.Popen([*CLI, *map(str, args)], text=True, **options)
    return process


def start(log: Path, *args: str | Path) -> subprocess.Popen[bytes]:
    """Start ``m2mpay ARGS`` in the background, its stdout and stderr going to ``log``."""
    with log.open("w") as sink:
        return subprocess.Popen([*CLI, *map(str, args)], stdout=sink, stderr=subprocess.STDOUT)


def stop(*processes: subprocess.Popen[bytes] | None) -> None:
    """Interrupt each process still running (as Ctrl-C does) and wait for it to end."""
    for process in processes:
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()  # fail the test, but leave no agent running behind it
                process.wait(5)
                raise


def wait_for_text(path: Path, text: str, seconds: float = 15.0) -> None:
    """Wait until ``text`` appears in the file ``path`` (a process's log); fail the test after ``seconds``."""
    wait_until(lambda: text in (path.read_text() if path.exists() else ""), timeout=seconds,
               what=f"{text!r} appears in {path}", poll=0.05)
