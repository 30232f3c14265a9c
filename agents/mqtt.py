"""MQTT v5 request/response between devices and the bank, over aiomqtt (DESIGN.md §6).

The one seam where aiomqtt, paho and socket exceptions become ours: :func:`_seam` turns
``MqttError`` and ``OSError`` into :class:`TransportError` (the foreign error as ``__cause__``),
an answer that does not come in time is :class:`AnswerTimeout`, and a request that got no answer
after every retry :class:`BankUnavailable`. A caller of :class:`BankClient` sees nothing else
(besides cancellation); a refusal is never a transport error — it is an answer, signed by the
bank, which the caller opens. Every wait is bounded. A request is published to
``m2mpay/{bank}/req/{op}`` with a Response Topic and Correlation Data; the pending future is
removed in ``finally`` whatever happens. An unanswered request is retried with the *same bytes*:
the bank answers a repeat from its store.

The bank answers a signed request only on ``m2mpay/{bank}/resp/{signer}``, the signer being the
request's COSE ``kid``: with a certificate login that is the login's own name (the broker lets a
device read nothing else); without one the client subscribes to each signer's topic it sends for.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlparse

import aiomqtt
import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from m2mpay.protocol import cose
from m2mpay.protocol.errors import ProtocolError
from m2mpay.protocol.messages import is_name

__all__ = [
    "DEFAULT_TIMEOUT",
    "AnswerTimeout",
    "BankClient",
    "BankUnavailable",
    "TlsLogin",
    "TransportError",
    "answer_properties",
    "broker_address",
    "connect",
    "request_topic",
    "response_prefix",
]

log = logging.getLogger(__name__)
DEFAULT_TIMEOUT = 5.0
"""Seconds to wait for one answer before retrying."""
_NODELAY = ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),)  # ~90 ms → ~0.7 ms per round trip


class TransportError(Exception):
    """The network between us and the bank failed."""


class AnswerTimeout(TransportError):
    """No answer within one attempt's wait."""


class BankUnavailable(TransportError):
    """No answer from the bank after every retry."""


@contextlib.contextmanager
def _seam(what: str) -> Iterator[None]:
    """Where the broker connection's foreign errors become :class:`TransportError`, cause kept."""
    try:
        yield
    except (aiomqtt.MqttError, OSError) as exc:
        raise TransportError(f"{what}: {exc}") from exc


def broker_address(url: str) -> tuple[str, int]:
    """``mqtt://host:port`` or ``mqtts://host:port`` → ``(host, port)``."""
    parsed = urlparse(url)
    if parsed.scheme not in ("mqtt", "mqtts", "") or not parsed.hostname:
        raise ValueError(f"not an mqtt:// or mqtts:// URL: {url}")
    return parsed.hostname, parsed.port or (8883 if parsed.scheme == "mqtts" else 1883)


@dataclass(frozen=True)
class TlsLogin:
    """A certificate login: the broker's CA and this client's certificate and key.

    With certificate logins the broker takes the certificate's name as username and client id,
    so the client id (and with it the reply topic) *is* ``name``.
    """

    ca: Path
    cert: Path
    key: Path
    name: str

    @classmethod
    def from_dir(cls, directory: Path, name: str) -> TlsLogin:
        """The files ``broker pki`` wrote: ``ca.crt``, ``NAME.crt``, ``NAME.key``."""
        return cls(ca=directory / "ca.crt", cert=directory / f"{name}.crt", key=directory / f"{name}.key", name=name)


def request_topic(bank: str, op: str) -> str:
    """Where requests for ``op`` go."""
    return f"m2mpay/{bank}/req/{op}"


def response_prefix(bank: str) -> str:
    """Every answer topic starts with this; the bank answers nowhere else."""
    return f"m2mpay/{bank}/resp/"


def answer_properties(correlation: bytes) -> Properties:
    """PUBLISH properties that echo a request's Correlation Data."""
    props = Properties(PacketTypes.PUBLISH)
    props.CorrelationData = correlation
    return props


