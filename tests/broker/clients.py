"""Real MQTT v5 clients for the broker tests, each logged in with a certificate of a test PKI.

Every wait is bounded by ``WAIT``. A client the broker drops stays down (no automatic
reconnection), so a test sees exactly what the broker did.
"""

from __future__ import annotations

import queue
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from m2mpay.broker.launcher import Mosquitto
from m2mpay.broker.pki import make_pki

__all__ = ["WAIT", "TlsClient", "broker_rss_kib", "pki", "tls_login"]

WAIT = 5.0
"""Seconds any single broker round trip may take on loopback before a test gives up."""

CLIENTS = ("bank", "alice", "mallory")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A CA, the broker's certificate and certificates for ``bank``, ``alice`` and ``mallory``."""
    directory = tmp_path_factory.mktemp("pki")
    make_pki(directory, CLIENTS)
    yield directory


def tls_login(client: mqtt.Client, pki: Path, name: str | None) -> None:
    """Trust the test CA and, with a name, present that client's certificate."""
    client.tls_set(ca_certs=str(pki / "ca.crt"), certfile=str(pki / f"{name}.crt") if name else None,
                   keyfile=str(pki / f"{name}.key") if name else None, tls_version=ssl.PROTOCOL_TLS_CLIENT)


class TlsClient:
    """A connected MQTT v5 client: what it received, its PUBACKs, and why it was disconnected."""

    def __init__(self, broker: Mosquitto, pki: Path, name: str, *, client_id: str | None = None,
                 session_expiry: int = 0) -> None:
        self.name = name
        self.inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.disconnected = threading.Event()
        self.disconnect_reason: ReasonCode | None = None
        self._subacks: queue.Queue[tuple[int, list[ReasonCode]]] = queue.Queue()
        self._pubacks: dict[int, ReasonCode] = {}
        self._acked = threading.Condition()
        connected: queue.Queue[ReasonCode] = queue.Queue()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id or name, protocol=mqtt.MQTTv5,
                                  reconnect_on_failure=False)
        tls_login(self.client, pki, name)
        self.client.on_connect = lambda _c, _u, _f, reason, _p: connected.put(reason)
        self.client.on_message = lambda _c, _u, msg: self.inbox.put((msg.topic, bytes(msg.payload)))
        self.client.on_subscribe = lambda _c, _u, mid, codes, _p: self._subacks.put((mid, codes))
        self.client.on_publish = self._on_publish
        self.client.on_disconnect = self._on_disconnect
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        if session_expiry:
            props.SessionExpiryInterval = session_expiry
        # clean_start=False only matters with a session expiry: then queued answers survive a reconnect
        self.client.connect("localhost", broker.port, clean_start=not session_expiry, properties=props)
        self.client.loop_start()
        reason = connected.get(timeout=WAIT)
        if reason.is_failure:
            raise ConnectionError(f"{name}: CONNACK {reason}")

    def _on_publish(self, _client: mqtt.Client, _userdata: object, mid: int, reason: ReasonCode,
                    _props: Properties) -> None:
        with self._acked:
            self._pubacks[mid] = reason
            self._acked.notify_all()

    def _on_disconnect(self, _client: mqtt.Client, _userdata: object, _flags: object, reason: ReasonCode,
                       _props: Properties | None) -> None:
        self.disconnect_reason = reason
        self.disconnected.set()
        with self._acked:
            self._acked.notify_all()

    def subscribe(self, topic: str, *, retain_handling: int = 0) -> list[ReasonCode]:
        """Subscribe at QoS 1 and return the broker's SUBACK codes (``retain_handling`` 2: send
        no retained messages for this subscription)."""
        options = SubscribeOptions(qos=1, retainHandling=retain_handling)
        _, mid = self.client.subscribe(topic, options=options)
        got, codes = self._subacks.get(timeout=WAIT)
        assert got == mid
        return codes

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> ReasonCode | None:
        """Publish at QoS 1 and return the PUBACK's reason code, or ``None`` when the broker
        closed the connection instead of acknowledging."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        with self._acked:
            self._acked.wait_for(lambda: info.mid in self._pubacks or self.disconnected.is_set(), WAIT)
            if info.mid in self._pubacks:
                return self._pubacks[info.mid]
        if self.disconnected.is_set():
            return None
        raise TimeoutError(f"{self.name}: no PUBACK for {topic} within {WAIT} s")

    def drain(self, quiet: float = 0.5) -> list[tuple[str, bytes]]:
        """Everything received until nothing more arrives for ``quiet`` seconds."""
        got: list[tuple[str, bytes]] = []
        while True:
            try:
                got.append(self.inbox.get(timeout=quiet))
            except queue.Empty:
                return got

    def close(self) -> None:
        """Disconnect (if still connected) and stop the network thread."""
        self.client.disconnect()
        self.client.loop_stop()


def broker_rss_kib(broker: Mosquitto) -> int:
    """The broker process's resident set size in KiB (Linux)."""
    assert broker.process is not None
    for line in Path(f"/proc/{broker.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS line")
