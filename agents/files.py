"""Files that hold secrets: written whole, mode 0600, whatever the umask and whatever existed.

Writing into an existing file keeps that file's mode (a credentials file the operator created
world-readable would stay so) and a crash halfway leaves half a key. So a secret goes to a new
temporary file in the same directory, created 0600 (a umask can only take bits away), is synced,
and is renamed over the target: readers see the old file or the new one, never a mix, and the
target always has the new file's mode.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

__all__ = ["append_private", "create_private", "private_dir", "write_private"]


def private_dir(path: Path) -> None:
    """Create ``path`` (and its parents) if missing; a directory this creates is mode 0700."""
    if not path.is_dir():
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        path.chmod(0o700)  # mkdir's mode passes through the umask; make it exactly 0700


def _sync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_private(path: Path, data: bytes | str, *, exclusive: bool = False) -> None:
    """Write ``data`` to ``path`` atomically with mode 0600.

    With ``exclusive`` an existing ``path`` is never replaced (``FileExistsError``): a key file
    written twice would lose the first key.
    """
    raw = data.encode() if isinstance(data, str) else data
    private_dir(path.parent)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), 0o600)  # mkstemp's default, said explicitly
            handle.write(raw)
            handle.flush()
            os.fsync(handle.fileno())
        if exclusive:
            os.link(temporary, path)  # fails if path exists; atomic, unlike a check then a rename
        else:
            os.replace(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
    _sync_dir(path.parent)


def create_private(path: Path) -> None:
    """Create an empty ``path`` with mode 0600 if it does not exist (e.g. before a database opens
    it: SQLite gives its journal files the database file's mode)."""
    private_dir(path.parent)
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))


def append_private(path: Path, text: str) -> None:
    """Append ``text`` to ``path``, creating it with mode 0600."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "a") as handle:
        handle.write(text)
