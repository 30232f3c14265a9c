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
from tests.broker.clients import WAIT, TlsClient, tls_login

pytestmark = pytest.mark.network


def test_tls_with_client_certificates_and_acl(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    make_pki(pki, ("bank", "alice", "mallory"))
    assert (pki / "alice.key").stat().st_mode & 0o777 == 0o600
    with Mosquitto(tmp_path / "mq", bank="b1", tls_dir=pki) as broker:
        bank, alice, mallory = (TlsClient(broker, pki, name) for name in ("bank", "alice", "mallory"))
        bank.subscribe("$share/b1-workers/m2mpay/b1/req/+")
        alice.subscribe("m2mpay/b1/resp/alice")
        mallory.subscribe("m2mpay/b1/resp/alice")  # the ACL filters every message of it
        mallory.subscribe("m2mpay/b1/resp/mallory")
        alice.publish("m2mpay/b1/req/withdraw", b"req")
        assert bank.inbox.get(timeout=WAIT) == ("m2mpay/b1/req/withdraw", b"req")
        bank.publish("m2mpay/b1/resp/alice", b"answer")
        bank.publish("m2mpay/b1/resp/mallory", b"yours")
        assert alice.inbox.get(timeout=WAIT) == ("m2mpay/b1/resp/alice", b"answer")
        assert mallory.inbox.get(timeout=WAIT) == ("m2mpay/b1/resp/mallory", b"yours")  # nothing of alice's first
        mallory.publish("m2mpay/b1/resp/alice", b"forged")  # dropped by the ACL
        bank.publish("m2mpay/b1/resp/alice", b"second")
        assert alice.inbox.get(timeout=WAIT) == ("m2mpay/b1/resp/alice", b"second")  # the forgery never arrived
        # mallory asks for alice's client id: the broker uses the certificate's name instead, so
        # alice is not disconnected and keeps receiving
        impostor = TlsClient(broker, pki, "mallory", client_id="alice")
        bank.publish("m2mpay/b1/resp/alice", b"third")
        assert alice.inbox.get(timeout=WAIT) == ("m2mpay/b1/resp/alice", b"third") and alice.client.is_connected()
        for client in (impostor, bank, alice, mallory):
            client.close()
        connected: queue.Queue[bool] = queue.Queue()
        anonymous = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        tls_login(anonymous, pki, None)
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
                assert device.reply_topic == "m2mpay/b1/resp/meter-1"
                assert await device.keys()  # the retained announcement reaches a certified device
                answer = await device.request("status", os.urandom(10))  # garbage: a signed refusal comes back
                assert answer and b"bad_" in answer
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            store.close()
