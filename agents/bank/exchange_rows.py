"""The rows of exchanges (schema migration 6) and of the blinded messages the bank signed
(migrations 6 and 7): the SQL the exchange, withdrawal and restore handlers and the audit run.

Kept out of :class:`~m2mpay.agents.bank.tx.Tx` so the request path's module stays as it is; each
function takes the open transaction and runs plain statements on it (general road on PostgreSQL).
A lookup of several blinded messages is one statement per table (``WHERE blinded IN (…)``), not
one per message: withdrawals, on the benchmarked path, run it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from m2mpay.protocol import cbor

from .ledger import Ledger
from .tx import Tx

__all__ = ["SIGNED_TABLES", "ExchangeRow", "OutputRow", "exchange_outputs", "exchange_row", "exchanges",
           "fill_exchange", "lock_messages", "put_exchange", "put_withdrawn", "signed_among", "signed_keysets"]

SIGNED_TABLES = ("withdrawn_messages", "signed_messages")
"""Where the bank records every blinded message it signed: by withdrawals, by exchanges."""


@dataclass(frozen=True, slots=True)
class ExchangeRow:
    """One exchanged coin: the request it answered, what it spent and its answer (empty: pending)."""

    tip: bytes
    req_id: bytes
    request_hash: bytes
    keyset: str
    tokens: int
    value: int
    change_used: tuple[int, ...]
    answer: bytes


@dataclass(frozen=True, slots=True)
class OutputRow:
    """What one exchange issued in one keyset."""

    tip: bytes
    keyset: str
    coins: int
    value: int


def _sql(tx: Ledger) -> Tx:
    if not isinstance(tx, Tx):
        raise TypeError("exchange rows are read on the general road")  # a bug, never peer input
    return tx


_COLUMNS = "tip, req_id, request_hash, keyset, tokens, value, change_used, answer"


def _row(r: tuple[Any, ...]) -> ExchangeRow:
    return ExchangeRow(tip=bytes(r[0]), req_id=bytes(r[1]), request_hash=bytes(r[2]), keyset=str(r[3]),
                       tokens=int(r[4]), value=int(r[5]), change_used=tuple(int(i) for i in cbor.decode(bytes(r[6]))),
                       answer=bytes(r[7]))


def exchange_row(tx: Ledger, tip: bytes) -> ExchangeRow | None:
    """The exchange of the coin ``tip``, if it was exchanged."""
    row = _sql(tx).one(f"SELECT {_COLUMNS} FROM exchanges WHERE tip = ?", (tip,))  # noqa: S608 - constant columns
    return None if row is None else _row(row)


def signed_keysets(tx: Ledger, blinded: Sequence[bytes]) -> set[tuple[bytes, str]]:
    """``(message, keyset)`` for each of ``blinded`` that a withdrawal or an exchange had signed,
    under the keyset it was signed for: one statement per table."""
    if not blinded:
        return set()
    sql, marks = _sql(tx), ", ".join("?" * len(blinded))
    found: set[tuple[bytes, str]] = set()
    for table in SIGNED_TABLES:  # the table names are this module's constants, the values placeholders
        rows = sql.all(f"SELECT blinded, keyset FROM {table} WHERE blinded IN ({marks})", tuple(blinded))  # noqa: S608 - constant names, placeholders only
        found.update((bytes(r[0]), str(r[1])) for r in rows)
    return found


MESSAGE_LOCKS = 0x6D326D70
"""The first key of the advisory locks of blinded messages (PostgreSQL's two-key form, a space of
its own: the fast road's locks of stored answers take the one-key form)."""


def lock_messages(tx: Ledger, blinded: Sequence[bytes]) -> None:
    """Hold each of ``blinded``'s lock to the end of the transaction (PostgreSQL), before reading
    anything that a concurrent request for the same messages writes.

    A withdrawal and an exchange record a message in different tables, under different row locks
    (the account's, the coin's); without these locks each could find a message unsigned before
    the other's commit, and both sign it. Taken before the handler looks for its own stored
    request, so that a twin in another bank process waits here and then finds that, not the
    messages it signed. On SQLite one transaction writes at a time already.
    """
    sql = _sql(tx)
    if sql.dialect == "postgresql" and blinded:
        keys = sorted({int.from_bytes(hashlib.blake2b(m, digest_size=4).digest(), "big", signed=True)
                       for m in blinded})  # one order in every transaction: no cycle among them
        sql.one("SELECT count(pg_advisory_xact_lock(?, k)) FROM unnest(CAST(? AS int4[])) AS k",
                (MESSAGE_LOCKS, keys))


def signed_among(tx: Ledger, blinded: Sequence[bytes]) -> frozenset[bytes]:
    """Those of ``blinded`` that a withdrawal or an exchange had signed before (for any keyset);
    a transaction that then records those it signs holds their locks (:func:`lock_messages`)."""
    return frozenset(message for message, _ in signed_keysets(tx, blinded))


def put_withdrawn(tx: Ledger, *, account: str, req_id: bytes, keyset: str, blinded: Sequence[bytes]) -> None:
    """Record the blinded messages a withdrawal paid for, in the transaction of its debit: one
    statement (a message signed before, even by a concurrent twin, fails its primary key)."""
    if not blinded:
        return
    rows = ", ".join(["(?, ?, ?, ?)"] * len(blinded))
    params = [value for message in blinded for value in (message, keyset, account, req_id)]
    _sql(tx).execute(f"INSERT INTO withdrawn_messages (blinded, keyset, account, req_id) VALUES {rows}",  # noqa: S608 - placeholders only
                     params)


def put_exchange(tx: Ledger, *, tip: bytes, req_id: bytes, request_hash: bytes, keyset: str, tokens: int, value: int,
                 change_used: tuple[int, ...], outputs: Sequence[tuple[str, int, int]],
                 blinded: Sequence[tuple[bytes, str]], now: int) -> None:
    """Record an exchange with its answer pending, what it issued per keyset and the messages it signs."""
    sql = _sql(tx)
    sql.execute(f"INSERT INTO exchanges ({_COLUMNS}, ts) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",  # noqa: S608 - constant columns
                (tip, req_id, request_hash, keyset, tokens, value, cbor.encode(list(change_used)), b"", now))
    for out_keyset, coins, out_value in outputs:
        sql.execute("INSERT INTO exchange_outputs (tip, keyset, coins, value) VALUES (?, ?, ?, ?)",
                    (tip, out_keyset, coins, out_value))
    for message, out_keyset in blinded:
        sql.execute("INSERT INTO signed_messages (blinded, keyset, tip) VALUES (?, ?, ?)", (message, out_keyset, tip))


def fill_exchange(tx: Ledger, tip: bytes, answer: bytes) -> bytes:
    """Put the signed answer in place of the pending one; the answer now stored (a twin's, if it
    came first: RSA signing is deterministic, so both are the same bytes)."""
    sql = _sql(tx)
    sql.execute("UPDATE exchanges SET answer = ? WHERE tip = ? AND answer = ?", (answer, tip, b""))
    row = exchange_row(sql, tip)
    if row is None:
        raise LookupError("exchange row gone")  # a bug: rows of exchanges are never deleted
    return row.answer


def exchanges(tx: Tx) -> list[ExchangeRow]:
    """Every exchange (for the audit)."""
    return [_row(r) for r in tx.all(f"SELECT {_COLUMNS} FROM exchanges")]  # noqa: S608 - constant columns


def exchange_outputs(tx: Tx) -> list[OutputRow]:
    """What every exchange issued, per keyset (for the audit)."""
    return [OutputRow(bytes(r[0]), str(r[1]), int(r[2]), int(r[3]))
            for r in tx.all("SELECT tip, keyset, coins, value FROM exchange_outputs")]
