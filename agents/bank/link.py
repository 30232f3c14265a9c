"""The bank's own MQTT v5 connection: the few packets a request/answer service needs, on asyncio.

The bank receives requests (QoS 1 PUBLISH on its shared subscription) and sends answers (QoS 1
PUBLISH that nobody waits for); devices keep using aiomqtt. Under load, paho's packet handling
(its reader, its ``Properties`` objects, a message object and a callback per packet, its writer)
was a quarter of the bank's CPU, as much as all its database work; here a packet is parsed where
it is read, an answer is laid out in one piece, and what one turn of the event loop queued (the
answers of a batch and the PUBACKs of its requests) leaves in one ``write``.

The subset: CONNECT (clean start, a username; the certificate of a TLS login names the client),
CONNACK, SUBSCRIBE/SUBACK, PUBLISH QoS 0 and 1 both ways, PUBACK, PINGREQ/PINGRESP, DISCONNECT.
No QoS 2 (the bank subscribes at QoS 1, so the broker never sends it), no topic aliases (we allow
none), no will, no session kept across connections (devices retry and the bank answers from its
store). Receive Maximum is honoured: answers past the broker's limit wait for a PUBACK. Packets
larger than :data:`MAX_PACKET` are not sent to us (we say so in CONNECT). Whatever the broker
sends that this subset does not expect ends the connection with a :class:`LinkError`, and the
serve loop connects again; so does silence past the keepalive. The packets themselves, bytes
in and out, are :mod:`~m2mpay.agents.mqtt_packets`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import cast

from ..mqtt import TlsLogin, broker_address
from ..mqtt_packets import (CONNACK, DISCONNECT, MAX_PACKET, MAXIMUM_PACKET, PINGREQ, PINGRESP,
                      PUBACK, PUBLISH, RECEIVE_MAXIMUM, SUBACK, SUBSCRIBE, Incoming, LinkError,
                      connect, frame, incoming, packet, properties, text, varint)

__all__ = ["MAX_PACKET", "Incoming", "Link", "LinkError", "open_link"]

log = logging.getLogger(__name__)

KEEPALIVE = 60
_WAIT = 10.0  # CONNACK, SUBACK, a PUBACK waited for
_QUEUE = 10_000  # requests received and not yet taken: past this, dropped (the devices retry)


class Link(asyncio.Protocol):
    """One connection to the broker. Made by :func:`open_link`; unusable once it ends."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._incoming: deque[Incoming] = deque()
        self._arrived = asyncio.Event()
        self._error: LinkError | None = None
        self._connack: asyncio.Future[tuple[int, dict[int, object]]] = loop.create_future()
        self._acks: dict[int, asyncio.Future[int]] = {}  # packet id → the PUBACK or SUBACK awaited
        self._inflight: set[int] = set()  # our QoS 1 PUBLISH not yet acknowledged
        self._held: deque[tuple[int, bytes]] = deque()  # past the broker's Receive Maximum
        self._receive_maximum = 65_535
        self._next_id = 0
        self._dropped = 0
        self.last_in = self.last_out = time.monotonic()

    # asyncio.Protocol -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # create_connection's transports are

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(LinkError(f"connection lost: {exc}" if exc else "the broker closed the connection"))

    def data_received(self, data: bytes) -> None:
        self.last_in = time.monotonic()
        buffer = self._buffer
        buffer += data
        pos, size = 0, len(buffer)
        try:
            while True:
                framed = frame(buffer, pos, size)
                if framed is None:
                    break  # the rest of the packet is still on its way
                body, end = framed
                self._handle(buffer[pos], bytes(buffer[body:end]))
                pos = end
        except LinkError as exc:
            self._fail(exc)
            return
        except (IndexError, UnicodeDecodeError, ValueError) as exc:
            self._fail(LinkError(f"malformed packet from the broker: {exc}"))
            return
        finally:
            del buffer[:pos]
        if self._incoming:
            self._arrived.set()

    # packets ----------------------------------------------------------------------------------

    def _handle(self, first: int, body: bytes) -> None:
        kind = first & 0xF0
        if kind == PUBLISH:
            self._publish_received(first, body)
        elif kind == PUBACK:
            self._puback(body)
        elif kind == CONNACK:
            self._connack_received(body)
        elif kind == SUBACK:
            packet_id = int.from_bytes(body[:2], "big")
            _, pos = properties(body, 2, len(body))
            self._settle(packet_id, body[pos] if pos < len(body) else 0x80)
        elif kind == PINGRESP:
            pass
        elif kind == DISCONNECT:
            reason = body[0] if body else 0
            raise LinkError(f"the broker disconnected us (reason 0x{reason:02x})")
        else:
            raise LinkError(f"unexpected packet type 0x{first:02x}")

    def _publish_received(self, first: int, body: bytes) -> None:
        qos = (first >> 1) & 0x03
        if qos > 1:
            raise LinkError("a QoS 2 PUBLISH (the bank subscribes at QoS 1)")
        size = int.from_bytes(body[:2], "big")
        pos = 2 + size
        if qos:  # acknowledged whatever it holds: an unread message must not stall the broker's window
            self._out.append(b"\x40\x02" + body[pos:pos + 2])  # PUBACK, success
            self._schedule_flush()
            pos += 2
        try:
            message = incoming(body, first, size, pos)
        except (LinkError, UnicodeDecodeError, IndexError) as exc:  # one message, not the connection
            log.warning("unreadable PUBLISH from the broker (%s): dropped", exc)
            return
        if len(self._incoming) >= _QUEUE:
            self._dropped += 1
            if self._dropped == 1 or self._dropped % 1000 == 0:
                log.warning("%d request(s) dropped: %d waiting already", self._dropped, _QUEUE)
            return
        self._incoming.append(message)

    def _puback(self, body: bytes) -> None:
        packet_id = int.from_bytes(body[:2], "big")
        reason = body[2] if len(body) > 2 else 0
        if reason >= 0x80:
            log.warning("the broker refused an answer (PUBACK reason 0x%02x)", reason)
        self._settle(packet_id, reason)
        if packet_id in self._inflight:
            self._inflight.discard(packet_id)
            if self._held:
                held_id, packet = self._held.popleft()
                self._inflight.add(held_id)
                self._out.append(packet)
                self._schedule_flush()

    def _connack_received(self, body: bytes) -> None:
        if len(body) < 2:
            raise LinkError("short CONNACK")
        found, _ = properties(body, 2, len(body))
        if not self._connack.done():
            self._connack.set_result((body[1], found))

    def _settle(self, packet_id: int, reason: int) -> None:
        waiter = self._acks.pop(packet_id, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(reason)

    def _fail(self, error: LinkError) -> None:
        if self._error is None:
            self._error = error
        if not self._connack.done():
            self._connack.set_exception(error)
        for waiter in self._acks.values():
            if not waiter.done():
                waiter.set_exception(error)
        self._acks.clear()
        self._arrived.set()
        if self._transport is not None:
            self._transport.abort()

    # sending ----------------------------------------------------------------------------------

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write everything queued, in one piece (called by itself once per turn of the loop)."""
        self._flush_scheduled = False
        if self._out and self._transport is not None and self._error is None:
            self._transport.write(b"".join(self._out))
            self.last_out = time.monotonic()
        self._out.clear()

    def _packet_id(self) -> int:
        for _ in range(65_535):
            self._next_id = self._next_id % 65_535 + 1
            if self._next_id not in self._inflight and self._next_id not in self._acks:
                return self._next_id
        raise LinkError("no packet id free")

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def publish_nowait(self, topic: str, payload: bytes, *, correlation: bytes | None = None, qos: int = 1,
                       retain: bool = False) -> int:
        """Queue a PUBLISH (sent at the end of this turn of the loop); its packet id (0 at QoS 0).

        Raises :class:`LinkError` once the connection has ended.
        """
        self._check()
        properties = b"" if correlation is None else b"\x09" + len(correlation).to_bytes(2, "big") + correlation
        packet_id = self._packet_id() if qos else 0
        head = text(topic) + (packet_id.to_bytes(2, "big") if qos else b"") + varint(len(properties))
        packet = b"".join((bytes((PUBLISH | qos << 1 | int(retain),)),
                           varint(len(head) + len(properties) + len(payload)), head, properties, payload))
        if qos and len(self._inflight) >= self._receive_maximum:
            self._held.append((packet_id, packet))  # sent when the broker acknowledges another
            return packet_id
        if qos:
            self._inflight.add(packet_id)
        self._out.append(packet)
        self._schedule_flush()
        return packet_id

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False, timeout: float = _WAIT) -> None:
        """A QoS 1 PUBLISH, returned once the broker acknowledged it; :class:`LinkError` if it refused."""
        packet_id = self.publish_nowait(topic, payload, retain=retain)
        reason = await self._ack(packet_id, timeout, f"PUBACK for {topic[:60]!r}")
        if reason >= 0x80:
            raise LinkError(f"the broker refused a publish to {topic[:60]!r} (reason 0x{reason:02x})")

    async def subscribe(self, topic_filter: str, *, qos: int = 1, retain_handling: int = 0,
                        timeout: float = _WAIT) -> None:
        """Subscribe and wait for the SUBACK; :class:`LinkError` if the broker refused."""
        self._check()
        packet_id = self._packet_id()
        body = packet_id.to_bytes(2, "big") + b"\x00" + text(topic_filter) + bytes((qos | retain_handling << 4,))
        waiter = self._waiter(packet_id)
        self._out.append(packet(SUBSCRIBE, body))
        self._schedule_flush()
        reason = await self._wait(waiter, timeout, f"SUBACK for {topic_filter[:60]!r}")
        if reason >= 0x80:
            raise LinkError(f"the broker refused the subscription to {topic_filter[:60]!r} (reason 0x{reason:02x})")

    def _waiter(self, packet_id: int) -> asyncio.Future[int]:
        waiter: asyncio.Future[int] = self._loop.create_future()
        self._acks[packet_id] = waiter
        return waiter

    async def _ack(self, packet_id: int, timeout: float, what: str) -> int:
        return await self._wait(self._waiter(packet_id), timeout, what)

    async def _wait(self, waiter: asyncio.Future[int], timeout: float, what: str) -> int:
        try:
            return await asyncio.wait_for(waiter, timeout)
        except TimeoutError:
            raise LinkError(f"no {what} within {timeout:g} s") from None
        finally:
            for key, value in list(self._acks.items()):
                if value is waiter:
                    del self._acks[key]

    # receiving --------------------------------------------------------------------------------

    def __len__(self) -> int:
        """Requests received and not yet taken."""
        return len(self._incoming)

    def take(self) -> Incoming:
        """The oldest request received (there must be one: check ``len``)."""
        return self._incoming.popleft()

    async def next(self) -> Incoming:
        """The oldest request received, waiting for one; :class:`LinkError` once the connection ends."""
        while not self._incoming:
            self._check()
            self._arrived.clear()
            await self._arrived.wait()
        return self._incoming.popleft()

    # the connection's life ----------------------------------------------------------------------

    async def _handshake(self, client_id: str, keepalive: int, timeout: float) -> None:
        self._out.append(connect(client_id, keepalive, bytes((MAXIMUM_PACKET,)) + MAX_PACKET.to_bytes(4, "big")))
        self.flush()
        try:
            reason, found = await asyncio.wait_for(self._connack, timeout)
        except TimeoutError:
            raise LinkError(f"no CONNACK within {timeout:g} s") from None
        if reason != 0:
            raise LinkError(f"the broker refused the connection (reason 0x{reason:02x})")
        maximum = found.get(RECEIVE_MAXIMUM)
        if isinstance(maximum, int) and maximum > 0:
            self._receive_maximum = maximum

    async def keep_alive(self, keepalive: int) -> None:
        """Ping when we sent nothing for ``keepalive`` s; end the link after as long without a word."""
        while self._error is None:
            await asyncio.sleep(keepalive / 4)
            now = time.monotonic()
            if now - self.last_in > 1.5 * keepalive:
                self._fail(LinkError(f"nothing from the broker in {1.5 * keepalive:g} s"))
            elif now - self.last_out >= keepalive / 2:
                self._out.append(bytes((PINGREQ, 0)))
                self.flush()

    def close(self) -> None:
        """Say goodbye (DISCONNECT, normal) and close; answers queued this turn go first."""
        if self._transport is not None and self._error is None:
            self._out.append(bytes((DISCONNECT, 0)))
            self.flush()
            self._error = LinkError("closed")
            self._transport.close()


def _tls_context(tls: TlsLogin) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(tls.ca))
    context.load_cert_chain(str(tls.cert), str(tls.key))
    return context


@contextlib.asynccontextmanager
async def open_link(url: str, client_id: str, tls: TlsLogin | None = None, *, keepalive: int = KEEPALIVE,
                    timeout: float = _WAIT) -> AsyncIterator[Link]:
    """A connected :class:`Link` to the broker of ``url`` (``mqtts://`` with ``tls``), with its
    keepalive running; closed on the way out. Connection failures are :class:`LinkError`."""
    host, port = broker_address(url)
    if url.startswith("mqtts://") and tls is None:
        raise ValueError("mqtts:// needs a certificate login")
    loop = asyncio.get_running_loop()
    try:
        transport, link = await asyncio.wait_for(loop.create_connection(
            lambda: Link(loop), host, port, ssl=None if tls is None else _tls_context(tls),
            server_hostname=None if tls is None else host), timeout)
    except (OSError, ssl.SSLError, TimeoutError) as exc:
        raise LinkError(f"cannot connect to {host}:{port}: {exc}") from exc
    try:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # ~90 ms → ~0.7 ms per round trip
        name = client_id if tls is None else tls.name  # a certificate login is its certificate's name
        await link._handshake(name, keepalive, timeout)  # noqa: SLF001 - the link's own module
        pinger = asyncio.create_task(link.keep_alive(keepalive), name="mqtt-keepalive")
        try:
            yield link
        finally:
            pinger.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pinger
    finally:
        link.close()
