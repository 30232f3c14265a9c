"""MQTT v5 request/response between devices and the bank, over aiomqtt (DESIGN.md §6).

The one seam where aiomqtt, paho and socket exceptions become ours: :func:`_seam` turns
``MqttError`` and ``OSError`` into :class:`TransportError` (the foreign error as ``__cause__``),
an answer that does not come in time is :class:`AnswerTimeout`, and a request that got no answer
after every retry :class:`BankUnavailable`. A caller of :class:`BankClient` sees nothing else
(besides cancellation); a refusal is never a transport error — it is an answer, signed by the
bank, which the caller opens. Every wait is bounded. A request is published to the operation's
request topic (:func:`~m2mpay.protocol.wire.request_topic`) with a Response Topic and Correlation
Data; the pending future is removed in ``finally`` whatever happens. An unanswered request is
retried with the *same bytes*: the bank answers a repeat from its store.

The bank answers a signed request only on its signer's answer topic
(:func:`~m2mpay.protocol.wire.response_topic`), the signer being the request's COSE ``kid``: with
a certificate login that is the login's own name (the broker lets a device read nothing else);
without one the client subscribes to each signer's topic it sends for.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlparse

import aiomqtt
import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from m2mpay.protocol import cose, wire
from m2mpay.protocol.errors import ProtocolError

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


def publish_properties() -> Properties:
    """Empty PUBLISH properties, typed (paho's constructor carries no annotations)."""
    return Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]  # paho: unannotated __init__


def answer_properties(correlation: bytes) -> Properties:
    """PUBLISH properties that echo a request's Correlation Data."""
    props = publish_properties()
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
    inner = client._client  # noqa: SLF001 - aiomqtt 2.x has no public publish that does not wait
    info = inner.publish(topic, payload, 1, False, properties)
    if info.rc != paho.MQTT_ERR_SUCCESS:
        raise aiomqtt.MqttCodeError(info.rc, "could not publish the answer")


_KEEPALIVE_S = 5
_HANDSHAKE_S = 5.0


