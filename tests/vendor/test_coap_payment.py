"""A payment over real CoAP sockets, a real Mosquitto and a real bank."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiocoap
import aiocoap.error
import pytest
from aiocoap.numbers.codes import Code

from m2mpay.agents.bank import admin
from m2mpay.agents.mqtt import BankClient, TransportError, answer_properties, connect
from m2mpay.agents.vendor.agent import VendorAgent
from m2mpay.agents.vendor.coap import serve_coap
from m2mpay.agents.vendor.store import VendorStore
from m2mpay.broker.launcher import free_udp_port
from m2mpay.protocol import cbor, cose, sealing, wire
from m2mpay.protocol.certificates import cert_hash
from m2mpay.protocol.certificates import verify_certificate
from m2mpay.protocol.messages import Due, FinalReceipt, Offer, OpenSession, Receipt
from m2mpay.protocol.receipts import verify_receipt
from m2mpay.protocol.rules import wallet

from tests.vendor_scene import Scene, open_session

pytestmark = [pytest.mark.asyncio, pytest.mark.network]

WKC, OFFER, SESSIONS = (wire.path_text(path) for path in (wire.WELL_KNOWN_CORE_PATH, wire.OFFER_PATH,
                                                          wire.SESSIONS_PATH))


def _at(session: bytes, leaf: str) -> str:
    """The path of one of a session's resources."""
    return wire.path_text(wire.session_path(session, leaf))


async def test_pay_as_observed_then_close(scene: Scene) -> None:
    world = scene.world
    (wc,) = await world.withdraw(world.user("alice"))
    wkc = (await scene.call(Code.GET, WKC)).payload.decode()
    assert "</offer>" in wkc and "</sessions>" in wkc
    wc, opened = await open_session(scene, wc)
    sid = opened.session
    observation = scene.client.request(aiocoap.Message(code=Code.GET, uri=scene.base + _at(sid, wire.DUE),
                                                       observe=0))
    first = await asyncio.wait_for(observation.response, 5)
    assert Due.decode(first.payload).tokens == 0
    paid = 0
    notifications = aiter(observation.observation)
    for _ in range(3):
        scene.agent.due(opened.session, 2)  # the meter: two more units delivered, at 1 a unit
        due = Due.decode((await asyncio.wait_for(anext(notifications), 5)).payload)
        wc, pay = wallet.reveal(wc, due.tokens)
        receipt = Receipt.decode((await scene.call(Code.POST, _at(sid, wire.PAY), pay.encode())).payload)
        again = Receipt.decode((await scene.call(Code.POST, _at(sid, wire.PAY), pay.encode())).payload)
        assert receipt == again  # a retransmitted token gets the same receipt
        paid += due.tokens
        assert receipt.tokens == paid + 1  # the blocking token was the first of the tokens owed
    observation.observation.cancel()
    assert paid + 1 == 6  # 6 units at 1, tokens of 1: 6 tokens, the blocking one included
    signed = (await scene.call(Code.POST, _at(sid, wire.CLOSE), b"")).payload
    cert = verify_certificate(scene.credentials.cert, world.keys.keyring.ca_key, world.bank, world.clock.now)
    closed = verify_receipt(signed, cert, tip=wc.coin.tip, session=opened.session)
    assert closed.credited == paid + 1 == closed.tokens == admin.balance(world.store, "meter")
    assert closed.pending is None and closed.index == wc.position


async def test_vendor_killed_before_settling_settles_after_restart(scene: Scene) -> None:
    world = scene.world
    (wc,) = await world.withdraw(world.user("alice"))
    wc, opened = await open_session(scene, wc)
    wc, pay = wallet.reveal(wc, 6)
    await scene.call(Code.POST, _at(opened.session, wire.PAY), pay.encode())
    scene.agent.sessions.clear()  # the process dies: memory is gone, the store remains
    scene.agent.store.close()
    reborn = VendorAgent(scene.credentials, world.keys.keyring, scene.agent.bank, VendorStore(scene.store_path),
                         clock=world.clock)
    scene.agent.store = reborn.store
    assert await reborn.recover() == 1
    assert admin.balance(world.store, "meter") == 7
    assert await reborn.recover() == 0  # nothing settles twice


