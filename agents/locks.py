"""One process per data directory: an exclusive ``flock`` on a lock file in it.

Two bank (or vendor) processes on one data directory would each believe they own its keys,
sweeps and outbox. The kernel releases a ``flock`` when the process ends however it ends (``kill
-9`` included), so a crash never leaves a directory locked. The file names the holder's pid, only
to tell whoever finds it taken.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

__all__ = ["DirectoryBusy", "DirectoryLock"]


class DirectoryBusy(ValueError):
    """Another process holds the directory (a usage error: exit 2)."""


class DirectoryLock:
    """Held from construction until :meth:`release` or the end of the process (not inherited)."""

    def __init__(self, directory: Path, what: str, name: str = "serve.lock", *,
                 rule: str = "one process per data directory") -> None:
        self._fd: int | None = os.open(directory / name, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(self._fd)
            self._fd = None
            raise DirectoryBusy(f"{directory} is in use by another {what} (pid {holder}): {rule}") from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        """Let another process have the directory."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
