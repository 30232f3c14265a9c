"""The wallet's side of exchange against a served bank: an uncertain coin resolved after its
possible block's deadline, and an exchange cut short resent byte for byte after a restart."""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from m2mpay.agents.bank.server import serve
from m2mpay.agents.mqtt import BankClient
from m2mpay.agents.user.agent import UserAgent, UserCredentials
from m2mpay.agents.user.exchange import prepare_exchange
from m2mpay.protocol.rules import wallet
from tests.bank_world import BankWorld

from .exchange_world import exchanging

pytestmark = [pytest.mark.asyncio, pytest.mark.network]


@contextlib.asynccontextmanager
async def _online(world: BankWorld, mosquitto: str) -> AsyncIterator[BankClient]:
    ready = asyncio.Event()
    task = asyncio.create_task(serve(world.keys, world.service, mosquitto, sweep_interval=0.1, ready=ready))
    try:
        await asyncio.wait_for(ready.wait(), 10)
        async with BankClient(mosquitto, world.bank, f"alice-{uuid.uuid4().hex[:6]}", timeout=5) as bank:
            yield bank
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_an_uncertain_coin_is_resolved_by_exchange_after_its_deadline(world: BankWorld, mosquitto: str,
                                                                            tmp_path: Path) -> None:
    with exchanging(world) as keyset:
        user = world.user("alice")
        credentials = UserCredentials.load(tmp_path / f"{user.name}.json")
        agent = UserAgent(tmp_path / "wallet", clock=world.clock)
        try:
            async with _online(world, mosquitto) as bank:
                (wc,) = await agent.withdraw(bank, credentials, 1, keyset=keyset)
                # An open whose answer never came: the blocking token was written ahead, and the
                # bank may or may not have seen it (here it never did).
                deadline = world.clock.now + 600
                wc, _ = wallet.authorize(wc, deadline=deadline, nonce=os.urandom(16), cert_hash=os.urandom(32),
                                         now=world.clock.now)
                agent.store.save(wc.event(wallet.WalletEvent.LOST))
                assert agent.spendable_value() == 0  # not money to refill on until it is resolved
                assert await agent.exchange_due(bank, credentials) == []  # its block may still stand
                world.clock.now = deadline
                fresh = await agent.exchange_due(bank, credentials)
                assert sum(c.remaining for c in fresh) == 100  # the bank never saw the token: nothing lost
                assert agent.spendable_value() == 100
                assert agent.store.coin(wc.coin.tip).status is wallet.CoinStatus.SPENT  # type: ignore[union-attr]
        finally:
            agent.close()
        report = world.audit()
        assert report.ok and (report.withdrawn, report.credited, report.outstanding) == (100, 0, 100)


async def test_an_exchange_cut_short_is_resent_as_it_was(world: BankWorld, mosquitto: str, tmp_path: Path) -> None:
    with exchanging(world) as keyset:
        user = world.user("alice")
        credentials = UserCredentials.load(tmp_path / f"{user.name}.json")
        agent = UserAgent(tmp_path / "wallet", clock=world.clock)
        try:
            async with _online(world, mosquitto) as bank:
                (wc,) = await agent.withdraw(bank, credentials, 1, keyset=keyset)
                pending = prepare_exchange(wc, agent.keyring(), world.clock.now)
                agent.store.begin_exchange(pending, world.clock.now)
                first = await bank.request("exchange", pending.data)  # answered, but the device stopped here
                assert agent.spendable_value() == 0  # the coin is in an exchange: not paid with meanwhile
                agent.close()
                agent = UserAgent(tmp_path / "wallet", clock=world.clock)  # restarted
                assert [p.data for p in agent.store.pending_exchanges()] == [pending.data]
                fresh = await agent.exchange_due(bank, credentials)
                assert sum(c.remaining for c in fresh) == 100 and agent.spendable_value() == 100
                assert await bank.request("exchange", pending.data) == first  # the bank's answer never changed
                assert agent.store.pending_exchanges() == []
        finally:
            agent.close()
        assert world.audit().ok
