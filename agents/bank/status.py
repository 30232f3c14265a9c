"""``bank status``: what an operator looks at first — accounts, vendors, keysets, open blocks.

Read in one read-only transaction. Outstanding value per keyset is what was issued in it minus
what its coins have paid to vendors; balances of vendors are sums over the journal, as
everywhere else in the bank.
"""

from __future__ import annotations

from typing import Any

from m2mpay.protocol.messages import KeysetInfo, KeysetPhase
from m2mpay.protocol.rules.phases import phase_at

from .keys import BankKeys
from .store import Store, Tx

__all__ = ["bank_status", "keyset_phase"]


def keyset_phase(info: KeysetInfo, record: KeysetPhase | None, now: int) -> str:
    """The keyset's phase at ``now`` (docs/LIFECYCLE.md): ``active``, ``spend-only`` (retired or
    past ``withdraw_until``), ``exchange-only`` (past ``spend_until``, a retired keyset until its
    ``redeem_until``) or ``closed``."""
    return phase_at(info, record, now).value


def bank_status(keys: BankKeys, store: Store, now: int) -> dict[str, Any]:
    """The bank's state as plain data (the ``--json`` output of ``bank status``)."""
    def read(tx: Tx) -> dict[str, Any]:
        credits_in, debits_out = tx.account_totals()
        issued, paid = tx.keyset_totals()
        accounts = [{"name": a.name, "balance": a.balance} for a in tx.accounts(kind="user")]
        vendors = [{"vendor": v.vendor, "account": v.account, "category": v.category,
                    "credited": credits_in.get(v.account, 0) - debits_out.get(v.account, 0),
                    "revoked": v.revoked is not None}
                   for v in tx.vendors()]
        keysets = []
        phases = tx.keyset_phases()
        for info, _ in tx.keysets():
            record = phases.get(info.id)
            keysets.append({"id": info.id, "value": info.value, "n": info.n, "currency": info.currency,
                            "phase": keyset_phase(info, record, now),
                            "withdraw_until": info.withdraw_until if record is None else record.withdraw_until,
                            "spend_until": info.spend_until,
                            "redeem_until": info.spend_until if record is None else record.redeem_until,
                            "issued": issued.get(info.id, 0),
                            "outstanding": issued.get(info.id, 0) - paid.get(info.id, 0)})
        return {"bank": keys.bank, "time": now, "accounts": accounts, "vendors": vendors, "keysets": keysets,
                "open_blocks": tx.open_blocks(after=now),
                "outstanding": credits_in.get("outstanding", 0) - debits_out.get("outstanding", 0)}

    return store.run_sync(read)
