"""``bank serve --workers N``: N processes, each with its own event loop, database connection and
MQTT session, sharing the requests through the broker's shared subscription.

One Python process answers on one core (the GIL); a bank's work per request is signature checks,
sealing and its database transaction, so more cores need more processes. The first process also
sweeps lapsed blocks and serves the metrics; it starts the others, starts one again when it dies
(with a growing pause), and stops them all when it is stopped. A worker whose parent is gone stops
by itself, so a ``kill -9`` of the first leaves no orphans. Money stays correct whatever the
split: every request is one transaction that locks what it changes (SQLite's single writer, or
row locks on PostgreSQL), and answers are stored by request id, so a retry that lands on another
worker gets the same answer.

Behind a TLS broker each worker logs in with its own certificate (:func:`worker_login`: ``bank``,
``bank-2``, ``bank-3`` …): the broker takes a certificate's name as the client id, and a second
login under one id takes the first one's session over, so workers sharing a certificate would
push each other off the broker in turn. :func:`check_logins` finds a missing one before any
process starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from m2mpay.broker.pki import bank_logins

__all__ = ["check_logins", "orphan_watch", "run_workers", "stop_on_sigterm", "worker_login"]

log = logging.getLogger(__name__)


def worker_login(index: int, first: int = 1) -> str:
    """The certificate name of worker ``index`` (0 is the first process) on a machine whose first
    worker is number ``first``: ``bank``, ``bank-2`` … from 1; ``bank-5``, ``bank-6`` … from 5."""
    return bank_logins(first + index)[-1]


def check_logins(directory: Path, count: int, first: int = 1) -> None:
    """Raise :class:`ValueError` naming the first worker certificate or key missing from ``directory``."""
    names = bank_logins(first + count - 1)[first - 1:]
    command = f"--workers {count}" + (f" --first-worker {first}" if first != 1 else "")
    for name in names:
        for suffix in (".crt", ".key"):
            if not (directory / f"{name}{suffix}").is_file():
                missing = name if suffix == ".crt" else f"{name}.key"
                issue = f"m2mpay broker pki add-client {name} --role bank --dir"
                if (directory / "ca.key").is_file():  # the PKI itself: issued right here
                    hint = f"{issue} {directory}"
                else:  # a copy of the logins (the systemd unit's): the CA's key is elsewhere
                    hint = (f"issue it where the broker's PKI is kept: {issue} PKI; then copy {name}.crt and "
                            f"{name}.key here, or, for the systemd unit, run deploy/pi/install.sh again: "
                            "docs/OPERATOR.md")
                raise ValueError(f"{command} needs certificates {', '.join(names)} in {directory}: "
                                 f"{missing} missing ({hint})")


async def _keep_running(argv: Sequence[str], index: int) -> None:
    """Run one worker process, starting it again whenever it exits, until cancelled."""
    pause = 0.5
    while True:
        process = await asyncio.create_subprocess_exec(sys.executable, "-m", "m2mpay.agents.cli", *argv,
                                                       "--worker-index", str(index), "--parent-pid", str(os.getpid()))
        try:
            code = await process.wait()
        except asyncio.CancelledError:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
            with contextlib.suppress(asyncio.TimeoutError, ProcessLookupError):
                await asyncio.wait_for(process.wait(), 10)
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
            raise
        log.warning("bank worker %d exited with %s; starting it again in %.1f s", index, code, pause)
        await asyncio.sleep(pause)
        pause = min(pause * 2, 30.0)


@contextlib.asynccontextmanager
async def run_workers(argv: Sequence[str], count: int) -> AsyncIterator[None]:
    """Keep ``count`` worker processes (``bank serve`` with ``argv``) running while inside."""
    tasks = [asyncio.create_task(_keep_running(argv, i), name=f"bank-worker-{i}") for i in range(1, count)]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def orphan_watch(parent: int, interval: float = 1.0) -> None:
    """Return when ``parent``, the first bank process, is no longer this worker's parent.

    The parent's pid comes on the command line: a parent killed while this worker was still
    starting would otherwise go unnoticed.
    """
    while os.getppid() == parent:  # noqa: ASYNC110 - no event tells a process its parent changed
        await asyncio.sleep(interval)
    log.warning("the first bank process is gone; this worker stops")


def stop_on_sigterm(task: asyncio.Task[None]) -> None:
    """SIGTERM (systemd, the first process) ends ``task`` as Ctrl-C would, so cleanup runs.

    The first one is enough: later ones are ignored while the process stops (a shell's ``kill``
    and then its exit trap send two). Otherwise one could land as asyncio closes its loop, when
    the loop's wakeup pipe is closed and its handler not yet removed (CPython then prints a
    traceback), or after, and end the cleanup half-way.
    """
    loop = asyncio.get_running_loop()

    def stop() -> None:
        loop.remove_signal_handler(signal.SIGTERM)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        task.cancel()

    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGTERM, stop)
