"""A payment over real CoAP sockets, a real Mosquitto and a real bank."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiocoap
import aiocoap.error
import pytest
import pytest_asyncio
from aiocoap.numbers.codes import Code

from m2mpay.agents.bank import admin
from m2mpay.agents.bank.server import serve
from m2mpay.agents.mqtt import BankClient, TransportError, answer_properties, connect
from m2mpay.agents.vendor.agent import Credentials, VendorAgent
from m2mpay.agents.vendor.coap import CBOR, serve_coap
from m2mpay.agents.vendor.store import VendorStore
from m2mpay.broker.launcher import free_udp_port
from m2mpay.protocol import cbor, cose, sealing
from m2mpay.protocol.certificates import cert_hash
from m2mpay.protocol.certificates import verify_certificate
from m2mpay.protocol.messages import Due, FinalReceipt, Offer, OpenSession, Receipt, SessionOpened
from m2mpay.protocol.receipts import verify_receipt
from m2mpay.protocol.rules import wallet

from ..bank.conftest import BANK, BankWorld

pytestmark = [pytest.mark.asyncio, pytest.mark.network]


def _free_udp_port() -> int:
    return free_udp_port()


@dataclass
class Scene:
    world: BankWorld
    agent: VendorAgent
    base: str
    client: aiocoap.Context
    store_path: Path
    credentials: Credentials

    async def call(self, code: Code, path: str, body: bytes | None = None, content_format: int | None = CBOR,
                   ) -> aiocoap.Message:
        msg = aiocoap.Message(code=code, uri=self.base + path, payload=body or b"")
        if body is not None and content_format is not None:
            msg.opt.content_format = content_format
        async with asyncio.timeout(10):
            return await self.client.request(msg).response


@pytest_asyncio.fixture
async def scene(world: BankWorld, mosquitto: str, tmp_path: Path) -> AsyncIterator[Scene]:
    ready = asyncio.Event()
    bank_task = asyncio.create_task(serve(world.keys, world.service, mosquitto, ready=ready))
    await asyncio.wait_for(ready.wait(), 10)
    vendor = world.vendor("meter")
    credentials = Credentials(vendor="meter", account=vendor.account, key=vendor.key, cert=vendor.cert, bank=BANK,
                              ca_fingerprint=world.keys.fingerprint)
    port = _free_udp_port()
    store_path = tmp_path / "vendor.sqlite3"
    async with BankClient(mosquitto, BANK, f"meter-{uuid.uuid4().hex[:6]}") as bank:
        agent = VendorAgent(credentials, world.keys.keyring, bank, VendorStore(store_path), clock=world.clock)
        async with serve_coap(agent, "::1", port):
            client = await aiocoap.Context.create_client_context()
            try:
                yield Scene(world, agent, f"coap://[::1]:{port}", client, store_path, credentials)
            finally:
                await client.shutdown()
                agent.store.close()
    bank_task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await bank_task


async def _open(scene: Scene, wc: wallet.WalletCoin) -> tuple[wallet.WalletCoin, SessionOpened]:
    offer = Offer.decode((await scene.call(Code.GET, "/offer")).payload)
    wc, auth = wallet.authorize(wc, deadline=offer.deadline, nonce=offer.nonce, cert_hash=cert_hash(offer.cert),
                                now=scene.world.clock.now)
    sealed = sealing.seal(auth.encode(), scene.world.keys.keyring.sealing_key, sealing.info_for_bank(BANK))
    body = OpenSession(coin=wc.coin, sealed=sealed, deadline=offer.deadline, nonce=offer.nonce).encode()
    response = await scene.call(Code.POST, "/sessions", body)
    assert response.code == Code.CREATED, response.payload
    return wc, SessionOpened.decode(response.payload)


async def test_pay_as_observed_then_close(scene: Scene) -> None:
    world = scene.world
    (wc,) = await world.withdraw(world.user("alice"))
    wkc = (await scene.call(Code.GET, "/.well-known/core")).payload.decode()
    assert "</offer>" in wkc and "</sessions>" in wkc
    wc, opened = await _open(scene, wc)
    sid = opened.session.hex()
    observation = scene.client.request(aiocoap.Message(code=Code.GET, uri=f"{scene.base}/sessions/{sid}/due",
                                                       observe=0))
    first = await asyncio.wait_for(observation.response, 5)
    assert Due.decode(first.payload).tokens == 0
    paid = 0
    notifications = aiter(observation.observation)
    for _ in range(3):
        scene.agent.due(opened.session, 2)  # the meter: two more units delivered, at 1 a unit
        due = Due.decode((await asyncio.wait_for(anext(notifications), 5)).payload)
        wc, pay = wallet.reveal(wc, due.tokens)
        receipt = Receipt.decode((await scene.call(Code.POST, f"/sessions/{sid}/pay", pay.encode())).payload)
        again = Receipt.decode((await scene.call(Code.POST, f"/sessions/{sid}/pay", pay.encode())).payload)
        assert receipt == again  # a retransmitted token gets the same receipt
        paid += due.tokens
        assert receipt.tokens == paid + 1  # the blocking token was the first of the tokens owed
    observation.observation.cancel()
    assert paid + 1 == 6  # 6 units at 1, tokens of 1: 6 tokens, the blocking one included
    signed = (await scene.call(Code.POST, f"/sessions/{sid}/close", b"")).payload
    cert = verify_certificate(scene.credentials.cert, world.keys.keyring.ca_key, BANK, world.clock.now)
    closed = verify_receipt(signed, cert, tip=wc.coin.tip, session=opened.session)
    assert closed.credited == paid + 1 == closed.tokens == admin.balance(world.store, "meter")
    assert closed.pending is None and closed.index == wc.position


async def test_vendor_killed_before_settling_settles_after_restart(scene: Scene) -> None:
    world = scene.world
    (wc,) = await world.withdraw(world.user("alice"))
    wc, opened = await _open(scene, wc)
    wc, pay = wallet.reveal(wc, 6)
    await scene.call(Code.POST, f"/sessions/{opened.session.hex()}/pay", pay.encode())
    scene.agent.sessions.clear()  # the process dies: memory is gone, the store remains
    scene.agent.store.close()
    reborn = VendorAgent(scene.credentials, world.keys.keyring, scene.agent.bank, VendorStore(scene.store_path),
                         clock=world.clock)
    scene.agent.store = reborn.store
    assert await reborn.recover() == 1
    assert admin.balance(world.store, "meter") == 7
    assert await reborn.recover() == 0  # nothing settles twice


@pytest.mark.parametrize(("path", "body", "content_format", "code", "wire"), [
    ("/sessions", b"\xff\xfe", CBOR, Code.BAD_REQUEST, "bad_request"),
    ("/sessions", cbor.encode({"v": 1}), 0, Code.BAD_REQUEST, "bad_request"),
    ("/sessions", b"\x00" * 5000, CBOR, Code.REQUEST_ENTITY_TOO_LARGE, "too_large"),
    ("/sessions/00ff/pay", cbor.encode({"v": 1, "index": 1, "token": b"\x00" * 32}), CBOR, Code.NOT_FOUND,
     "unknown_session"),
], ids=["malformed", "wrong-content-format", "oversize", "unknown-session"])
async def test_bad_input_gets_cbor_error(scene: Scene, path: str, body: bytes, content_format: int, code: Code,
                                         wire: str) -> None:
    response = await scene.call(Code.POST, path, body, content_format)
    assert response.code == code
    assert cbor.decode(response.payload)["code"] == wire
    assert (await scene.call(Code.GET, "/offer")).code == Code.CONTENT  # still serving


async def test_libcoap_client_interop(scene: Scene) -> None:
    tool = shutil.which("coap-client-notls") or shutil.which("coap-client")
    assert tool, "libcoap3-bin is needed (make test installs it)"
    for path in ("/.well-known/core", "/offer"):
        result = await asyncio.to_thread(subprocess.run, [tool, "-m", "get", "-B", "5", scene.base + path],
                                         capture_output=True, timeout=20)
        assert result.returncode == 0, result.stderr
        if path == "/offer":
            assert Offer.decode(result.stdout.rstrip(b"\n")).bank == BANK
        else:
            assert b"</offer>" in result.stdout


async def test_wrong_or_late_token_is_refused_and_nothing_stored(scene: Scene) -> None:
    world = scene.world
    (wc,) = await world.withdraw(world.user("alice"))
    wc, opened = await _open(scene, wc)
    pay_uri = f"/sessions/{opened.session.hex()}/pay"
    wc, pay = wallet.reveal(wc, 2)
    forged = cbor.encode({"v": 1, "index": pay.index, "token": bytes(32)})
    response = await scene.call(Code.POST, pay_uri, forged)
    assert response.code == Code.FORBIDDEN and cbor.decode(response.payload)["code"] == "chain_mismatch"
    held = scene.agent.store.session(opened.session)
    assert held is not None and held.paid == 1  # only the blocking token
    world.clock.now = opened.deadline  # too late: the coin's block ends now
    response = await scene.call(Code.POST, pay_uri, pay.encode())
    assert response.code == Code.FORBIDDEN and cbor.decode(response.payload)["code"] == "deadline"
    held = scene.agent.store.session(opened.session)
    assert held is not None and held.paid == 1


async def test_retry_of_pending_settlements_leaves_a_close_in_progress_alone(scene: Scene) -> None:
    """The settler resends unanswered settlements every second; one that a close is waiting for
    belongs to that close (found when a broker restart slowed a close down: both applied the
    answer, and the close failed with "settled not allowed in state closed")."""
    world = scene.world
    (wc,) = await world.withdraw(world.user("alice"))
    wc, opened = await _open(scene, wc)
    wc, pay = wallet.reveal(wc, 4)
    assert (await scene.call(Code.POST, f"/sessions/{opened.session.hex()}/pay", pay.encode())).code == Code.CHANGED
    closing = asyncio.create_task(scene.agent.close(opened.session))
    await asyncio.sleep(0)  # the close has written its settlement to the outbox and is waiting
    assert len(scene.agent.store.pending()) == 1
    assert await scene.agent.retry_pending() == 0
    closed = FinalReceipt.decode(cose.decode_sign1(await closing).payload)
    assert closed.credited == 5 == admin.balance(world.store, "meter")
    held = scene.agent.store.session(opened.session)
    assert held is not None and held.state == "closed" and held.credited == 5


@contextlib.asynccontextmanager
async def _forger(url: str, bank: str) -> AsyncIterator[None]:
    """A responder on ``bank``'s request topics that answers everything with random bytes."""
    async with connect(url, f"forger-{uuid.uuid4().hex[:6]}") as client:
        await client.subscribe(f"m2mpay/{bank}/req/+", qos=1)

        async def answer() -> None:
            async for message in client.messages:
                props = message.properties
                await client.publish(props.ResponseTopic, os.urandom(64), qos=1,  # type: ignore[union-attr]
                                     properties=answer_properties(props.CorrelationData))  # type: ignore[union-attr]

        task = asyncio.create_task(answer())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def test_open_whose_answer_does_not_verify_keeps_the_offer_used(scene: Scene, mosquitto: str,
                                                                      tmp_path: Path) -> None:
    """An answer to the block that does not verify leaves the block unanswered — the coin may be
    blocked — so the user gets 5.03 and the offer opens nothing else (it used to be freed)."""
    world = scene.world
    first, second = await world.withdraw(world.user("alice"), 2)
    async with _forger(mosquitto, "forger"), \
            BankClient(mosquitto, "forger", f"meter-{uuid.uuid4().hex[:6]}", timeout=2.0, retries=1) as bank:
        agent = VendorAgent(scene.credentials, world.keys.keyring, bank, VendorStore(tmp_path / "forged.sqlite3"),
                            clock=world.clock)
        port = _free_udp_port()
        try:
            async with serve_coap(agent, "::1", port):
                forged = Scene(world, agent, f"coap://[::1]:{port}", scene.client, tmp_path / "forged.sqlite3",
                               scene.credentials)
                offer = Offer.decode((await forged.call(Code.GET, "/offer")).payload)
                response = await forged.call(Code.POST, "/sessions", _open_body(forged, first, offer))
                assert response.code == Code.SERVICE_UNAVAILABLE and cbor.decode(response.payload)["code"] == "unavailable"
                response = await forged.call(Code.POST, "/sessions", _open_body(forged, second, offer))
                assert response.code == Code.CONFLICT and cbor.decode(response.payload)["code"] == "replay"
                assert not agent.sessions
        finally:
            agent.store.close()


def _open_body(scene: Scene, wc: wallet.WalletCoin, offer: Offer) -> bytes:
    wc, auth = wallet.authorize(wc, deadline=offer.deadline, nonce=offer.nonce, cert_hash=cert_hash(offer.cert),
                                now=scene.world.clock.now)
    sealed = sealing.seal(auth.encode(), scene.world.keys.keyring.sealing_key, sealing.info_for_bank(BANK))
    return OpenSession(coin=wc.coin, sealed=sealed, deadline=offer.deadline, nonce=offer.nonce).encode()


async def test_coap_bind_failure_is_our_transport_error(scene: Scene) -> None:
    """aiocoap and socket errors leave the CoAP side as TransportError, the foreign one as cause."""
    with pytest.raises(TransportError) as info:
        async with serve_coap(scene.agent, "192.0.2.1", _free_udp_port()):  # an address this host does not have
            pass
    assert isinstance(info.value.__cause__, (OSError, aiocoap.error.Error))
