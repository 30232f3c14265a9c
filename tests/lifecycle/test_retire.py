"""``bank keyset retire``: withdrawals stop at once, spending goes on until ``spend_until``, and a
running bank, vendor and wallet follow without a restart; no value is lost on the way."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from m2mpay.agents.bank import admin
from m2mpay.agents.bank.keys import add_keyset, load_bank
from m2mpay.agents.bank.phases import retire_keyset
from m2mpay.agents.bank.server import serve
from m2mpay.agents.bank.service import BankService
from m2mpay.agents.bank.store import Store
from m2mpay.agents.mqtt import BankClient
from m2mpay.agents.user.agent import UserAgent, UserCredentials
from m2mpay.agents.vendor.agent import Credentials, VendorAgent
from m2mpay.agents.vendor.store import VendorStore
from m2mpay.protocol import envelope
from m2mpay.protocol.certificates import verify_announcement
from m2mpay.protocol.errors import ErrorCode, RemoteProtocolError
from m2mpay.protocol.messages import BlockAnswer
from m2mpay.protocol.rules import wallet
from m2mpay.protocol.rules.phases import REDEEM_GRACE
from tests.bank_world import BankWorld
from tests.commands import m2mpay


def short_keyset(world: BankWorld) -> Store:
    """Give ``world`` a keyset of 64 one-unit tokens spendable for two days (within the vendors'
    certificates), the one it withdraws from; the bank reloaded with it. The new store to close."""
    add_keyset(world.directory / "bank", world.store, value=64, tokens=64, withdraw_days=1, spend_days=2,
               now=world.clock.now)
    keys, store = load_bank(world.directory / "bank", world.clock.now)
    world.keys, world.service = keys, BankService(keys, store, clock=world.clock)
    world.send = world.service.handle
    assert world.keys.keyring.keysets[world.keyset].n == 64
    return store


@pytest.mark.asyncio
async def test_retire_stops_withdrawals_keeps_spending_and_states_outstanding(world: BankWorld) -> None:
    store = short_keyset(world)
    try:
        await _retire_and_spend(world)
    finally:
        store.close()


async def _retire_and_spend(world: BankWorld) -> None:
    user, vendor = world.user("alice"), world.vendor("meter")
    coins = await world.withdraw(user, 3)  # 3 coins of 64 one-unit tokens
    wc, session = await world.block(vendor, coins[0])
    wc, pay = wallet.reveal(wc, 4)
    session.pay(pay, world.clock.now)
    await world.settle(vendor, session)  # 5 credited
    info = world.keys.keyring.keysets[world.keyset]

    preview = retire_keyset(world.store, world.keyset, world.clock.now, dry_run=True)
    assert world.store.run_sync(lambda tx: tx.keyset_phase(world.keyset)) is None  # a dry run changes nothing
    report = retire_keyset(world.store, world.keyset, world.clock.now)
    assert preview == report
    assert (report.outstanding, report.coins, report.already) == (187, 1, False)
    assert (report.spend_until, report.redeem_until) == (info.spend_until, info.spend_until + REDEEM_GRACE)
    assert report.lines()[1] == "outstanding value: 187 (minor units of EUR) in coins it issued; " \
                                "1 coin(s) seen and not spent"
    world.clock.now += 60
    again = retire_keyset(world.store, world.keyset, world.clock.now)
    assert again.already and again.record == report.record  # the first retirement stays

    # No new withdrawal, refused in the transaction that would debit (this process loaded its
    # keys before the retirement): nothing debited, nothing signed.
    balance = admin.balance(world.store, "alice")
    pending = wallet.prepare_withdrawal("alice", info, world.keys.keyring.rsa_keys[info.id], 1)
    signed = user.sign(pending.request, "withdraw")
    with pytest.raises(envelope.Refusal) as refused:
        world.open(await world.send("withdraw", signed), "withdraw", BlockAnswer, request=signed)
    assert refused.value.code is ErrorCode.KEYSET_EXPIRED and admin.balance(world.store, "alice") == balance

    # Spending goes on until spend_until: a new block and its settlement.
    world.clock.now = info.spend_until - 700
    wc, session = await world.block(vendor, coins[1])
    wc, pay = wallet.reveal(wc, 9)
    session.pay(pay, world.clock.now)
    assert (await world.settle(vendor, session)).credited == 10
    world.clock.now = info.spend_until - 5
    _, _, late = world.session(vendor, coins[2], deadline=world.clock.now + 600)  # made in time, sent late
    world.clock.now = info.spend_until + 1
    with pytest.raises(RemoteProtocolError) as local:  # a vendor checks the coin first
        world.session(vendor, coins[2], deadline=world.clock.now + 600)
    assert local.value.code is ErrorCode.KEYSET_EXPIRED
    with pytest.raises(envelope.Refusal) as refused:
        world.open(await world.send("block", late), "block", BlockAnswer, request=late)
    assert refused.value.code is ErrorCode.KEYSET_EXPIRED
    audit = world.audit()
    assert audit.ok and (audit.withdrawn, audit.credited, audit.outstanding) == (192, 15, 177)


@contextlib.asynccontextmanager
async def _serving(world: BankWorld, mosquitto: str) -> AsyncIterator[None]:
    ready = asyncio.Event()
    task = asyncio.create_task(serve(world.keys, world.service, mosquitto, sweep_interval=0.1, ready=ready))
    try:
        await asyncio.wait_for(ready.wait(), 10)
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.mark.asyncio
async def test_running_bank_vendor_and_wallet_follow_a_retirement(world: BankWorld, mosquitto: str,
                                                                  tmp_path: Path) -> None:
    user, device = world.user("alice"), world.vendor("meter")
    info = world.keys.keyring.keysets[world.keyset]
    heard = asyncio.Event()
    async with _serving(world, mosquitto), \
            BankClient(mosquitto, world.bank, f"alice-{uuid.uuid4().hex[:6]}") as bank:
        credentials = Credentials(vendor="meter", account=device.account, key=device.key, cert=device.cert,
                                  bank=world.bank, ca_fingerprint=world.keys.fingerprint)
        vendor = VendorAgent(credentials, world.keys.keyring, bank, VendorStore(tmp_path / "vendor.sqlite3"),
                             clock=world.clock)
        wallet_agent = UserAgent(tmp_path / "wallet", clock=world.clock)
        try:
            await bank.keys()
            bank.keys_listeners += [vendor.take_keys, lambda _: heard.set()]
            coins = await wallet_agent.withdraw(bank, UserCredentials.load(tmp_path / f"{user.name}.json"), 2)
            assert wallet_agent.spendable_value() == 200

            report = retire_keyset(world.store, world.keyset, world.clock.now)
            async with asyncio.timeout(5):
                await heard.wait()  # the bank re-signed within a sweep, on the connection already open
            announced = verify_announcement(await bank.keys(), world.keys.fingerprint, world.clock.now)
            assert announced.phases == (report.record,) and announced.keyset(world.keyset) == info
            assert vendor.keyring.phases == {world.keyset: report.record}
            assert vendor.offer().keysets == (world.keyset,)  # its coins are still taken

            with pytest.raises(RemoteProtocolError) as refused:  # the wallet learns it at its next withdrawal
                await wallet_agent.withdraw(bank, UserCredentials.load(tmp_path / f"{user.name}.json"), 1)
            assert refused.value.code is ErrorCode.KEYSET_EXPIRED
            assert wallet_agent.keyring().phases == {world.keyset: report.record}
            assert wallet_agent.spendable_value() == 200  # still money until spend_until

            _, session = await world.block(device, coins[0])  # the running bank takes the coin
            assert session.state.value == "open"
            world.clock.now = info.spend_until + 1
            assert wallet_agent.spendable_value() == 0  # past spending: only an exchange gets it back
        finally:
            wallet_agent.close()
            vendor.store.close()


def test_retire_command_states_what_it_affects(tmp_path: Path) -> None:
    data = tmp_path / "bank"
    m2mpay("bank", "init", "--data", data)
    keyset = m2mpay("bank", "keyset", "add", "--data", data, "--value", "64", "--tokens", "64").stdout.strip()
    preview = m2mpay("bank", "keyset", "retire", "--data", data, keyset, "--dry-run").stdout.splitlines()
    assert preview[0] == f"would retire keyset {keyset}: no more withdrawals from it (nothing changed)"
    assert preview[1] == "outstanding value: 0 (minor units of EUR) in coins it issued; 0 coin(s) seen and not spent"
    done = m2mpay("bank", "keyset", "retire", "--data", data, keyset).stdout.splitlines()
    assert done[0] == f"keyset {keyset} retired: no more withdrawals from it" and done[1] == preview[1]
    assert done[2].startswith("those coins can still be spent until ")
    again = m2mpay("bank", "keyset", "retire", "--data", data, keyset).stdout.splitlines()
    assert again[0].startswith(f"keyset {keyset} was already retired at ")
    missing = m2mpay("bank", "keyset", "retire", "--data", data, "ks-nope", check=False)
    assert missing.returncode != 0 and "ks-nope" in missing.stderr
