"""Vendors that misbehave, for the wallet's tests: the real vendor with one behaviour changed.

Each runs the real vendor logic (:class:`~m2mpay.agents.vendor.agent.VendorAgent`), its CoAP site, its
token store and its bank connection, with one change a hostile or broken vendor could make. The
vendor's own code is untouched: the change is a subclass or a wrapper here.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiocoap
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from m2mpay.agents.mqtt import BankClient
from m2mpay.agents.vendor.agent import VendorAgent
from m2mpay.agents.vendor.coap import build_site
from m2mpay.agents.vendor.config import Pricing, SessionPolicy, VendorConfig
from m2mpay.agents.vendor.server import load_credentials
from m2mpay.agents.vendor.store import VendorStore
from m2mpay.broker.launcher import free_udp_port
from m2mpay.protocol import cose
from m2mpay.protocol.certificates import verify_announcement
from m2mpay.protocol.errors import ErrorCode, RemoteProtocolError
from m2mpay.protocol.messages import Due, FinalReceipt, Pay, Receipt
from m2mpay.protocol.receipts import AAD_RECEIPT
from m2mpay.protocol.rules.keyring import Keyring
from m2mpay.protocol.rules.vendor import SessionState

from tests.bank_world import BankWorld


class Misbehaviour(enum.Enum):
    """What the vendor does wrong."""

    NONE = "none"
    KEEPS_TOKENS = "keeps_tokens"
    """Checks and stores every token (and settles it) but answers 4.00 instead of a receipt."""
    ASKS_NOTHING = "asks_nothing"
    """Its meter sends ``Due(tokens=0)`` notifications forever."""
    SILENT_PAY = "silent_pay"
    """Never answers ``POST /sessions/{id}/pay``."""
    FORGES_RECEIPT = "forges_receipt"
    """Settles honestly, but answers a close with a receipt for ten times the money, signed by a key
    its certificate does not name."""


class _KeepsTokens(VendorAgent):
    def pay(self, sid: bytes, pay: Pay) -> Receipt:
        super().pay(sid, pay)  # checked and on disk: the vendor will be credited for it
        raise RemoteProtocolError("no receipt", ErrorCode.BAD_REQUEST)


class _AsksNothing(VendorAgent):
    def due(self, sid: bytes, units: int = 1, reason: str = "metered") -> Due:
        return super().due(sid, 0, reason)


class _ForgesReceipt(VendorAgent):
    async def close(self, sid: bytes) -> bytes:
        receipt = FinalReceipt.decode(cose.decode_sign1(await super().close(sid)).payload)
        inflated = dataclasses.replace(receipt, credited=receipt.credited * 10)
        return cose.sign1(inflated.encode(), Ed25519PrivateKey.generate(), receipt.vendor.encode(), AAD_RECEIPT)


class _SilentPay:
    """The vendor's site, except that a token payment is never answered."""

    def __init__(self, site: Any) -> None:
        self.site = site

    async def render_to_pipe(self, pipe: Any) -> None:
        path = pipe.request.opt.uri_path
        if len(path) == 3 and path[0] == "sessions" and path[2] == "pay":
            await asyncio.sleep(3600)  # cancelled when the server shuts down
        await self.site.render_to_pipe(pipe)


_AGENTS: dict[Misbehaviour, type[VendorAgent]] = {Misbehaviour.KEEPS_TOKENS: _KeepsTokens,
                                                  Misbehaviour.ASKS_NOTHING: _AsksNothing,
                                                  Misbehaviour.FORGES_RECEIPT: _ForgesReceipt}


@dataclass
class HostileVendor:
    """A serving vendor: its URL and its token store."""

    url: str
    agent: VendorAgent
    store: VendorStore

    def kept(self) -> int:
        """Value of every token the vendor holds (settled or not), in minor units."""
        return sum((s.start - s.position) * s.token_value for s in self.store.sessions())


async def _meter(agent: VendorAgent, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        for sid, session in list(agent.sessions.items()):
            if session.state is SessionState.OPEN:
                agent.due(sid)


@contextlib.asynccontextmanager
async def hostile_vendor(world: BankWorld, mosquitto: str, name: str, misbehaviour: Misbehaviour, *,
                         category: str = "parking", price: int = 1,
                         meter_interval: float = 0.02) -> AsyncIterator[HostileVendor]:
    """Enroll vendor ``name`` at the bank and serve it on a free loopback port until the block ends."""
    world.vendor(name, category)
    credentials = load_credentials(world.directory / f"{name}.json")
    config = VendorConfig(pricing=Pricing(service=name, unit="unit", price=price, meter_interval=meter_interval),
                          session=SessionPolicy(block_window=600, idle_timeout=600))
    (world.directory / name).mkdir(exist_ok=True)
    store = VendorStore(world.directory / name / "vendor.sqlite3")
    port = free_udp_port()
    try:
        async with BankClient(mosquitto, credentials.bank, f"{name}-{uuid.uuid4().hex[:6]}") as bank:
            keyring = Keyring.from_announcement(verify_announcement(await bank.keys(timeout=30),
                                                                    credentials.ca_fingerprint, world.clock.now))
            agent = _AGENTS.get(misbehaviour, VendorAgent)(credentials, keyring, bank, store, config=config,
                                                          clock=world.clock)
            site: Any = build_site(agent)
            if misbehaviour is Misbehaviour.SILENT_PAY:
                site = _SilentPay(site)
            context = await aiocoap.Context.create_server_context(site, bind=("::1", port))
            meter = asyncio.create_task(_meter(agent, meter_interval), name=f"hostile-{name}-meter")
            try:
                yield HostileVendor(url=f"coap://[::1]:{port}", agent=agent, store=store)
            finally:
                meter.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await meter
                await context.shutdown()
    finally:
        store.close()