def connect(url: str, client_id: str, tls: TlsLogin | None = None, **options: Any) -> aiomqtt.Client:
    """An MQTT v5 client with TCP_NODELAY for ``mqtt://host:port`` (``mqtts://`` with ``tls``)."""
    host, port = broker_address(url)
    if url.startswith("mqtts://") and tls is None:
        raise ValueError("mqtts:// needs a certificate login")
    if tls is not None:
        options["tls_params"] = aiomqtt.TLSParameters(ca_certs=str(tls.ca), certfile=str(tls.cert),
                                                      keyfile=str(tls.key))
        client_id = tls.name
    client = aiomqtt.Client(host, port, identifier=client_id, protocol=aiomqtt.ProtocolVersion.V5,
                            socket_options=_NODELAY, username=client_id, **options)
    # Dozens of requests in flight are normal here; past this many, aiomqtt lists its pending
    # calls and logs a warning on every publish.
    client.pending_calls_threshold = 1_000_000
    return client


def publish_nowait(client: aiomqtt.Client, topic: str, payload: bytes, properties: Properties) -> None:
    """Hand a QoS 1 PUBLISH to paho without waiting for the broker's PUBACK.

    For the bank's answers: each is stored under its request id, so one lost with the connection
    is sent again when the device retries, and waiting for every PUBACK would cost a task and a
    future per answer. paho keeps the message until it is acknowledged; aiomqtt ignores PUBACKs
    nobody waits for. (aiomqtt 2.x has no public call for this: its paho client is ``_client``.)
    """
    info = client._client.publish(topic, payload, 1, False, properties)  # noqa: SLF001
    if info.rc != paho.MQTT_ERR_SUCCESS:
        raise aiomqtt.MqttCodeError(info.rc, "could not publish the answer")


_KEEPALIVE_S = 5
_HANDSHAKE_S = 5.0