@pytest.mark.parametrize(("path", "body", "content_format", "code", "wire"), [
    (SESSIONS, b"\xff\xfe", wire.CONTENT_FORMAT_CBOR, Code.BAD_REQUEST, "bad_request"),
    (SESSIONS, cbor.encode({"v": 1}), 0, Code.BAD_REQUEST, "bad_request"),
    (SESSIONS, b"\x00" * 5000, wire.CONTENT_FORMAT_CBOR, Code.REQUEST_ENTITY_TOO_LARGE, "too_large"),
    (f"{SESSIONS}/00ff/{wire.PAY}", cbor.encode({"v": 1, "index": 1, "token": b"\x00" * 32}),
     wire.CONTENT_FORMAT_CBOR, Code.NOT_FOUND, "unknown_session"),
], ids=["malformed", "wrong-content-format", "oversize", "unknown-session"])
async def test_bad_input_gets_cbor_error(scene: Scene, path: str, body: bytes, content_format: int, code: Code,
                                         wire: str) -> None:
    response = await scene.call(Code.POST, path, body, content_format)
    assert response.code == code
    assert cbor.decode(response.payload)["code"] == wire
    assert (await scene.call(Code.GET, OFFER)).code == Code.CONTENT  # still serving


async def test_libcoap_client_interop(scene: Scene) -> None:
    tool = shutil.which("coap-client-notls") or shutil.which("coap-client")
    assert tool, "libcoap3-bin is needed (make test installs it)"
    for path in (WKC, OFFER):
        result = await asyncio.to_thread(subprocess.run, [tool, "-m", "get", "-B", "5", scene.base + path],
                                         capture_output=True, timeout=20)
        assert result.returncode == 0, result.stderr
        if path == OFFER:
            assert Offer.decode(result.stdout.rstrip(b"\n")).bank == scene.world.bank
        else:
            assert b"</offer>" in result.stdout


async def test_wrong_or_late_token_is_refused_and_nothing_stored(scene: Scene) -> None:
    world = scene.world
    (wc,) = await world.withdraw(world.user("alice"))
    wc, opened = await open_session(scene, wc)
    pay_uri = _at(opened.session, wire.PAY)
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
    wc, opened = await open_session(scene, wc)
    wc, pay = wallet.reveal(wc, 4)
    assert (await scene.call(Code.POST, _at(opened.session, wire.PAY), pay.encode())).code == Code.CHANGED
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
        await client.subscribe(wire.request_filter(bank), qos=1)

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
        port = free_udp_port()
        try:
            async with serve_coap(agent, "::1", port):
                forged = Scene(world, agent, f"coap://[::1]:{port}", scene.client, tmp_path / "forged.sqlite3",
                               scene.credentials)
                offer = Offer.decode((await forged.call(Code.GET, OFFER)).payload)
                response = await forged.call(Code.POST, SESSIONS, _open_body(forged, first, offer))
                assert response.code == Code.SERVICE_UNAVAILABLE
                assert cbor.decode(response.payload)["code"] == "unavailable"
                response = await forged.call(Code.POST, SESSIONS, _open_body(forged, second, offer))
                assert response.code == Code.CONFLICT and cbor.decode(response.payload)["code"] == "replay"
                assert not agent.sessions
        finally:
            agent.store.close()


def _open_body(scene: Scene, wc: wallet.WalletCoin, offer: Offer) -> bytes:
    wc, auth = wallet.authorize(wc, deadline=offer.deadline, nonce=offer.nonce, cert_hash=cert_hash(offer.cert),
                                now=scene.world.clock.now)
    sealed = sealing.seal(auth.encode(), scene.world.keys.keyring.sealing_key, sealing.info_for_bank(scene.world.bank))
    return OpenSession(coin=wc.coin, sealed=sealed, deadline=offer.deadline, nonce=offer.nonce).encode()


async def test_coap_bind_failure_is_our_transport_error(scene: Scene) -> None:
    """aiocoap and socket errors leave the CoAP side as TransportError, the foreign one as cause."""
    with pytest.raises(TransportError) as info:
        async with serve_coap(scene.agent, "192.0.2.1", free_udp_port()):  # an address this host does not have
            pass
    assert isinstance(info.value.__cause__, (OSError, aiocoap.error.Error))
