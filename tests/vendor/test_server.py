"""The running vendor: metering over Observe, checkpoints, settlement when a session goes idle."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
from pathlib import Path

import aiocoap
import pytest
from aiocoap.numbers.codes import Code

from m2mpay.agents.bank import admin
from m2mpay.agents.bank.server import serve
from m2mpay.agents.vendor import cli as vendor_cli
from m2mpay.agents.vendor.config import Pricing, SessionPolicy, VendorConfig
from m2mpay.agents.vendor.server import load_credentials, run_vendor
from m2mpay.broker.launcher import free_udp_port
from m2mpay.protocol import sealing, wire
from m2mpay.protocol.certificates import cert_hash
from m2mpay.protocol.messages import Due, Offer, OpenSession, SessionOpened
from m2mpay.protocol.rules import wallet

from tests.bank_world import BankWorld
from tests.waiting import wait_until_async

pytestmark = [pytest.mark.asyncio, pytest.mark.network]


async def test_metered_session_checkpoints_and_settles_when_idle(world: BankWorld, mosquitto: str, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    ready, vendor_ready = asyncio.Event(), asyncio.Event()
    bank_task = asyncio.create_task(serve(world.keys, world.service, mosquitto, ready=ready))
    await asyncio.wait_for(ready.wait(), 10)
    world.vendor("meter")
    config = VendorConfig(pricing=Pricing(service="parking", unit="tick", price=1, meter_interval=0.05),
                          session=SessionPolicy(block_window=600, checkpoint_every=4, idle_timeout=60))
    port = free_udp_port()
    vendor_task = asyncio.create_task(run_vendor(
        load_credentials(tmp_path / "meter.json"), mosquitto, port, tmp_path / "vendor", config,
        ready=vendor_ready, clock=world.clock, settle_period=0.05))
    client = await aiocoap.Context.create_client_context()
    try:
        await asyncio.wait_for(vendor_ready.wait(), 10)
        base = f"coap://[::1]:{port}"
        (wc,) = await world.withdraw(world.user("alice"))
        offer_uri = wire.uri(base, wire.OFFER_PATH)
        offer = Offer.decode((await client.request(aiocoap.Message(code=Code.GET, uri=offer_uri)).response).payload)
        wc, auth = wallet.authorize(wc, deadline=offer.deadline, nonce=offer.nonce, cert_hash=cert_hash(offer.cert),
                                    now=world.clock.now)
        sealed = sealing.seal(auth.encode(), world.keys.keyring.sealing_key, sealing.info_for_bank(world.bank))
        opened = SessionOpened.decode((await client.request(aiocoap.Message(
            code=Code.POST, uri=wire.uri(base, wire.SESSIONS_PATH), content_format=wire.CONTENT_FORMAT_CBOR,
            payload=OpenSession(coin=wc.coin, sealed=sealed, deadline=offer.deadline, nonce=offer.nonce).encode(),
        )).response).payload)
        due_uri, pay_uri = (wire.uri(base, wire.session_path(opened.session, leaf)) for leaf in (wire.DUE, wire.PAY))
        observation = client.request(aiocoap.Message(code=Code.GET, uri=due_uri, observe=0))
        await observation.response
        paid = 1
        async for note in observation.observation:  # the meter asks; the user pays what is owed
            due = Due.decode(note.payload)
            if due.tokens:
                wc, pay = wallet.reveal(wc, due.tokens)
                await client.request(aiocoap.Message(code=Code.POST, uri=pay_uri,
                                                     content_format=wire.CONTENT_FORMAT_CBOR,
                                                     payload=pay.encode())).response
                paid += due.tokens
            if paid >= 9:
                break
        observation.observation.cancel()
        await wait_until_async(lambda: admin.balance(world.store, "meter") >= 4, timeout=5,
                               what="a checkpoint settled while the session is open")
        world.clock.now += 61  # nobody pays any more: idle
        await wait_until_async(lambda: admin.balance(world.store, "meter") == paid, timeout=5,
                               what="the idle session is settled")
    finally:
        await client.shutdown()
        for task in (vendor_task, bank_task):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    vendor_cli._status(argparse.Namespace(data=tmp_path / "vendor", json=True))
    status = json.loads(capsys.readouterr().out)
    assert status["open"] == 0 and status["outbox"] == 0 and status["settled"] == paid
