"""A bank made by a plain ``bank init`` offers the change exchanges need: every power of two from
1 to 512 tokens of token value 1, so any remainder of its 1000-token coin can be changed."""

from __future__ import annotations

import json
import time
from pathlib import Path

from m2mpay.agents.bank.keys import load_bank, retire_keyset
from m2mpay.protocol import cose
from m2mpay.protocol.messages import KeysAnnouncement, KeysetInfo
from m2mpay.protocol.rules.exchange import change_slots, decompose, plan_change
from m2mpay.protocol.rules.keyring import default_withdrawal

from tests.commands import m2mpay

POWERS = [1 << i for i in range(10)]  # 1 … 512: they add up to 1023, enough for any remainder up to 1000


def _listed(data: Path) -> list[KeysetInfo]:
    """The keysets as ``bank keys --json`` shows them (the bank's signed announcement)."""
    shown = json.loads(m2mpay("bank", "keys", "--data", data, "--json").stdout)["keysets"]
    return [KeysetInfo(id=k["id"], value=k["value"], n=k["n"], currency=k["currency"],
                       withdraw_until=k["withdraw_until"], spend_until=k["spend_until"],
                       public_key=bytes.fromhex(k["public_key"])) for k in shown]


def test_default_bank_offers_change_for_any_remainder(tmp_path: Path) -> None:
    data = tmp_path / "bank"
    said = m2mpay("bank", "init", "--data", data, "--bank", "bank-k").stdout
    assert ("12 keysets: 2 to withdraw (coins of 1.00 EUR, 10.00 EUR), 10 for change "
            "(1, 2, 4, 8, 16, 32, 64, 128, 256, 512 tokens of 0.01 EUR)") in said
    keysets = _listed(data)
    change = sorted(k.n for k in keysets if k.token_value == 1 and k.n & (k.n - 1) == 0)
    assert change == POWERS and all(k.currency == "EUR" for k in keysets)

    slots = change_slots(1, 1000, keysets)  # what a wallet exchanging a 1000-token coin sends
    assert [k.value for k in slots] == POWERS and all(k.n == k.value for k in slots)
    for gap in range(1001):  # every remainder is changed exactly: never less, never a cent more
        used = plan_change(gap, [k.value for k in slots])
        assert sum(slots[i].value for i in used) == gap
    assert sum(k.value for k in decompose(1000, keysets)) == 1000
    # ... and a wallet told nothing still withdraws the 1.00 EUR coin, not one-cent change.
    chosen = default_withdrawal(keysets)
    assert chosen is not None and (chosen.value, chosen.n) == (100, 100)


def test_the_signed_announcement_carries_all_twelve_with_their_phases(tmp_path: Path) -> None:
    """Twelve keysets, and a phase record for each once all are retired, fit the announcement."""
    data, now = tmp_path / "bank", int(time.time())
    m2mpay("bank", "init", "--data", data)
    keys, store = load_bank(data, now)
    try:
        for info in keys.keyring.keysets.values():
            retire_keyset(store, info.id, now)
    finally:
        store.close()
    keys, store = load_bank(data, now)
    store.close()
    announcement = KeysAnnouncement.decode(cose.decode_sign1(keys.announcement).payload)
    assert sorted(k.n for k in announcement.keysets) == sorted([100, 1000, *POWERS])
    assert sorted(p.keyset for p in announcement.phases or ()) == sorted(k.id for k in announcement.keysets)
    assert {p.phase for p in announcement.phases or ()} == {"spend-only"}
