"""The security review's CoAP resource-exhaustion finding, over real aiocoap sockets.

"An Observe on any unknown ``/sessions/<hex>/due`` leaves a watcher entry forever; 1,024
``GET /offer`` evict a real user's pending offer; Block1 bodies are reassembled without bound
before the 4 KiB limit applies." Each test floods one part of the vendor's CoAP surface and checks
what the vendor holds afterwards (:meth:`~m2mpay.agents.vendor.coap.VendorSite.held`) and that a real
user is still served.

The vendor is the ``scene``'s agent served on a second port (:func:`tests.vendor_site.served`), so a test can choose
the limits and look at the site.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiocoap
import pytest
from aiocoap.numbers.codes import Code
from aiocoap.optiontypes import BlockOption

from m2mpay.agents.mqtt import BankClient
from m2mpay.agents.vendor.agent import VendorAgent
from m2mpay.agents.vendor.coap import CoapLimits
from m2mpay.agents.vendor.offers import OFFER_TTL
from m2mpay.agents.vendor.store import VendorStore
from m2mpay.protocol import cbor, sealing, wire
from m2mpay.protocol.certificates import cert_hash
from m2mpay.protocol.messages import Due, Offer, OpenSession, SessionOpened
from m2mpay.protocol.rules import wallet
from m2mpay.protocol.wire import CONTENT_FORMAT_CBOR as CBOR
from tests.vendor_scene import Scene, open_session
from tests.vendor_site import WAIT, observation_request, request, served, upload_block

pytestmark = [pytest.mark.asyncio, pytest.mark.network]
OFFER, SESSIONS = wire.path_text(wire.OFFER_PATH), wire.path_text(wire.SESSIONS_PATH)


def error_code(response: aiocoap.Message) -> str:
    """The wire code of a CBOR error body."""
    assert response.opt.content_format == CBOR, (response.code, response.payload)
    return str(cbor.decode(response.payload)["code"])


async def upload(scene: Scene, path: str, body: bytes, szx: int) -> aiocoap.Message:
    """POST ``body`` in blocks of ``2**(szx+4)`` bytes, as a constrained client would."""
    size = 2 ** (szx + 4)
    chunks = [body[i:i + size] for i in range(0, len(body), size)]
    for number, chunk in enumerate(chunks):
        more = number < len(chunks) - 1
        response = await request(scene, upload_block(scene, path, chunk, number, more, szx))
        if more:
            assert response.code == Code.CONTINUE, (number, response.code, response.payload)
    return response


async def download(scene: Scene, path: str, szx: int) -> bytes:
    """GET ``path`` in blocks of ``2**(szx+4)`` bytes."""
    body: bytes = b""
    number = 0
    while True:
        message = aiocoap.Message(code=Code.GET, uri=scene.base + path)
        message.opt.block2 = BlockOption.BlockwiseTuple(number, False, szx)
        response = await request(scene, message)
        assert response.code == Code.CONTENT, (number, response.code, response.payload)
        body += bytes(response.payload)
        if response.opt.block2 is None or not response.opt.block2.more:
            return body
        number += 1


def observe(scene: Scene, sid: bytes) -> Any:
    """Start observing ``/sessions/{sid}/due``; the client's request handle."""
    return scene.client.request(observation_request(scene, sid))


class RawPeer(asyncio.DatagramProtocol):
    """A bare CoAP-over-UDP client: aiocoap's own client never deregisters an observation."""

    def __init__(self) -> None:
        self.received: asyncio.Queue[aiocoap.Message] = asyncio.Queue()
        self.transport: Any = None
        self.mid = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.received.put_nowait(aiocoap.Message.decode(data))

    async def exchange(self, message: aiocoap.Message, token: bytes) -> aiocoap.Message:
        """Send ``message`` as a CON with ``token``; its piggybacked answer."""
        assert self.transport is not None
        self.mid += 1
        message.mtype, message.mid, message.token = aiocoap.CON, self.mid, token
        self.transport.sendto(message.encode())
        async with asyncio.timeout(WAIT):
            while True:
                answer = await self.received.get()
                if answer.mtype == aiocoap.ACK and answer.mid == self.mid:
                    return answer


@contextlib.asynccontextmanager
async def raw_peer(scene: Scene) -> AsyncIterator[RawPeer]:
    port = int(scene.base.rsplit(":", 1)[1])
    transport, peer = await asyncio.get_running_loop().create_datagram_endpoint(RawPeer, remote_addr=("::1", port))
    try:
        yield peer
    finally:
        transport.close()


