"""``user status``: what the wallet can spend now, what is tied up and until when.

A coin is in one of four places: spendable (ready, or blocked with its deadline passed: its
block has lapsed at the bank), in a session (blocked for a vendor until its deadline), uncertain
(an open whose answer never came: the bank may have blocked it, so the wallet waits for its
deadline), or spent; a coin being exchanged (its remainder becoming fresh coins, or a restored
coin whose remainder only the bank knows) is listed apart until the bank answers. Withdrawals
sent whose answer has not come are listed with their value: the bank may have debited it, and
the next ``user withdraw`` completes them. The last line says whether the wallet's seed can
restore it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from m2mpay.protocol.rules.wallet import CoinStatus

from ..money import format_money
from .store import WalletStore

__all__ = ["iso", "render_status", "wallet_status"]


def iso(ts: int) -> str:
    """Unix seconds as ISO 8601 UTC, ``2026-05-01T12:00:00Z``."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def wallet_status(store: WalletStore, now: int, currency: str | None) -> dict[str, Any]:
    """The ``--json`` output of ``user status`` (amounts in minor units, times ISO 8601 UTC)."""
    spendable: list[dict[str, Any]] = []
    held: dict[str, list[dict[str, Any]]] = {"in_session": [], "uncertain": []}
    exchanging: list[dict[str, Any]] = []
    spent = 0
    busy = store.exchanging()
    for stored, vendors in store.coins():
        wc = stored.expire(now)
        if wc.position == 0 or wc.status is CoinStatus.SPENT:
            spent += 1
        elif wc.coin.tip in busy:
            exchanging.append({"tip": wc.coin.tip.hex(), "keyset": wc.coin.keyset})
        elif wc.available(now):
            spendable.append({"tip": wc.coin.tip.hex(), "keyset": wc.coin.keyset, "remaining": wc.remaining})
        else:
            held[wc.status.value].append({"tip": wc.coin.tip.hex(), "keyset": wc.coin.keyset,
                                          "remaining": wc.remaining, "deadline": iso(wc.blocked_until),
                                          "seconds_left": wc.blocked_until - now, "vendors": sorted(vendors)})
    withdrawals = [{"since": iso(created), "coins": coins, "value": value}
                   for created, coins, value in store.withdrawals_in_flight()]
    return {
        "time": iso(now), "currency": currency,
        "spendable": {"coins": len(spendable), "value": sum(c["remaining"] for c in spendable), "list": spendable},
        "in_session": {"coins": len(held["in_session"]), "value": sum(c["remaining"] for c in held["in_session"]),
                       "list": held["in_session"]},
        "uncertain": {"coins": len(held["uncertain"]), "value": sum(c["remaining"] for c in held["uncertain"]),
                      "list": held["uncertain"]},
        "pending_withdrawals": {"count": len(withdrawals), "value": sum(w["value"] for w in withdrawals),
                                "list": withdrawals},
        "exchanging": {"coins": len(exchanging), "list": exchanging},
        "spent_coins": spent,
        "seed": _seed_state(store),
    }


def _seed_state(store: WalletStore) -> str:
    """``shown``, ``not_shown`` (``user init`` shows it) or ``none`` (a wallet made before seeds)."""
    if store.seeds.seed() is None:
        return "none"
    return "not_shown" if store.seeds.unshown() is not None else "shown"


_SEED_LINES = {
    "shown": "seed         shown at 'user init': 'user restore' rebuilds this wallet from it",
    "not_shown": "seed         never shown: 'm2mpay user init --wallet DIR' shows it once",
    "none": "seed         none: this wallet's coins cannot be restored ('m2mpay user init' gives it one)",
}


def render_status(data: dict[str, Any]) -> list[str]:
    """The same, as lines for a person."""
    def money(minor: int) -> str:
        return format_money(minor, data["currency"]) if data["currency"] else f"{minor} (minor units)"

    lines = [f"spendable    {money(data['spendable']['value'])} in {data['spendable']['coins']} coin(s)"]
    for key, label in (("in_session", "in session"), ("uncertain", "uncertain")):
        part = data[key]
        lines.append(f"{label:<12} {money(part['value'])} in {part['coins']} coin(s)")
        for c in part["list"]:
            at = f" at {', '.join(c['vendors'])}" if c["vendors"] else ""
            lines.append(f"  {c['tip'][:16]}  {money(c['remaining'])}{at} until {c['deadline']} "
                         f"({max(0, c['seconds_left'])} s)")
    if data["exchanging"]["coins"]:
        lines.append(f"exchanging   {data['exchanging']['coins']} coin(s): worth what the bank says is left")
    pending = data["pending_withdrawals"]
    lines.append(f"withdrawals  {pending['count']} waiting for the bank's answer ({money(pending['value'])}); "
                 "'m2mpay user withdraw --coins 0' completes them" if pending["count"] else
                 "withdrawals  none waiting for the bank")
    lines.append(f"spent        {data['spent_coins']} coin(s)")
    lines.append(_SEED_LINES[data["seed"]])
    return lines
