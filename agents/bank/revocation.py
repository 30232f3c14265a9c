"""Vendor revocation in the bank's database: the ``vendors.revoked`` column (a time, or NULL).

The database is the one list: ``bank vendor revoke`` writes it, the running bank reads it inside
each block and settlement transaction (a primary-key lookup, so a revocation takes effect at
once, in every worker), and the running bank republishes its keys announcement with the new list
(:mod:`m2mpay.agents.bank.server`).
"""

from __future__ import annotations

import logging

from m2mpay.protocol import cose
from m2mpay.protocol.errors import ErrorCode, ProtocolError, RemoteProtocolError
from m2mpay.protocol.messages import MAX_REVOKED, CertificateBody

from .ledger import Ledger
from .tx import Tx

__all__ = ["is_revoked", "refuse_revoked", "revoke", "revoked_vendors"]

log = logging.getLogger(__name__)


def revoke(tx: Tx, vendor: str, now: int) -> bool:
    """Mark ``vendor`` revoked at ``now``; ``False`` if it already was, ``KeyError`` if unknown."""
    row = tx.vendor(vendor)
    if row is None:
        raise KeyError(vendor)
    if row.revoked is not None:
        return False
    tx.revoke(vendor, now)
    return True


def is_revoked(tx: Ledger, vendor: str) -> bool:
    """Whether the bank revoked ``vendor`` (on PostgreSQL read with the coin, in one round trip)."""
    return tx.vendor_revoked(vendor)


def refuse_revoked(tx: Ledger, vendor: str) -> None:
    """Raise ``revoked`` for a revoked vendor (inside the transaction that acts for it)."""
    if is_revoked(tx, vendor):
        raise RemoteProtocolError(f"vendor {vendor} revoked by the bank", ErrorCode.REVOKED)


def revoked_vendors(tx: Tx, now: int) -> tuple[str, ...]:
    """The revoked vendors whose certificate has not expired at ``now``, sorted: what the
    announcement lists. A vendor whose certificate expired is refused by every device anyway."""
    names = []
    for row in tx.vendors(revoked_only=True):
        vendor = row.vendor
        try:
            expires = CertificateBody.decode(cose.decode_sign1(row.cert).payload).exp
        except ProtocolError:
            expires = None  # unreadable: list it, refusing too much is the safe side
        if expires is None or expires > now:
            names.append(str(vendor))
    if len(names) > MAX_REVOKED:
        # Never a reason to stop the bank: it refuses every revoked vendor itself whatever the
        # list says; devices learn of the most recent revocations, which matter most.
        log.error("%d revoked vendors with valid certificates: the announcement lists the %d most recent",
                  len(names), MAX_REVOKED)
        names = names[:MAX_REVOKED]
    return tuple(sorted(names))
