"""A broker with TLS and client certificates: only certified clients, each limited by the ACL."""

from __future__ import annotations

import queue
import ssl
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from broker.launcher import Mosquitto
from broker.pki import make_pki

pytestmark = pytest.mark.network



def _client(broker: Mosquitto, pki: Path, name: str | None) -> tuple[mqtt.Client, queue.Queue[tuple[str, bytes]]]:
    inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=name or "", protocol=mqtt.MQTTv5)
    client.tls_set(ca_certs=str(pki / "ca.crt"), certfile=str(pki / f"{name}.crt") if name else None,
                   keyfile=str(pki / f"{name}.key") if name else None, tls_version=ssl.PROTOCOL_TLS_CLIENT)
    client.on_message = lambda _c, _u, msg: inbox.put((msg.topic, msg.payload))
    acks: queue.Queue[int] = queue.Queue()
    client.on_subscribe = lambda _c, _u, mid, _codes, _props: acks.put(mid)
    client.user_data_set(acks)
    client.connect("localhost", broker.port)
    client.loop_start()
    return client, inbox


def _subscribe(client: mqtt.Client, topic: str) -> None:
    _, mid = client.subscribe(topic, qos=1)
    assert client.user_data_get().get(timeout=5) == mid


def test_tls_with_client_certificates_and_acl(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    make_pki(pki, ("bank", "alice", "mallory"))
    assert (pki / "alice.key").stat().st_mode & 0o777 == 0o600
    with Mosquitto(tmp_path / "mq", bank="b1", tls_dir=pki) as broker:
        bank, bank_inbox = _client(broker, pki, "bank")
        alice, alice_inbox = _client(broker, pki, "alice")
        mallory, mallory_inbox = _client(broker, pki, "mallory")
        _subscribe(bank, "$share/b1-workers/m2mpay/b1/req/+")
        _subscribe(alice, "m2mpay/b1/resp/alice")
        _subscribe(mallory, "m2mpay/b1/resp/alice")  # the ACL filters every message of it
        _subscribe(mallory, "m2mpay/b1/resp/mallory")
        alice.publish("m2mpay/b1/req/withdraw", b"req", qos=1).wait_for_publish(5)
        assert bank_inbox.get(timeout=5) == ("m2mpay/b1/req/withdraw", b"req")
        bank.publish("m2mpay/b1/resp/alice", b"answer", qos=1).wait_for_publish(5)
        bank.publish("m2mpay/b1/resp/mallory", b"yours", qos=1).wait_for_publish(5)
        assert alice_inbox.get(timeout=5) == ("m2mpay/b1/resp/alice", b"answer")
        assert mallory_inbox.get(timeout=5) == ("m2mpay/b1/resp/mallory", b"yours")  # nothing of alice's first
        mallory.publish("m2mpay/b1/resp/alice", b"forged", qos=1).wait_for_publish(5)  # dropped by the ACL
        bank.publish("m2mpay/b1/resp/alice", b"second", qos=1).wait_for_publish(5)
        assert alice_inbox.get(timeout=5) == ("m2mpay/b1/resp/alice", b"second")  # the forgery never arrived
        # mallory asks for alice's client id: the broker uses the certificate's name instead, so
        # alice is not disconnected and keeps receiving
        impostor = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="alice", protocol=mqtt.MQTTv5)
        impostor.tls_set(ca_certs=str(pki / "ca.crt"), certfile=str(pki / "mallory.crt"),
                         keyfile=str(pki / "mallory.key"), tls_version=ssl.PROTOCOL_TLS_CLIENT)
        impostor.connect("localhost", broker.port)
        impostor.loop_start()
        bank.publish("m2mpay/b1/resp/alice", b"third", qos=1).wait_for_publish(5)
        assert alice_inbox.get(timeout=5) == ("m2mpay/b1/resp/alice", b"third") and alice.is_connected()
        impostor.disconnect()
        impostor.loop_stop()
        for client in (bank, alice, mallory):
            client.disconnect()
            client.loop_stop()
        connected: queue.Queue[bool] = queue.Queue()
        anonymous = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        anonymous.tls_set(ca_certs=str(pki / "ca.crt"), tls_version=ssl.PROTOCOL_TLS_CLIENT)
        anonymous.on_connect = lambda _c, _u, _f, reason, _p: connected.put(not reason.is_failure)
        try:
            anonymous.connect("localhost", broker.port)
            anonymous.loop_start()
            with pytest.raises(queue.Empty):  # no client certificate: never a successful CONNACK
                assert connected.get(timeout=3) is False
                raise queue.Empty
        except (ssl.SSLError, OSError):
            pass  # refused during the handshake itself
        finally:
            anonymous.loop_stop()


@pytest.mark.asyncio
async def test_bank_and_device_over_tls(tmp_path: Path) -> None:
    """The agents log in with their certificates; the ACL keys each reply topic on that name."""
    import asyncio
    import contextlib
    import os

    from agents.bank.keys import init_bank, load_bank
    from agents.bank.server import serve
    from agents.bank.service import BankService
    from agents.mqtt import BankClient, TlsLogin

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
                assert device.reply_topic == "m2mpay/b1/resp/meter-1"
                assert await device.keys()  # the retained announcement reaches a certified device
                answer = await device.request("status", os.urandom(10))  # garbage: a signed refusal comes back
                assert answer and b"bad_" in answer
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            store.close()