async def eventually(check: Any, what: str) -> None:
    """Wait (bounded) until ``check()`` is true."""
    try:
        async with asyncio.timeout(WAIT):
            while not check():
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"not within {WAIT} s: {what}") from None


def open_body(scene: Scene, wc: wallet.WalletCoin, offer: Offer) -> tuple[wallet.WalletCoin, bytes]:
    """The ``POST /sessions`` body that opens ``offer`` with ``wc``."""
    wc, auth = wallet.authorize(wc, deadline=offer.deadline, nonce=offer.nonce, cert_hash=cert_hash(offer.cert),
                                now=scene.world.clock.now)
    sealed = sealing.seal(auth.encode(), scene.world.keys.keyring.sealing_key, sealing.info_for_bank(scene.world.bank))
    return wc, OpenSession(coin=wc.coin, sealed=sealed, deadline=offer.deadline, nonce=offer.nonce).encode()


async def get_offer(scene: Scene) -> Offer:
    return Offer.decode((await scene.call(Code.GET, OFFER)).payload)


# --- Observe -------------------------------------------------------------------------------

async def test_observe_unknown_session_leaves_no_watcher(scene: Scene) -> None:
    async with served(scene) as vendor:
        for _ in range(300):
            response = await request(vendor.scene, observation_request(vendor.scene, os.urandom(16)))
            assert response.code == Code.NOT_FOUND and error_code(response) == "unknown_session"
        held = vendor.site.held()
        assert (held.watchers, held.watched_sessions) == (0, 0)


async def test_observe_watchers_bounded_per_session(scene: Scene) -> None:
    async with served(scene) as vendor:
        (wc,) = await scene.world.withdraw(scene.world.user("alice"))
        wc, opened = await open_session(vendor.scene, wc)
        limit = CoapLimits().watchers_per_session
        observations = [observe(vendor.scene, opened.session) for _ in range(limit + 3)]
        for observation in observations:
            assert (await asyncio.wait_for(observation.response, WAIT)).code == Code.CONTENT
        assert vendor.site.held().watchers == limit
        scene.agent.due(opened.session, 2)  # 2 units at 1: a token more than the blocking one
        newest = await asyncio.wait_for(anext(aiter(observations[-1].observation)), WAIT)
        assert Due.decode(newest.payload).tokens == 1  # the latest observer is the one kept
        for observation in observations:
            if not observation.observation.cancelled:  # the ones pushed out were ended by the vendor
                observation.observation.cancel()


@pytest.mark.parametrize("limits", [CoapLimits(watchers_per_session=8, watchers_per_peer=3),
                                    CoapLimits(watchers_per_session=8, watchers_total=3)],
                         ids=["per-peer", "total"])
async def test_observe_watchers_bounded_per_peer_and_in_total(scene: Scene, limits: CoapLimits) -> None:
    async with served(scene, limits) as vendor:
        (wc,) = await scene.world.withdraw(scene.world.user("alice"))
        wc, opened = await open_session(vendor.scene, wc)
        kept = [observe(vendor.scene, opened.session) for _ in range(3)]
        for observation in kept:
            assert (await asyncio.wait_for(observation.response, WAIT)).code == Code.CONTENT
        refused = await request(vendor.scene, observation_request(vendor.scene, opened.session))
        assert refused.code == Code.SERVICE_UNAVAILABLE and error_code(refused) == "unavailable"
        assert vendor.site.held().watchers == 3
        for observation in kept:
            observation.observation.cancel()


async def test_observe_watcher_removed_when_observation_ends_or_session_closes(scene: Scene) -> None:
    async with served(scene) as vendor:
        (wc,) = await scene.world.withdraw(scene.world.user("alice"))
        wc, opened = await open_session(vendor.scene, wc)
        async with raw_peer(vendor.scene) as peer:
            token = os.urandom(4)
            first = await peer.exchange(observation_request(vendor.scene, opened.session), token)
            assert first.code == Code.CONTENT and first.opt.observe is not None
            assert vendor.site.held().watchers == 1
            deregister = observation_request(vendor.scene, opened.session)
            deregister.opt.observe = 1  # RFC 7641 §3.6: the same token, Observe 1
            assert (await peer.exchange(deregister, token)).code == Code.CONTENT
            await eventually(lambda: vendor.site.held().watched_sessions == 0, "deregistered watcher removed")
        kept = observe(vendor.scene, opened.session)
        await asyncio.wait_for(kept.response, WAIT)
        assert vendor.site.held().watchers == 1
        await scene.agent.close(opened.session)  # the settler's path, not a CoAP close
        assert vendor.site.held().watched_sessions == 0
        with contextlib.suppress(StopAsyncIteration, aiocoap.error.Error):
            last = await asyncio.wait_for(anext(aiter(kept.observation)), WAIT)
            assert not last.code.is_successful()  # the observation ends with the session


