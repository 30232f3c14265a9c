"""``bank status``: what an operator looks at first — accounts, vendors, keysets, open blocks.

Read in one read-only transaction. Outstanding value per keyset is what was issued in it minus
what its coins have paid to vendors; balances of vendors are sums over the journal, as
everywhere else in the bank.
"""

from __future__ import annotations

from typing import Any

from m2mpay.protocol.messages import KeysetInfo

from .keys import BankKeys
from .store import Store, Tx

__all__ = ["bank_status", "keyset_phase"]


def keyset_phase(info: KeysetInfo, retired: bool, now: int) -> str:
    """``active`` (withdraw and spend), ``spend-only`` (retired or past ``withdraw_until``), or
    ``closed`` (past ``spend_until``)."""
    if now >= info.spend_until:
        return "closed"
    if retired or now >= info.withdraw_until:
        return "spend-only"
    return "active"


def _sums(tx: Tx, sql: str, params: tuple[str, ...] = ()) -> dict[str, int]:
    return {str(name): int(total) for name, total in tx.all(sql, params)}


def bank_status(keys: BankKeys, store: Store, now: int) -> dict[str, Any]:
    """The bank's state as plain data (the ``--json`` output of ``bank status``)."""
    def read(tx: Tx) -> dict[str, Any]:
        credits_in = _sums(tx, "SELECT credit, SUM(amount) FROM journal GROUP BY credit")
        debits_out = _sums(tx, "SELECT debit, SUM(amount) FROM journal GROUP BY debit")
        issued = _sums(tx, "SELECT keyset, SUM(value) FROM issuance WHERE keyset IS NOT NULL GROUP BY keyset")
        paid = _sums(tx, "SELECT c.keyset, SUM(j.amount) FROM journal j JOIN coins c ON c.tip = j.ref "
                         "WHERE j.kind LIKE ? GROUP BY c.keyset", ("credit:%",))
        accounts = [{"name": str(name), "balance": int(balance)}
                    for name, balance in tx.all("SELECT name, balance FROM accounts WHERE kind = 'user' ORDER BY name")]
        vendors = [{"vendor": str(vendor), "account": str(account), "category": str(category),
                    "credited": credits_in.get(str(account), 0) - debits_out.get(str(account), 0),
                    "revoked": revoked is not None}
                   for vendor, account, category, revoked
                   in tx.all("SELECT vendor, account, category, revoked FROM vendors ORDER BY vendor")]
        keysets = []
        for info_blob, retired in tx.all("SELECT info, retired FROM keysets ORDER BY id"):
            info = KeysetInfo.decode(bytes(info_blob))
            keysets.append({"id": info.id, "value": info.value, "n": info.n, "currency": info.currency,
                            "phase": keyset_phase(info, bool(retired), now),
                            "withdraw_until": info.withdraw_until, "spend_until": info.spend_until,
                            "issued": issued.get(info.id, 0),
                            "outstanding": issued.get(info.id, 0) - paid.get(info.id, 0)})
        row = tx.one("SELECT COUNT(*) FROM coins WHERE status = 'open' AND deadline > ?", (now,))
        return {"bank": keys.bank, "time": now, "accounts": accounts, "vendors": vendors, "keysets": keysets,
                "open_blocks": 0 if row is None else int(row[0]),
                "outstanding": credits_in.get("outstanding", 0) - debits_out.get("outstanding", 0)}

    return store.run_sync(read)
