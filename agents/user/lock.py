"""One process per wallet: an exclusive lock on ``wallet.lock`` in the wallet directory.

Two processes paying from one wallet each see only the spending the other has already
committed, so together they could pass a budget that each alone respects. The lock is a
``flock`` on a file the kernel releases when the process ends however it ends (``kill -9``
included), so a crash never leaves a wallet locked. Reading commands (``user wallet``,
``user decisions``) take no lock: the database allows readers beside its one writer.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from .errors import WalletBusy

__all__ = ["WalletLock"]


class WalletLock:
    """Held from construction until :meth:`release` (or the end of the process)."""

    def __init__(self, directory: Path) -> None:
        self._fd: int | None = os.open(directory / "wallet.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(self._fd)
            self._fd = None
            raise WalletBusy(f"wallet {directory} is in use by another process (pid {holder}); one process per "
                             "wallet") from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)  # only to name the holder to whoever waits

    def release(self) -> None:
        """Let another process have the wallet."""
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None
