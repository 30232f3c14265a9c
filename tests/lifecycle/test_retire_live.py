"""A keyset retired while a wallet holds its coins: the wallet keeps paying a vendor over CoAP,
exchanges its coins automatically before ``spend_until``, and no value is lost, to the minor
unit; the bank, the vendor and the wallet follow the retirement while they run."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from pathlib import Path

import aiocoap
import pytest

from m2mpay.agents.bank.phases import retire_keyset
from m2mpay.agents.bank.server import serve
from m2mpay.agents.mqtt import BankClient
from m2mpay.agents.user.agent import EXCHANGE_MARGIN, UserAgent, UserCredentials
from m2mpay.agents.vendor.agent import Credentials, VendorAgent
from m2mpay.agents.vendor.coap import serve_coap
from m2mpay.agents.vendor.server import _meter, _settler
from m2mpay.agents.vendor.store import VendorStore
from m2mpay.broker.launcher import free_udp_port
from m2mpay.protocol.rules.phases import Phase, phase_at
from tests.bank_world import BankWorld

from .exchange_world import exchanging

pytestmark = [pytest.mark.asyncio, pytest.mark.network]


async def test_retired_coins_keep_paying_then_are_exchanged_and_nothing_is_lost(world: BankWorld, mosquitto: str,
                                                                               tmp_path: Path) -> None:
    with exchanging(world, coin_days=10) as keyset:
        info = world.keys.keyring.keysets[keyset]
        user, device = world.user("alice"), world.vendor("meter")
        credentials = UserCredentials.load(tmp_path / f"{user.name}.json")
        heard = asyncio.Event()
        ready = asyncio.Event()
        bank_task = asyncio.create_task(serve(world.keys, world.service, mosquitto, sweep_interval=0.1, ready=ready))
        wallet = UserAgent(tmp_path / "wallet", clock=world.clock)
        ctx = await aiocoap.Context.create_client_context()
        try:
            await asyncio.wait_for(ready.wait(), 10)
            async with BankClient(mosquitto, world.bank, f"meter-{uuid.uuid4().hex[:6]}") as vendor_bank, \
                    BankClient(mosquitto, world.bank, f"alice-{uuid.uuid4().hex[:6]}") as bank:
                vendor = VendorAgent(Credentials(vendor="meter", account=device.account, key=device.key,
                                                 cert=device.cert, bank=world.bank,
                                                 ca_fingerprint=world.keys.fingerprint),
                                     world.keys.keyring, vendor_bank, VendorStore(tmp_path / "vendor.sqlite3"),
                                     clock=world.clock)
                await vendor_bank.keys()
                vendor_bank.keys_listeners += [vendor.take_keys, lambda _: heard.set()]
                port = free_udp_port()
                base = f"coap://[::1]:{port}"
                async with serve_coap(vendor, "::1", port), asyncio.TaskGroup() as group:
                    meter = group.create_task(_meter(vendor), name="test-vendor-meter")
                    settler = group.create_task(_settler(vendor, 0.2), name="test-vendor-settler")
                    await wallet.withdraw(bank, credentials, 2, keyset=keyset)
                    first = await wallet.pay(ctx, base, 3)
                    assert first.complete, first.why()

                    report = retire_keyset(world.store, keyset, world.clock.now)
                    assert report.outstanding == 200 - first.spent
                    async with asyncio.timeout(5):
                        await heard.wait()  # the running bank re-announced; the vendor followed
                    assert phase_at(info, vendor.keyring.phases[keyset], world.clock.now) is Phase.SPEND_ONLY
                    await wallet.fresh_keyring(bank, credentials)  # the wallet follows at its next contact

                    second = await wallet.pay(ctx, base, 5)  # its coins still pay
                    assert second.complete, second.why()
                    paid = first.spent + second.spent
                    assert wallet.spendable_value() == 200 - paid

                    # Not yet due: spending ends in more than the margin.
                    assert await wallet.exchange_due(bank, credentials) == []
                    world.clock.now = info.spend_until - EXCHANGE_MARGIN + 60
                    fresh = await wallet.exchange_due(bank, credentials)
                    assert fresh and all(c.coin.keyset != keyset for c in fresh)
                    assert sum(c.remaining for c in fresh) == 200 - paid
                    assert wallet.spendable_value() == 200 - paid
                    assert await wallet.exchange_due(bank, credentials) == []  # nothing left to exchange
                    meter.cancel()
                    settler.cancel()
                vendor.store.close()
        finally:
            wallet.close()
            await ctx.shutdown()
            bank_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await bank_task
        audit = world.audit()
        held = sum(wc.remaining for wc, _ in UserAgent(tmp_path / "wallet", clock=world.clock).store.coins())
        assert audit.ok, audit.problems
        assert (audit.withdrawn, audit.credited, audit.outstanding) == (200, paid, 200 - paid)
        assert audit.withdrawn == audit.credited + held  # to the minor unit
