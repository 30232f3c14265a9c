"""The wallet seed and its counters, in the wallet's database (docs/LIFECYCLE.md).

Every coin secret, message randomizer and blinding factor a seeded wallet uses is derived from
its seed and a counter per keyset (:mod:`m2mpay.protocol.seed`). A counter is reserved durably
*before* the request that uses it leaves, so two requests never share one, also across a crash;
a request the bank refused gives its counters back when nothing was reserved after it, which
keeps the runs of unused counters short (restore stops after a run of them,
:data:`~m2mpay.agents.user.restore.RESTORE_GAP`). A wallet created before seeds existed has
none: its coins stay random, and ``user init`` gives it one for the coins to come.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from contextlib import AbstractContextManager

from m2mpay.protocol.messages import KeysetInfo
from m2mpay.protocol.rules import wallet
from m2mpay.protocol.rules.keyring import COIN_VARIANT, Keyring
from m2mpay.protocol.seed import EXCHANGE_COUNTERS, MAX_COUNTER, DerivedCoin, WalletSeed, derive_coin

__all__ = ["SCHEMA", "SeedBook", "SeedMismatch"]

_EXCHANGES = "*exchanges"
"""The counters row of the wallet's exchange numbers (no keyset id has a ``*``)."""

SCHEMA = """
CREATE TABLE IF NOT EXISTS seed (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    secret BLOB NOT NULL,          -- secret: every seeded coin derives from it
    shown INTEGER NOT NULL         -- 1 once the user was shown it (user init, user restore)
);
CREATE TABLE IF NOT EXISTS counters (
    keyset TEXT PRIMARY KEY,
    next INTEGER NOT NULL          -- the first counter of this keyset never reserved
);
"""


class SeedMismatch(Exception):
    """The wallet already has another seed."""


class SeedBook:
    """The seed and the counters of one wallet database (the connection is the store's)."""

    def __init__(self, db: sqlite3.Connection, transaction: Callable[[], AbstractContextManager[None]]) -> None:
        self._db = db
        self._transaction = transaction
        """The store's own transactions (``BEGIN IMMEDIATE`` … ``COMMIT``)."""
        self._db.executescript(SCHEMA)

    def seed(self) -> WalletSeed | None:
        """The wallet's seed, ``None`` for a wallet made before seeds."""
        row = self._db.execute("SELECT secret FROM seed WHERE id = 1").fetchone()
        return None if row is None else WalletSeed(bytes(row[0]))

    def unshown(self) -> WalletSeed | None:
        """The seed if the user was never shown it (a wallet a withdrawal created), else ``None``."""
        row = self._db.execute("SELECT secret FROM seed WHERE id = 1 AND shown = 0").fetchone()
        return None if row is None else WalletSeed(bytes(row[0]))

    def mark_shown(self) -> None:
        """The user has been shown the seed: it is not shown again."""
        with self._transaction():
            self._db.execute("UPDATE seed SET shown = 1 WHERE id = 1")

    def put_seed(self, seed: WalletSeed, *, shown: bool = False) -> bool:
        """Keep ``seed``; ``True`` if it was new here, ``False`` if the wallet had it already.

        :class:`SeedMismatch` if the wallet has another one: a seed is never replaced (the coins
        derived from it would become unrestorable).
        """
        with self._transaction():
            row = self._db.execute("SELECT secret FROM seed WHERE id = 1").fetchone()
            if row is not None:
                if WalletSeed(bytes(row[0])) != seed:
                    raise SeedMismatch("this wallet has another seed")
                return False
            self._db.execute("INSERT INTO seed (id, secret, shown) VALUES (1, ?, ?)", (seed.secret, int(shown)))
            return True

    def _next(self, keyset: str) -> int:
        row = self._db.execute("SELECT next FROM counters WHERE keyset = ?", (keyset,)).fetchone()
        return 0 if row is None else int(row[0])

    def _set(self, keyset: str, value: int) -> None:
        self._db.execute("INSERT INTO counters (keyset, next) VALUES (?, ?)"
                         " ON CONFLICT(keyset) DO UPDATE SET next = excluded.next", (keyset, value))

    def reserve(self, keyset: str, count: int) -> int:
        """Reserve ``count`` counters of ``keyset``; the first one (committed before it returns)."""
        if count < 1:
            raise ValueError("reserve at least one counter")
        with self._transaction():
            first = self._next(keyset)
            limit = EXCHANGE_COUNTERS - 1 if keyset != _EXCHANGES else MAX_COUNTER - EXCHANGE_COUNTERS
            if first + count - 1 > limit:
                raise OverflowError(f"keyset {keyset}: no counters left")
            self._set(keyset, first + count)
            return first

    def release(self, keyset: str, first: int, count: int) -> bool:
        """Give back counters ``first .. first + count - 1`` of a request the bank refused (it signed
        none of them) if they are the last reserved; whether they were given back."""
        with self._transaction():
            if self._next(keyset) != first + count:
                return False
            self._set(keyset, first)
            return True

    def advance(self, keyset: str, past: int) -> None:
        """Never reserve below ``past`` again (a restore found coins up to ``past - 1``)."""
        with self._transaction():
            if self._next(keyset) < past:
                self._set(keyset, past)

    def counters(self) -> dict[str, int]:
        """The next counter of each keyset used so far."""
        return {str(k): int(v) for k, v in self._db.execute("SELECT keyset, next FROM counters")}

    def withdrawal(self, seed: WalletSeed, account: str, info: KeysetInfo, keyring: Keyring,
                   count: int) -> tuple[wallet.PendingWithdrawal, int]:
        """A withdrawal of ``count`` coins derived from ``seed`` at freshly reserved counters, and
        the first counter (to :meth:`release` them if the bank refuses it)."""
        first = self.reserve(info.id, count)
        coins = wallet.derive_coins(seed, info, keyring.rsa_keys[info.id], first, count)
        return wallet.pending_withdrawal(account, info, coins, os.urandom(16)), first

    def exchange_number(self) -> int:
        """Reserve the wallet's next exchange number (committed before it returns)."""
        return self.reserve(_EXCHANGES, 1)

    def release_exchange(self, number: int) -> bool:
        """Give back an exchange number the bank refused, if it is the last reserved."""
        return self.release(_EXCHANGES, number, 1)

    def restored_exchanges(self, past: int) -> None:
        """Never reserve an exchange number below ``past`` again (a restore found them used)."""
        self.advance(_EXCHANGES, past)

    @staticmethod
    def deriver(seed: WalletSeed, keyring: Keyring, number: int) -> Callable[[KeysetInfo], DerivedCoin]:
        """Derives exchange ``number``'s change slot of a keyset from ``seed``."""
        def derive(info: KeysetInfo) -> DerivedCoin:
            return derive_coin(seed, info, keyring.rsa_keys[info.id], EXCHANGE_COUNTERS + number, COIN_VARIANT)
        return derive
