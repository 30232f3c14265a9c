"""A vendor agent served over real CoAP sockets, its bank served over the test Mosquitto: the
``scene`` fixture (``tests/plugins/vendors.py``) and what tests do with it."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

import aiocoap
from aiocoap.numbers.codes import Code

from m2mpay.agents.vendor.agent import Credentials, VendorAgent
from m2mpay.protocol import sealing, wire
from m2mpay.protocol.certificates import cert_hash
from m2mpay.protocol.messages import Offer, OpenSession, SessionOpened
from m2mpay.protocol.rules import wallet
from m2mpay.protocol.wire import CONTENT_FORMAT_CBOR as CBOR
from tests.bank_world import BankWorld

__all__ = ["CALL_TIMEOUT", "Scene", "open_session"]

CALL_TIMEOUT = 10.0
"""Seconds one CoAP request of a test may take, retransmissions included."""


@dataclass
class Scene:
    """The bank, the vendor agent serving at ``base``, a CoAP client, and the vendor's files."""

    world: BankWorld
    agent: VendorAgent
    base: str
    client: aiocoap.Context
    store_path: Path
    credentials: Credentials

    async def call(self, code: Code, path: str, body: bytes | None = None, content_format: int | None = CBOR,
                   ) -> aiocoap.Message:
        """One request to the vendor; its response (whatever the code)."""
        msg = aiocoap.Message(code=code, uri=self.base + path, payload=body or b"")
        if body is not None and content_format is not None:
            msg.opt.content_format = content_format
        async with asyncio.timeout(CALL_TIMEOUT):
            return await self.client.request(msg).response


async def open_session(scene: Scene, wc: wallet.WalletCoin) -> tuple[wallet.WalletCoin, SessionOpened]:
    """Take the vendor's offer with ``wc`` as a wallet does; the coin and the opened session."""
    offer = Offer.decode((await scene.call(Code.GET, wire.path_text(wire.OFFER_PATH))).payload)
    wc, auth = wallet.authorize(wc, deadline=offer.deadline, nonce=offer.nonce, cert_hash=cert_hash(offer.cert),
                                now=scene.world.clock.now)
    sealed = sealing.seal(auth.encode(), scene.world.keys.keyring.sealing_key, sealing.info_for_bank(scene.world.bank))
    body = OpenSession(coin=wc.coin, sealed=sealed, deadline=offer.deadline, nonce=offer.nonce).encode()
    response = await scene.call(Code.POST, wire.path_text(wire.SESSIONS_PATH), body)
    assert response.code == Code.CREATED, response.payload
    return wc, SessionOpened.decode(response.payload)
