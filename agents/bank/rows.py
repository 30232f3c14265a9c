"""The bank's rows as they come out of its database: typed, immutable, named fields."""

from __future__ import annotations

from typing import NamedTuple

from m2mpay.protocol.messages import KeysetInfo

__all__ = ["Account", "AccountRow", "Entry", "Issue", "KeysetRow", "VendorRow"]


class Account(NamedTuple):
    """An account's row. ``balance`` is kept for user accounts only (see :meth:`Ledger.transfer`)."""

    kind: str
    public_key: bytes | None
    balance: int


class AccountRow(NamedTuple):
    """An account with its name (balance kept for user accounts only)."""

    name: str
    kind: str
    balance: int


class Entry(NamedTuple):
    """One journal row: ``amount`` moved from ``debit`` to ``credit``."""

    id: int
    debit: str
    credit: str
    amount: int
    kind: str
    ref: bytes | None


class Issue(NamedTuple):
    """One issuance record; ``keyset`` is ``None`` for a withdrawal from before they were kept."""

    account: str
    req_id: bytes
    keyset: str | None
    coins: int | None
    value: int


class KeysetRow(NamedTuple):
    """A keyset's description and whether it was retired."""

    info: KeysetInfo
    retired: bool


class VendorRow(NamedTuple):
    """An enrolled vendor; ``revoked`` is the time of its revocation, if any."""

    vendor: str
    account: str
    category: str
    cert: bytes
    revoked: int | None
