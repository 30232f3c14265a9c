"""Fixtures for tests that speak CoAP: a client context, and a vendor served with its bank.

Imports of the agents happen when a test asks for a fixture, not when the plugin loads.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest_asyncio

if TYPE_CHECKING:
    import aiocoap

    from tests.bank_world import BankWorld
    from tests.vendor_scene import Scene

__all__ = ["ctx", "scene"]


@pytest_asyncio.fixture
async def ctx() -> AsyncIterator[aiocoap.Context]:
    """A CoAP client context on loopback, shut down afterwards."""
    import aiocoap

    context = await aiocoap.Context.create_client_context()
    try:
        yield context
    finally:
        await context.shutdown()


@pytest_asyncio.fixture
async def scene(world: BankWorld, mosquitto: str, tmp_path: Path) -> AsyncIterator[Scene]:
    """The world's bank served over the test Mosquitto, and vendor ``meter`` serving CoAP on ``::1``."""
    import aiocoap

    from m2mpay.agents.bank.server import serve
    from m2mpay.agents.mqtt import BankClient
    from m2mpay.agents.vendor.agent import Credentials, VendorAgent
    from m2mpay.agents.vendor.coap import serve_coap
    from m2mpay.agents.vendor.store import VendorStore
    from m2mpay.broker.launcher import free_udp_port
    from tests.vendor_scene import Scene

    ready = asyncio.Event()
    bank_task = asyncio.create_task(serve(world.keys, world.service, mosquitto, ready=ready), name="scene-bank")
    try:
        await asyncio.wait_for(ready.wait(), 10)
        vendor = world.vendor("meter")
        credentials = Credentials(vendor="meter", account=vendor.account, key=vendor.key, cert=vendor.cert,
                                  bank=world.bank, ca_fingerprint=world.keys.fingerprint)
        port = free_udp_port()
        store_path = tmp_path / "vendor.sqlite3"
        async with BankClient(mosquitto, world.bank, f"meter-{uuid.uuid4().hex[:6]}") as bank:
            agent = VendorAgent(credentials, world.keys.keyring, bank, VendorStore(store_path), clock=world.clock)
            async with serve_coap(agent, "::1", port):
                client = await aiocoap.Context.create_client_context()
                try:
                    yield Scene(world, agent, f"coap://[::1]:{port}", client, store_path, credentials)
                finally:
                    await client.shutdown()
                    agent.store.close()
    finally:
        bank_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await bank_task
