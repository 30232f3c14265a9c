"""A broker with TLS and client certificates: only certified clients, each limited by the ACL."""

from __future__ import annotations

import queue
import ssl
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from m2mpay.broker.launcher import Mosquitto
from m2mpay.broker.pki import make_pki
from m2mpay.protocol import envelope, wire
from m2mpay.protocol.errors import ErrorCode, RemoteProtocolError
from m2mpay.protocol.messages import StatusAnswer
from tests.broker.clients import WAIT, TlsClient

pytestmark = pytest.mark.network


def test_tls_with_client_certificates_and_acl(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    make_pki(pki, ("bank", "alice", "mallory"))
    assert (pki / "alice.key").stat().st_mode & 0o777 == 0o600
    withdraw, to_alice, to_mallory = (wire.request_topic("b1", "withdraw"), wire.response_topic("b1", "alice"),
                                      wire.response_topic("b1", "mallory"))
    with Mosquitto(tmp_path / "mq", bank="b1", tls_dir=pki) as broker:
        bank, alice, mallory = (TlsClient(broker, pki, name) for name in ("bank", "alice", "mallory"))
        bank.subscribe(wire.shared_request_filter("b1"))
        alice.subscribe(to_alice)
        mallory.subscribe(to_alice)  # the ACL filters every message of it
        mallory.subscribe(to_mallory)
        alice.publish(withdraw, b"req")
        assert bank.inbox.get(timeout=WAIT) == (withdraw, b"req")
        bank.publish(to_alice, b"answer")
        bank.publish(to_mallory, b"yours")
        assert alice.inbox.get(timeout=WAIT) == (to_alice, b"answer")
        assert mallory.inbox.get(timeout=WAIT) == (to_mallory, b"yours")  # nothing of alice's first
        mallory.publish(to_alice, b"forged")  # dropped by the ACL
        bank.publish(to_alice, b"second")
        assert alice.inbox.get(timeout=WAIT) == (to_alice, b"second")  # the forgery never arrived
        # mallory asks for alice's client id: the broker uses the certificate's name instead, so
        # alice is not disconnected and keeps receiving
        impostor = TlsClient(broker, pki, "mallory", client_id="alice")
        bank.publish(to_alice, b"third")
        assert alice.inbox.get(timeout=WAIT) == (to_alice, b"third") and alice.client.is_connected()
        for client in (impostor, bank, alice, mallory):
            client.close()
        # No client certificate. On TLS 1.2 the broker refuses it inside the handshake; on TLS 1.3
        # the client's side of the handshake completes first, and the broker drops the connection
        # before any CONNACK.
        with pytest.raises(ssl.SSLError, match="HANDSHAKE_FAILURE"):
            anonymous_client(pki, ssl.TLSVersion.TLSv1_2).connect("localhost", broker.port)
        events: queue.Queue[str] = queue.Queue()
        anonymous = anonymous_client(pki, ssl.TLSVersion.TLSv1_3)
        anonymous.on_connect = lambda _c, _u, _f, reason, _p: events.put(f"CONNACK {reason}")
        anonymous.on_disconnect = lambda _c, _u, _f, reason, _p: events.put("disconnected")
        anonymous.connect("localhost", broker.port)
        anonymous.loop_start()
        try:
            assert events.get(timeout=WAIT) == "disconnected"
            assert events.empty()  # never a CONNACK
        finally:
            anonymous.loop_stop()


def anonymous_client(pki: Path, version: ssl.TLSVersion) -> mqtt.Client:
    """An MQTT client that trusts the test CA, speaks only TLS ``version`` and has no certificate."""
    context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    context.minimum_version = context.maximum_version = version
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5, reconnect_on_failure=False)
    client.tls_set_context(context)
    return client


@pytest.mark.asyncio
async def test_bank_and_device_over_tls(tmp_path: Path) -> None:
    """The agents log in with their certificates; the ACL keys each reply topic on that name."""
    import asyncio
    import contextlib

    from m2mpay.agents.bank.keys import init_bank, load_bank
    from m2mpay.agents.bank.server import serve
    from m2mpay.agents.bank.service import BankService
    from m2mpay.agents.mqtt import BankClient, TlsLogin

    pki = tmp_path / "pki"
    make_pki(pki, ("bank", "meter-1"))
    init_bank(tmp_path / "bank", "b1", None, 1_800_000_000, keysets=((100, 100),))
    keys, store = load_bank(tmp_path / "bank", 1_800_000_000)
    with Mosquitto(tmp_path / "mq", bank="b1", tls_dir=pki) as broker:
        url = f"mqtts://localhost:{broker.port}"
        ready = asyncio.Event()
        task = asyncio.create_task(serve(keys, BankService(keys, store), url, ready=ready,
                                         tls=TlsLogin.from_dir(pki, "bank")))
        try:
            await asyncio.wait_for(ready.wait(), 10)
            async with BankClient(url, "b1", "ignored", tls=TlsLogin.from_dir(pki, "meter-1")) as device:
                assert device.reply_topic == wire.response_topic("b1", "meter-1")
                assert await device.keys()  # the retained announcement reaches a certified device
                garbage = b"\xffnot a request"
                answer = await device.request("status", garbage)  # a signed refusal comes back
                with pytest.raises(RemoteProtocolError) as refused:
                    envelope.open_answer(answer, keys.answer_key.public_key(), "b1", "status", StatusAnswer,
                                         request=garbage)
                assert refused.value.code is ErrorCode.BAD_REQUEST
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            store.close()
