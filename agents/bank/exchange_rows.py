"""The rows of exchanges (schema migration 6): the SQL the exchange handler and the audit run.

Kept out of :class:`~m2mpay.agents.bank.tx.Tx` so the request path's module stays as it is; each
function takes the open transaction and runs plain statements on it (general road on PostgreSQL).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from m2mpay.protocol import cbor

from .ledger import Ledger
from .tx import Tx

__all__ = ["ExchangeRow", "OutputRow", "exchange_outputs", "exchange_row", "exchanges", "fill_exchange",
           "put_exchange", "signed_among"]


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


def signed_among(tx: Ledger, blinded: Sequence[bytes]) -> frozenset[bytes]:
    """Those of ``blinded`` that an exchange had signed before."""
    found = set()
    for message in blinded:
        if _sql(tx).one("SELECT 1 FROM signed_messages WHERE blinded = ?", (message,)) is not None:
            found.add(message)
    return frozenset(found)


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