# --- Offers --------------------------------------------------------------------------------

async def test_offer_flood_does_not_evict_pending_offer(scene: Scene) -> None:
    async with served(scene) as vendor:
        (wc,) = await scene.world.withdraw(scene.world.user("alice"))
        offer = await get_offer(vendor.scene)
        for _ in range(1100):
            assert (await vendor.scene.call(Code.GET, OFFER)).code == Code.CONTENT
        assert vendor.site.held().offers == 0  # a flood of offers holds nothing
        wc, body = open_body(vendor.scene, wc, offer)
        response = await vendor.scene.call(Code.POST, SESSIONS, body)
        assert response.code == Code.CREATED, response.payload
        assert vendor.site.held().offers == 1  # only the opened offer, until it expires


async def test_opened_offer_cannot_open_a_second_session(scene: Scene) -> None:
    async with served(scene) as vendor:
        first, second = await scene.world.withdraw(scene.world.user("alice"), 2)
        offer = await get_offer(vendor.scene)
        first, body = open_body(vendor.scene, first, offer)
        assert (await vendor.scene.call(Code.POST, SESSIONS, body)).code == Code.CREATED
        second, replayed = open_body(vendor.scene, second, offer)
        response = await vendor.scene.call(Code.POST, SESSIONS, replayed)
        assert response.code == Code.CONFLICT and error_code(response) == "replay"
        assert len(scene.agent.sessions) == 1


@pytest.mark.parametrize("change", ["nonce", "deadline", "expired"])
async def test_offer_nonce_is_a_mac_over_its_terms(scene: Scene, change: str) -> None:
    async with served(scene) as vendor:
        (wc,) = await scene.world.withdraw(scene.world.user("alice"))
        offer = await get_offer(vendor.scene)
        if change == "nonce":
            offer = dataclasses.replace(offer, nonce=offer.nonce[:-1] + bytes([offer.nonce[-1] ^ 1]))
        elif change == "deadline":
            offer = dataclasses.replace(offer, deadline=offer.deadline + 600)
        else:
            scene.world.clock.now += OFFER_TTL + 1  # T is still ahead, but the offer is stale
        wc, body = open_body(vendor.scene, wc, offer)
        response = await vendor.scene.call(Code.POST, SESSIONS, body)
        expected = {"nonce": "bad_request", "deadline": "bad_request", "expired": "deadline"}[change]
        assert response.code.class_ == 4 and error_code(response) == expected
        assert not scene.agent.sessions and vendor.site.held().offers == 0


async def test_offer_opens_after_vendor_restart(scene: Scene, tmp_path: Path) -> None:
    (wc,) = await scene.world.withdraw(scene.world.user("alice"))
    offer = await get_offer(scene)  # from the vendor before it restarts
    reborn = VendorAgent(scene.credentials, scene.world.keys.keyring, scene.agent.bank,
                         VendorStore(tmp_path / "reborn.sqlite3"), clock=scene.world.clock)
    try:
        async with served(scene, agent=reborn) as vendor:
            wc, body = open_body(vendor.scene, wc, offer)
            response = await vendor.scene.call(Code.POST, SESSIONS, body)
            assert response.code == Code.CREATED, response.payload
            await reborn.close(SessionOpened.decode(response.payload).session)
    finally:
        reborn.store.close()


# --- Block-wise transfers ------------------------------------------------------------------

