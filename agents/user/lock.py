"""One process per wallet: an exclusive lock on ``wallet.lock`` in the wallet directory
(:class:`~m2mpay.agents.locks.DirectoryLock`).

Two processes paying from one wallet each see only the spending the other has already
committed, so together they could pass a budget that each alone respects. The lock is a
``flock`` on a file the kernel releases when the process ends however it ends (``kill -9``
included), so a crash never leaves a wallet locked. Reading commands (``user wallet``,
``user decisions``) take no lock: the database allows readers beside its one writer.
"""

from __future__ import annotations

from pathlib import Path

from ..locks import DirectoryBusy, DirectoryLock
from .errors import WalletBusy

__all__ = ["WalletLock"]


class WalletLock(DirectoryLock):
    """Held from construction until :meth:`release` (or the end of the process)."""

    def __init__(self, directory: Path) -> None:
        try:
            super().__init__(directory, "process", name="wallet.lock", rule="one process per wallet")
        except DirectoryBusy as exc:
            raise WalletBusy(str(exc)) from None