@dataclass
class BankClient:
    """A device's connection to its bank: requests and the retained keys announcement.

    A supervisor task keeps the connection up under the broker-reconnect rule
    (:class:`~m2mpay.agents.reach.Reconnect`: jittered exponential backoff, each failed attempt
    judged by the start-up probe); requests wait for it, bounded by their timeout, and are retried
    with the same bytes. When the broker will never take this login again (our certificate
    revoked, say) the ``async with`` block ends with :class:`~m2mpay.agents.reach.BrokerRefused`:
    like :func:`asyncio.timeout`, the client cancels the task that entered it and turns that
    cancellation into the refusal on the way out.
    The keys announcement is the latest the bank published: a bank that signs a new one (a
    revocation, new keysets) replaces it here, and :attr:`keys_listeners` are told.
    """

    url: str
    bank: str
    client_id: str
    timeout: float = DEFAULT_TIMEOUT
    retries: int = 3
    tls: TlsLogin | None = None
    keys_listeners: list[Callable[[bytes], object]] = field(default_factory=list)
    """Each is called with every keys announcement that differs from the one before (still signed:
    the listener verifies it); what it raises is logged and stops neither the others nor the client."""
    _client: aiomqtt.Client | None = None
    _pending: dict[bytes, asyncio.Future[bytes]] = field(default_factory=dict)
    _connected: asyncio.Event = field(default_factory=asyncio.Event)
    _supervisor: asyncio.Task[None] | None = None
    _keys: asyncio.Future[bytes] | None = None
    """Done with the first announcement; :attr:`_latest` is the last one."""
    _latest: bytes = b""
    _reply_topics: set[str] = field(default_factory=set)
    _owner: asyncio.Task[Any] | None = None
    """The task that entered the ``async with``: cancelled when the broker refuses us for good."""
    _owner_cancelling: int = 0
    _refused: TransportError | None = None
    """The broker's permanent refusal (a :class:`~m2mpay.agents.reach.BrokerRefused`), once it came."""
    _cancelled_owner: bool = False

    @property
    def reply_topic(self) -> str:
        """Where answers to requests with no readable signer come back: the login's (or client
        id's) own answer topic. :class:`ValueError` if that is not a name (such a client is
        answered only on the topics of the signers it sends for)."""
        return wire.response_topic(self.bank, self.tls.name if self.tls else self.client_id)

    def _own_topics(self) -> list[str]:
        """The answer topic subscribed at every connection, if the login's name can have one."""
        name = self.tls.name if self.tls else self.client_id
        return [self.reply_topic] if wire.is_name(name) else []

    def _reply_topic_for(self, data: bytes) -> str:
        """The topic the bank answers ``data`` on: its signer's own."""
        try:
            # Our own bytes, as large as the request may be (a withdrawal of 64 coins is over 16 KiB).
            signer = cose.decode_sign1(data, max_size=len(data)).kid.decode("ascii")
        except (ProtocolError, UnicodeDecodeError):
            signer = ""
        if not wire.is_name(signer):
            # The bank refuses it before it knows a signer, on the topic the request names.
            if not self._own_topics():
                raise TransportError(f"no answer topic for a request without a signer: {self.client_id!r} "
                                     "is not a name")
            return self.reply_topic
        if self.tls is not None and signer != self.tls.name:
            raise TransportError(f"a request signed by {signer!r} is never answered to the login {self.tls.name!r}")
        return wire.response_topic(self.bank, signer)

    async def __aenter__(self) -> BankClient:
        self._owner = asyncio.current_task()
        self._owner_cancelling = self._owner.cancelling() if self._owner is not None else 0
        self._keys = asyncio.get_running_loop().create_future()
        self._supervisor = asyncio.create_task(self._supervise(), name=f"mqtt-{self.client_id}")
        try:
            async with asyncio.timeout(self.timeout):
                await self._connected.wait()
        except TimeoutError as exc:
            await _cancel(self._supervisor)
            # A certificate refused after a TLS 1.3 handshake looks to paho like a CONNACK that
            # never came, so the attempt may still have been waiting: ask the broker once.
            from .reach import Reconnect

            await Reconnect(self.url, self.tls, self.client_id).judge(exc)  # a permanent refusal raises
            raise TransportError(f"cannot reach the broker at {self.url}") from exc
        except asyncio.CancelledError:
            await _cancel(self._supervisor)
            self._raise_refusal()
            raise
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._supervisor is not None:
            await _cancel(self._supervisor)
        self._supervisor = None
        self._raise_refusal()

    def _give_up(self, refused: TransportError) -> None:
        """The broker will never take this login: end the owner's ``async with`` block."""
        self._refused = refused
        self._connected.clear()
        if self._owner is not None and not self._owner.done():
            self._owner.cancel()
            self._cancelled_owner = True

    def _raise_refusal(self) -> None:
        """Raise the refusal in place of the cancellation it caused, unless someone else cancelled too."""
        if self._refused is None:
            return
        if self._cancelled_owner and self._owner is not None:
            self._cancelled_owner = False
            if self._owner.uncancel() > self._owner_cancelling:
                return  # a Ctrl-C or a SIGTERM as well: that cancellation goes on
        raise self._refused

    async def _supervise(self) -> None:
        # reach.py imports this module: the rule is imported when a client first runs.
        from .reach import BrokerRefused, Reconnect

        rule = Reconnect(self.url, self.tls, self.client_id)
        while True:
            error: BaseException | str = "the connection ended"
            try:
                # Shorter bounds on a device's connection: a CONNACK or SUBACK lost with a dropped
                # connection would otherwise hold this loop for aiomqtt's default 10 s, and a
                # connection that stopped carrying packets is noticed within 1.5 × keepalive
                # (paho's default keepalive is 60 s).
                with _seam(f"connection to {self.url}"):
                    async with connect(self.url, self.client_id, self.tls, keepalive=_KEEPALIVE_S,
                                       timeout=_HANDSHAKE_S) as client:
                        rule.connected()
                        self._reply_topics.update(self._own_topics())
                        for topic in sorted(self._reply_topics):
                            await client.subscribe(topic, qos=1)
                        await client.subscribe(wire.keys_topic(self.bank), qos=1)
                        self._client = client
                        self._connected.set()
                        await self._read(client)
            except TransportError as exc:
                error = exc
            finally:
                self._connected.clear()
                self._client = None
            try:
                await rule.after(error)  # logs the attempt and waits; a permanent refusal raises
            except BrokerRefused as exc:
                self._give_up(exc)
                return

    async def _read(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            payload = bytes(message.payload) if isinstance(message.payload, (bytes, bytearray)) else b""
            if message.topic.matches(wire.keys_topic(self.bank)):
                if payload:  # empty: deleted
                    self._announced(payload)
                continue
            correlation = getattr(message.properties, "CorrelationData", None)
            future = self._pending.get(bytes(correlation)) if correlation else None
            if future is not None and not future.done():
                future.set_result(payload)
            # an answer nobody waits for (a retry's twin) is dropped

    def _announced(self, payload: bytes) -> None:
        if payload == self._latest:
            return  # the retained copy again, after a reconnect
        self._latest = payload
        if self._keys is not None and not self._keys.done():
            self._keys.set_result(payload)
        for listener in list(self.keys_listeners):
            try:
                listener(payload)
            except Exception:  # a listener's bug must not end the connection
                log.exception("a keys listener failed")

    async def keys(self, timeout: float | None = None) -> bytes:
        """The bank's latest keys announcement (signed; verify it against the CA fingerprint),
        waiting for the first one if none came yet."""
        if self._keys is None:
            raise TransportError("not connected")
        try:
            async with asyncio.timeout(timeout or self.timeout):
                await asyncio.shield(self._keys)
        except TimeoutError as exc:
            raise BankUnavailable("no keys announcement from the bank") from exc
        return self._latest

    def _running(self) -> None:
        if self._refused is not None:
            raise self._refused
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
                    props = publish_properties()
                    props.ResponseTopic = reply_topic
                    props.CorrelationData = correlation
                    await client.publish(wire.request_topic(self.bank, op), data, qos=1, properties=props)
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
