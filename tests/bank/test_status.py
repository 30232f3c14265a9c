"""``bank status``: balances, vendors' credit, keysets' phase and outstanding value, open blocks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from m2mpay.agents.bank import admin
from m2mpay.agents.bank.keys import retire_keyset
from m2mpay.agents.bank.status import bank_status
from m2mpay.protocol.rules import wallet

from tests.commands import m2mpay
from tests.bank_world import BankWorld

@pytest.mark.asyncio
async def test_bank_status_counts_what_the_books_say(world: BankWorld) -> None:
    user, vendor = world.user("alice"), world.vendor("meter")
    coins = await world.withdraw(user, 3)
    wc, session = await world.block(vendor, coins[0])
    wc, pay = wallet.reveal(wc, 4)
    session.pay(pay, world.clock.now)
    await world.settle(vendor, session)  # 5 tokens of 1 credited
    await world.block(vendor, coins[1])  # open
    status = bank_status(world.keys, world.store, world.clock.now)
    assert status["accounts"] == [{"name": "alice", "balance": 10_000 - 300}]
    assert status["vendors"] == [{"vendor": "meter", "account": "v-meter", "category": "parking", "credited": 5,
                                  "revoked": False}]
    (keyset,) = status["keysets"]
    assert (keyset["phase"], keyset["issued"], keyset["outstanding"]) == ("active", 300, 295)
    assert status["open_blocks"] == 1 and status["outstanding"] == 295
    assert status["outstanding"] == world.audit().outstanding
    retire_keyset(world.store, keyset["id"], world.clock.now)
    admin.revoke_vendor(world.store, "meter", world.clock.now)
    status = bank_status(world.keys, world.store, world.clock.now)
    assert status["keysets"][0]["phase"] == "spend-only" and status["vendors"][0]["revoked"]
    assert status["keysets"][0]["withdraw_until"] == world.clock.now
    world.clock.now = status["keysets"][0]["spend_until"]
    assert bank_status(world.keys, world.store, world.clock.now)["keysets"][0]["phase"] == "spend-only"
    world.clock.now += 1  # past spend_until: a retired keyset's coins are exchanged until redeem_until
    assert bank_status(world.keys, world.store, world.clock.now)["keysets"][0]["phase"] == "exchange-only"
    world.clock.now = status["keysets"][0]["redeem_until"] + 1
    assert bank_status(world.keys, world.store, world.clock.now)["keysets"][0]["phase"] == "closed"


def test_bank_status_command(tmp_path: Path) -> None:
    data = tmp_path / "bank"
    m2mpay("bank", "init", "--data", data)
    m2mpay("bank", "account", "open", "--data", data, "alice", "--out", tmp_path / "alice.json")
    m2mpay("bank", "account", "deposit", "--data", data, "alice", "700")
    shown = json.loads(m2mpay("bank", "status", "--data", data, "--json").stdout)
    assert set(shown) == {"bank", "time", "accounts", "vendors", "keysets", "open_blocks", "outstanding"}
    assert shown["accounts"] == [{"name": "alice", "balance": 700}]
    assert sorted(k["n"] for k in shown["keysets"]) == sorted([100, 1000] + [1 << i for i in range(10)])
    assert "alice" in m2mpay("bank", "status", "--data", data).stdout