@dataclass
class BankClient:
    """A device's connection to its bank: requests and the retained keys announcement.

    A supervisor task keeps the connection up (jittered exponential backoff after a loss);
    requests wait for it, bounded by their timeout, and are retried with the same bytes.
    """

    url: str
    bank: str
    client_id: str
    timeout: float = DEFAULT_TIMEOUT
    retries: int = 3
    tls: TlsLogin | None = None
    _client: aiomqtt.Client | None = None
    _pending: dict[bytes, asyncio.Future[bytes]] = field(default_factory=dict)
    _connected: asyncio.Event = field(default_factory=asyncio.Event)
    _supervisor: asyncio.Task[None] | None = None
    _keys: asyncio.Future[bytes] | None = None
    _reply_topics: set[str] = field(default_factory=set)

    @property
    def reply_topic(self) -> str:
        """Where answers to requests with no readable signer come back."""
        return response_prefix(self.bank) + (self.tls.name if self.tls else self.client_id)

    def _reply_topic_for(self, data: bytes) -> str:
        """The topic the bank answers ``data`` on: its signer's own."""
        try:
            signer = cose.decode_sign1(data).kid.decode("ascii")
        except (ProtocolError, UnicodeDecodeError):
            return self.reply_topic  # the bank refuses it before it knows a signer
        if not is_name(signer):
            return self.reply_topic
        if self.tls is not None and signer != self.tls.name:
            raise TransportError(f"a request signed by {signer!r} is never answered to the login {self.tls.name!r}")
        return response_prefix(self.bank) + signer

    async def __aenter__(self) -> BankClient:
        self._keys = asyncio.get_running_loop().create_future()
        self._supervisor = asyncio.create_task(self._supervise(), name=f"mqtt-{self.client_id}")
        try:
            async with asyncio.timeout(self.timeout):
                await self._connected.wait()
        except TimeoutError as exc:
            await _cancel(self._supervisor)
            raise TransportError(f"cannot reach the broker at {self.url}") from exc
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._supervisor is not None:
            await _cancel(self._supervisor)
        self._supervisor = None

    async def _supervise(self) -> None:
        backoff = 0.1
        while True:
            try:
                # Shorter bounds on a device's connection: a CONNACK or SUBACK lost with a dropped
                # connection would otherwise hold this loop for aiomqtt's default 10 s, and a
                # connection that stopped carrying packets is noticed within 1.5 × keepalive
                # (paho's default keepalive is 60 s).
                with _seam(f"connection to {self.url}"):
                    async with connect(self.url, self.client_id, self.tls, keepalive=_KEEPALIVE_S,
                                       timeout=_HANDSHAKE_S) as client:
                        self._reply_topics.add(self.reply_topic)
                        for topic in sorted(self._reply_topics):
                            await client.subscribe(topic, qos=1)
                        await client.subscribe(f"m2mpay/{self.bank}/keys", qos=1)
                        self._client, backoff = client, 0.1
                        self._connected.set()
                        await self._read(client)
            except TransportError as exc:
                log.warning("%s; reconnecting", exc)
            finally:
                self._connected.clear()
                self._client = None
            await asyncio.sleep(backoff * (0.5 + random.random()))
            backoff = min(backoff * 2, 5.0)

    async def _read(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            payload = bytes(message.payload) if isinstance(message.payload, (bytes, bytearray)) else b""
            if message.topic.matches(f"m2mpay/{self.bank}/keys"):
                if payload and self._keys is not None and not self._keys.done():  # empty: deleted
                    self._keys.set_result(payload)
                continue
            correlation = getattr(message.properties, "CorrelationData", None)
            future = self._pending.get(bytes(correlation)) if correlation else None
            if future is not None and not future.done():
                future.set_result(payload)
            # an answer nobody waits for (a retry's twin) is dropped

    async def keys(self, timeout: float | None = None) -> bytes:
        """The bank's retained keys announcement (signed; verify it against the CA fingerprint)."""
        if self._keys is None:
            raise TransportError("not connected")
        try:
            async with asyncio.timeout(timeout or self.timeout):
                return await asyncio.shield(self._keys)
        except TimeoutError as exc:
            raise BankUnavailable("no keys announcement from the bank") from exc

    def _running(self) -> None:
        if self._supervisor is None:
            raise TransportError("not connected")
        if self._supervisor.done() and not self._supervisor.cancelled():
            # Only a bug stops the supervisor (transport errors are retried): say so at once
            # rather than let every request wait for a connection that will not come.
            raise TransportError("the connection supervisor stopped") from self._supervisor.exception()

    async def request(self, op: str, data: bytes, *, timeout: float | None = None) -> bytes:
        """Send a signed request and return the bank's signed answer; retries with the same bytes.

        Raises only :class:`TransportError` (:class:`BankUnavailable` after every retry).
        """
        self._running()
        wait = timeout or self.timeout
        reply_topic = self._reply_topic_for(data)
        last: TransportError | None = None
        for attempt in range(self.retries):
            try:
                return await self._attempt(op, data, reply_topic, wait)
            except AnswerTimeout as exc:
                last = exc
                log.warning("%s (attempt %d)", exc, attempt + 1)
            except TransportError as exc:
                last = exc
                log.warning("connection lost during %s (attempt %d): %s", op, attempt + 1, exc)
                # The supervisor has not noticed yet: give it time to reconnect rather than
                # spend every attempt on a connection that is already gone.
                await asyncio.sleep(min(0.05 * 2 ** attempt, 1.0))
        raise BankUnavailable(f"no answer to {op} after {self.retries} attempts") from last

    async def _attempt(self, op: str, data: bytes, reply_topic: str, wait: float) -> bytes:
        correlation = os.urandom(16)
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._pending[correlation] = future
        try:
            async with asyncio.timeout(wait):
                with _seam(f"sending {op}"):
                    await self._connected.wait()
                    client = self._client
                    if client is None:
                        raise TransportError("between connections")
                    if reply_topic not in self._reply_topics:
                        await client.subscribe(reply_topic, qos=1)
                        self._reply_topics.add(reply_topic)
                    props = Properties(PacketTypes.PUBLISH)
                    props.ResponseTopic = reply_topic
                    props.CorrelationData = correlation
                    await client.publish(request_topic(self.bank, op), data, qos=1, properties=props)
                return await future
        except TimeoutError as exc:  # from asyncio.timeout: the wait is over, nothing else
            raise AnswerTimeout(f"no answer to {op} within {wait:.1f} s") from exc
        finally:
            self._pending.pop(correlation, None)


async def _cancel(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
        await task


@contextlib.asynccontextmanager
async def bank_client(url: str, bank: str, client_id: str, **options: Any) -> AsyncIterator[BankClient]:
    """``async with bank_client(...) as bank:`` convenience."""
    async with BankClient(url, bank, client_id, **options) as client:
        yield client