async def test_block1_body_limit_enforced_during_reassembly(scene: Scene) -> None:
    async with served(scene) as vendor:
        limit = CoapLimits().max_body
        for number in range(limit // 1024):
            response = await request(vendor.scene, upload_block(vendor.scene, SESSIONS, bytes(1024), number, True))
            assert response.code == Code.CONTINUE
        assert vendor.site.held().upload_bytes == limit
        response = await request(vendor.scene, upload_block(vendor.scene, SESSIONS, bytes(1024), limit // 1024,
                                                            True))
        assert response.code == Code.REQUEST_ENTITY_TOO_LARGE and error_code(response) == "too_large"
        assert response.opt.size1 == limit  # RFC 7959 §2.9.3: tell the client what would fit
        assert vendor.site.held().uploads == 0  # the partial body is dropped
        announced = upload_block(vendor.scene, SESSIONS, bytes(1024), 0, True)
        announced.opt.size1 = limit + 1  # a Size1 that will not fit is refused before anything is kept
        response = await request(vendor.scene, announced)
        assert response.code == Code.REQUEST_ENTITY_TOO_LARGE and vendor.site.held().uploads == 0


async def test_block1_uploads_bounded_per_peer(scene: Scene) -> None:
    async with served(scene) as vendor:
        for i in range(50):
            response = await request(vendor.scene, upload_block(vendor.scene, SESSIONS, bytes(1024), 0, True,
                                                                query=(f"n={i}",)))
            assert response.code == Code.CONTINUE
        held = vendor.site.held()
        assert held.uploads == CoapLimits().transfers_per_peer  # a peer's newest uploads are kept
        assert held.upload_bytes == 1024 * held.uploads


async def test_block1_uploads_bounded_in_total(scene: Scene) -> None:
    async with served(scene, CoapLimits(transfers_per_peer=8, transfers_total=3)) as vendor:
        for i in range(3):
            response = await request(vendor.scene, upload_block(vendor.scene, SESSIONS, bytes(1024), 0, True,
                                                                query=(f"n={i}",)))
            assert response.code == Code.CONTINUE
        response = await request(vendor.scene, upload_block(vendor.scene, SESSIONS, bytes(1024), 0, True,
                                                            query=("n=3",)))
        assert response.code == Code.SERVICE_UNAVAILABLE and error_code(response) == "unavailable"
        assert vendor.site.held().uploads == 3


async def test_block1_open_in_small_blocks_still_works(scene: Scene) -> None:
    async with served(scene) as vendor:
        (wc,) = await scene.world.withdraw(scene.world.user("alice"))
        wc, body = open_body(vendor.scene, wc, await get_offer(vendor.scene))
        response = await upload(vendor.scene, SESSIONS, body, szx=2)  # 64-byte blocks
        assert response.code == Code.CREATED, response.payload
        assert SessionOpened.decode(response.payload).position == wc.position
        assert vendor.site.held().uploads == 0


async def test_block2_downloads_bounded_per_peer(scene: Scene) -> None:
    async with served(scene) as vendor:
        # 16-byte blocks work
        assert Offer.decode(await download(vendor.scene, OFFER, szx=0)).bank == vendor.scene.world.bank
        for i in range(50):
            message = aiocoap.Message(code=Code.GET, uri=f"{vendor.scene.base}/offer?n={i}")
            message.opt.block2 = BlockOption.BlockwiseTuple(0, False, 0)
            assert (await request(vendor.scene, message)).code == Code.CONTENT
        held = vendor.site.held()
        assert held.downloads <= CoapLimits().transfers_per_peer
        assert held.download_bytes <= held.downloads * 512


# --- Requests waiting for the bank ---------------------------------------------------------

async def test_opens_waiting_for_the_bank_bounded_per_peer(scene: Scene, mosquitto: str,
                                                           tmp_path: Path) -> None:
    """With the bank silent, a peer holding one valid coin may keep only a few opens waiting."""
    (wc,) = await scene.world.withdraw(scene.world.user("alice"))
    async with BankClient(mosquitto, "silent", f"silent-{uuid.uuid4().hex[:6]}", timeout=2.0, retries=1) as silent:
        stalled = VendorAgent(scene.credentials, scene.world.keys.keyring, silent,
                              VendorStore(tmp_path / "stalled.sqlite3"), clock=scene.world.clock)
        try:
            async with served(scene, agent=stalled) as vendor:
                limit = CoapLimits().waiting_per_peer
                bodies = [open_body(vendor.scene, wc, await get_offer(vendor.scene))[1]
                          for _ in range(limit + 1)]
                calls = [asyncio.create_task(vendor.scene.call(Code.POST, SESSIONS, body)) for body in bodies]
                done, pending = await asyncio.wait(calls, timeout=1.5, return_when=asyncio.FIRST_COMPLETED)
                assert len(done) == 1 and vendor.site.held().waiting == limit
                refused = done.pop().result()
                assert refused.code == Code.SERVICE_UNAVAILABLE and error_code(refused) == "unavailable"
                for answer in await asyncio.gather(*pending):
                    assert answer.code == Code.SERVICE_UNAVAILABLE  # the silent bank
                assert vendor.site.held().waiting == 0 and not stalled.sessions
        finally:
            stalled.store.close()
