"""The wallet's durable store: coins with their secrets, spending, withdrawals and receipts.

The file is created with mode 0600: it holds every coin's seed and traversal state. The wallet
writes ahead: :meth:`WalletStore.save` commits a coin's new position *and the money it moves*
(one transaction, synchronous=FULL) before the agent lets the matching token leave the device, so
the spending the policy sees is exactly what left the wallet, receipt or not. A withdrawal is
stored with its blinding secrets, the exact signed request and its value *before* it is sent, so
after a crash it is sent again byte for byte (the bank answers from its store and debits once),
and the daily refill cap counts it whatever happens to the process. A vendor's signed final
receipt is kept with the coin's closing (one transaction), with the certificate that names its key.
The keysets' phase records followed from the bank's announcements are kept too, so a later
announcement can never take back a redeem window once announced.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from m2mpay.protocol import cbor, cose
from m2mpay.protocol.messages import Coin, FinalReceipt, KeysetPhase, WithdrawRequest
from m2mpay.protocol.messages.exchange import ExchangeRequest
from m2mpay.protocol.rules.wallet import CoinStatus, PendingWithdrawal, WalletCoin

from ..policy.engine import Spend
from .errors import NoWallet
from .exchange import PendingExchange
from .seeds import SeedBook

__all__ = ["DATABASE", "KeptReceipt", "WalletStore", "require_wallet"]

DATABASE = "wallet.sqlite3"
"""The wallet's database in its directory: a directory without it holds no wallet."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS coins (
    tip BLOB PRIMARY KEY,
    coin BLOB NOT NULL,            -- the public coin, CBOR
    n INTEGER NOT NULL,
    token_value INTEGER NOT NULL,
    position INTEGER NOT NULL,
    seed BLOB NOT NULL,            -- secret
    traversal BLOB NOT NULL,       -- secret: CBOR of the traversal state
    status TEXT NOT NULL,
    blocked_until INTEGER NOT NULL,
    vendors TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS withdrawals (
    req_id BLOB PRIMARY KEY,
    signed BLOB NOT NULL,          -- the exact request bytes, resent after a crash
    pending BLOB NOT NULL,         -- secret: seeds, prefixes, blinding secrets
    created INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS spends (
    id INTEGER PRIMARY KEY,
    ts INTEGER NOT NULL,
    vendor TEXT NOT NULL,
    category TEXT NOT NULL,
    amount INTEGER NOT NULL        -- minor units: tokens written ahead times their coin's token value
);
CREATE INDEX IF NOT EXISTS spends_ts ON spends (ts);
CREATE TABLE IF NOT EXISTS imported (
    source TEXT PRIMARY KEY        -- spending imported from an older wallet's file, once
);
CREATE TABLE IF NOT EXISTS withdrawn (
    req_id BLOB PRIMARY KEY,
    ts INTEGER NOT NULL,
    value INTEGER NOT NULL         -- minor units asked for; kept unless the bank refused the request
);
CREATE TABLE IF NOT EXISTS exchanges (
    tip BLOB PRIMARY KEY,          -- the coin being exchanged: not paid with meanwhile
    request BLOB NOT NULL,         -- the exact request bytes, resent until an answer comes
    pending BLOB NOT NULL,         -- secret: seeds, prefixes, blinding secrets of the coins to be
    created INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS phases (
    keyset TEXT PRIMARY KEY,
    record BLOB NOT NULL           -- the KeysetPhase followed from the bank's announcements, CBOR
);
CREATE TABLE IF NOT EXISTS receipts (
    session BLOB PRIMARY KEY,
    pending INTEGER NOT NULL,      -- 1 until the vendor's final receipt replaces it
    signed BLOB NOT NULL,          -- the vendor's COSE_Sign1 of the FinalReceipt, as received
    cert BLOB NOT NULL,            -- the vendor certificate whose key signed it
    address TEXT NOT NULL,         -- where the vendor answered (coap://...): a pending one is asked again there
    ts INTEGER NOT NULL            -- when the vendor signed it (Unix seconds): the listing's order
);
"""


@dataclass(frozen=True, slots=True)
class KeptReceipt:
    """A vendor's final receipt, verified when it came, with what proves it to anyone else."""

    receipt: FinalReceipt
    signed: bytes
    """The COSE_Sign1 the vendor answered the close with."""
    cert: bytes
    """The vendor certificate (COSE_Sign1 by the bank CA) whose key signed it."""
    address: str
    """Where the vendor answered the close (``coap://host:port``): a pending receipt is asked again there."""
_STATE_LIMIT = 1 << 20


def require_wallet(directory: Path, *, database: bool = True) -> None:
    """Raise :class:`~m2mpay.agents.user.errors.NoWallet` unless ``directory`` holds a wallet's
    database (without ``database``: unless it is a directory, for what reads only the decision
    log); creates nothing (only the commands that write a wallet create one)."""
    if not (directory / DATABASE).is_file() if database else not directory.is_dir():
        raise NoWallet(directory)


class WalletStore:
    """One wallet directory's SQLite database."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = directory / DATABASE
        if not path.exists():
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self.seeds = SeedBook(self._db, self._transaction)
        """The wallet seed and its counters."""

    def close(self) -> None:
        """Close the database."""
        self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # --- coins -----------------------------------------------------------------------------
    def save(self, wc: WalletCoin, vendors: frozenset[str] = frozenset(), spend: Spend | None = None, *,
             receipt: KeptReceipt | None = None) -> None:
        """Commit a coin's state, the money its new position moved and the receipt that closed it,
        in one transaction.

        Call it before any token it covers leaves the device: a token is counted as spent from
        the moment it may leave, whether or not a receipt ever comes back.
        """
        with self._transaction():
            self._save(wc, vendors)
            if spend is not None:
                self._db.execute("INSERT INTO spends (ts, vendor, category, amount) VALUES (?, ?, ?, ?)",
                                 (spend.ts, spend.vendor, spend.category, spend.amount))
            if receipt is not None:
                self._keep(receipt)

    def _save(self, wc: WalletCoin, vendors: frozenset[str]) -> None:
        self._db.execute(
            "INSERT INTO coins (tip, coin, n, token_value, position, seed, traversal, status, blocked_until, vendors)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(tip) DO UPDATE SET position = excluded.position,"
            " traversal = excluded.traversal, status = excluded.status, blocked_until = excluded.blocked_until,"
            " vendors = CASE WHEN excluded.vendors = '' THEN coins.vendors ELSE excluded.vendors END"
            " WHERE excluded.position <= coins.position",  # never move a coin back up its chain
            (wc.coin.tip, wc.coin.encode(), wc.n, wc.token_value, wc.position, wc.seed,
             cbor.encode(wc.traversal), wc.status.value, wc.blocked_until, ",".join(sorted(vendors))))

    def coins(self) -> list[tuple[WalletCoin, frozenset[str]]]:
        """Every coin, with the vendors it was shown to."""
        rows = self._db.execute("SELECT coin, n, token_value, position, seed, traversal, status, blocked_until,"
                                " vendors FROM coins ORDER BY rowid").fetchall()
        return [(_coin(row), frozenset(v for v in row[8].split(",") if v)) for row in rows]

    def coin(self, tip: bytes) -> WalletCoin | None:
        """One coin by its tip."""
        row = self._db.execute("SELECT coin, n, token_value, position, seed, traversal, status, blocked_until,"
                               " vendors FROM coins WHERE tip = ?", (tip,)).fetchone()
        return None if row is None else _coin(row)

    # --- spending --------------------------------------------------------------------------
    def spends(self, since: int = 0) -> list[Spend]:
        """Money that left the wallet at or after ``since``, oldest first."""
        rows = self._db.execute("SELECT ts, vendor, category, amount FROM spends WHERE ts >= ? ORDER BY id",
                                (since,)).fetchall()
        return [Spend(ts=int(r[0]), vendor=str(r[1]), category=str(r[2]), amount=int(r[3])) for r in rows]

    def import_spends(self, spends: Iterable[Spend], *, source: str) -> None:
        """Add spending kept elsewhere before (an older wallet's log), once per ``source``."""
        with self._transaction():
            if self._db.execute("SELECT 1 FROM imported WHERE source = ?", (source,)).fetchone():
                return  # imported already; a crash came before the file was moved aside
            self._db.execute("INSERT INTO imported VALUES (?)", (source,))
            self._db.executemany("INSERT INTO spends (ts, vendor, category, amount) VALUES (?, ?, ?, ?)",
                                 [(s.ts, s.vendor, s.category, s.amount) for s in spends])

    # --- exchanges -------------------------------------------------------------------------
    def begin_exchange(self, pending: PendingExchange, now: int) -> None:
        """Keep an exchange's secrets and exact bytes before it is sent; its coin is not paid with
        until it ends."""
        with self._transaction():
            self._db.execute("INSERT INTO exchanges VALUES (?, ?, ?, ?)",
                             (pending.request.coin.tip, pending.data, _exchange_secrets(pending), now))

    def pending_exchanges(self) -> list[PendingExchange]:
        """Exchanges sent (or about to be) whose answer has not been kept, oldest first."""
        out = []
        for request, blob in self._db.execute("SELECT request, pending FROM exchanges ORDER BY created").fetchall():
            data: dict[str, Any] = cbor.decode(bytes(blob), max_size=_STATE_LIMIT)
            out.append(PendingExchange(request=ExchangeRequest.decode(bytes(request)), seeds=tuple(data["seeds"]),
                                       prefixes=tuple(data["prefixes"]), secrets=tuple(data["secrets"])))
        return out

    def exchanging(self) -> frozenset[bytes]:
        """Tips of the coins in an exchange."""
        return frozenset(bytes(r[0]) for r in self._db.execute("SELECT tip FROM exchanges"))

    def finish_exchange(self, old: WalletCoin, coins: list[WalletCoin]) -> None:
        """Keep the fresh coins, mark the exchanged one spent and forget the secrets, in one transaction."""
        spent = WalletCoin(coin=old.coin, n=old.n, token_value=old.token_value, position=0, seed=old.seed,
                           traversal=old.traversal, status=CoinStatus.SPENT)
        with self._transaction():
            for wc in coins:
                self._save(wc, frozenset())
            self._save(spent, frozenset())
            self._db.execute("DELETE FROM exchanges WHERE tip = ?", (old.coin.tip,))

    def restore_coin(self, wc: WalletCoin, pending: PendingExchange, now: int) -> None:
        """Keep a coin a restore found, with the exchange that learns its remainder, in one
        transaction: it is never paid with before the bank said what is left of it."""
        with self._transaction():
            self._save(wc, frozenset())
            self._db.execute("INSERT INTO exchanges VALUES (?, ?, ?, ?)",
                             (pending.request.coin.tip, pending.data, _exchange_secrets(pending), now))

    def drop_exchange(self, tip: bytes, *, spent: WalletCoin | None = None) -> None:
        """Forget an exchange the bank refused (nothing changed there); with ``spent``, the bank
        said the coin has nothing left: it is kept as spent."""
        with self._transaction():
            if spent is not None:
                self._save(spent, frozenset())
            self._db.execute("DELETE FROM exchanges WHERE tip = ?", (tip,))

    # --- keyset phases ---------------------------------------------------------------------
    def phases(self) -> dict[str, KeysetPhase]:
        """The keysets' phase records as followed so far (never moved back), by keyset id."""
        return {str(k): KeysetPhase.decode(bytes(r)) for k, r in self._db.execute("SELECT keyset, record FROM phases")}

    def put_phases(self, phases: Mapping[str, KeysetPhase]) -> None:
        """Keep the records followed from a fresh announcement (those of keysets it no longer
        lists go: they are closed)."""
        with self._transaction():
            self._db.execute("DELETE FROM phases")
            self._db.executemany("INSERT INTO phases VALUES (?, ?)", [(k, r.encode()) for k, r in phases.items()])

    # --- receipts --------------------------------------------------------------------------
    def keep_receipt(self, receipt: KeptReceipt) -> None:
        """Keep a verified receipt (a pending one, when the coin does not change with it)."""
        with self._transaction():
            self._keep(receipt)

    def _keep(self, kept: KeptReceipt) -> None:
        # A final receipt replaces a pending one of the same session; nothing replaces a final one.
        self._db.execute(
            "INSERT INTO receipts (session, pending, signed, cert, address, ts) VALUES (?, ?, ?, ?, ?, ?)"
            " ON CONFLICT(session) DO UPDATE SET pending = excluded.pending, signed = excluded.signed,"
            " cert = excluded.cert, address = excluded.address, ts = excluded.ts WHERE receipts.pending = 1",
            (kept.receipt.session, int(bool(kept.receipt.pending)), kept.signed, kept.cert, kept.address,
             kept.receipt.ts))

    def receipts(self) -> list[KeptReceipt]:
        """Every receipt kept, oldest first."""
        rows = self._db.execute("SELECT signed, cert, address FROM receipts ORDER BY ts, rowid").fetchall()
        return [KeptReceipt(receipt=FinalReceipt.decode(cose.decode_sign1(bytes(signed)).payload),
                            signed=bytes(signed), cert=bytes(cert), address=str(address))
                for signed, cert, address in rows]

    # --- withdrawals -----------------------------------------------------------------------
    def begin_withdrawal(self, pending: PendingWithdrawal, signed: bytes, now: int, *, value: int) -> None:
        """Keep the secrets, the signed request and its value (``value``) before the request is sent."""
        blob = cbor.encode({"request": pending.request.encode(), "seeds": list(pending.seeds),
                            "prefixes": list(pending.prefixes), "secrets": list(pending.secrets)})
        with self._transaction():
            self._db.execute("INSERT INTO withdrawals VALUES (?, ?, ?, ?)",
                             (pending.request.req_id, signed, blob, now))
            self._db.execute("INSERT INTO withdrawn VALUES (?, ?, ?)", (pending.request.req_id, now, value))

    def withdrawn_since(self, since: int) -> int:
        """Value of the withdrawals begun at or after ``since`` that the bank did not refuse."""
        row = self._db.execute("SELECT COALESCE(SUM(value), 0) FROM withdrawn WHERE ts >= ?", (since,)).fetchone()
        return int(row[0])

    def pending_withdrawals(self) -> list[tuple[PendingWithdrawal, bytes]]:
        """Withdrawals sent (or about to be) whose coins are not stored yet, with their signed bytes."""
        out = []
        for signed, blob in self._db.execute("SELECT signed, pending FROM withdrawals ORDER BY created").fetchall():
            data: dict[str, Any] = cbor.decode(bytes(blob), max_size=_STATE_LIMIT)
            out.append((PendingWithdrawal(request=WithdrawRequest.decode(data["request"]), seeds=tuple(data["seeds"]),
                                          prefixes=tuple(data["prefixes"]), secrets=tuple(data["secrets"])),
                        bytes(signed)))
        return out

    def withdrawals_in_flight(self) -> list[tuple[int, int, int]]:
        """``(begun at, coins, value)`` of each withdrawal whose coins are not stored yet, oldest first."""
        rows = self._db.execute("SELECT w.created, w.pending, COALESCE(d.value, 0) FROM withdrawals w"
                                " LEFT JOIN withdrawn d ON d.req_id = w.req_id ORDER BY w.created").fetchall()
        return [(int(created), len(cbor.decode(bytes(blob), max_size=_STATE_LIMIT)["seeds"]), int(value))
                for created, blob, value in rows]

    def drop_withdrawal(self, req_id: bytes) -> None:
        """Forget a withdrawal the bank refused: its secrets can never become coins, nothing was debited."""
        with self._transaction():
            self._db.execute("DELETE FROM withdrawals WHERE req_id = ?", (req_id,))
            self._db.execute("DELETE FROM withdrawn WHERE req_id = ?", (req_id,))

    def finish_withdrawal(self, req_id: bytes, coins: list[WalletCoin]) -> None:
        """Store the finalized coins and forget the secrets, in one transaction."""
        with self._transaction():
            for wc in coins:
                self._save(wc, frozenset())
            self._db.execute("DELETE FROM withdrawals WHERE req_id = ?", (req_id,))


def _exchange_secrets(pending: PendingExchange) -> bytes:
    return cbor.encode({"seeds": list(pending.seeds), "prefixes": list(pending.prefixes),
                        "secrets": list(pending.secrets)})


def _coin(row: tuple[Any, ...]) -> WalletCoin:
    return WalletCoin(coin=Coin.decode(bytes(row[0])), n=int(row[1]), token_value=int(row[2]), position=int(row[3]),
                      seed=bytes(row[4]), traversal=cbor.decode(bytes(row[5]), max_size=_STATE_LIMIT),
                      status=CoinStatus(row[6]), blocked_until=int(row[7]))
