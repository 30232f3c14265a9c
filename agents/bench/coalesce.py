"""Fewer system calls on a busy paho connection: one ``send`` for every packet queued, and reads
of whatever the socket holds rather than of a byte at a time.

For the benchmark's echo on the stock client (aiomqtt over paho), the baseline the bank was
first measured against: this is how the bank's own connection ran on paho before it got its own
client (:mod:`~m2mpay.agents.bank.link`), so that echo is the fastest paho we had. paho writes
each packet with its own ``send`` (on loopback with ``TCP_NODELAY`` a segment each, delivered to
the broker in the sender's system time), and reads each packet with three or four ``recv``
calls (the command byte, each byte of the length, the rest). Profiled at 32 requests in flight,
those calls were a fifth of the bank's samples then. :func:`coalesce` makes a connection

- join the packets waiting into one buffer and send it once; partial sends and paho's
  bookkeeping stay as paho keeps them. Packets after which paho acts once they are written (a
  QoS 0 PUBLISH, whose ``on_publish`` fires then, and DISCONNECT) are left to paho's own loop;
- read up to 64 kB at once into a buffer that paho's reads are served from, and go on reading
  packets while that buffer holds any: the event loop is told a socket is readable only when
  the kernel has bytes, so a byte left in the buffer would otherwise wait for the next packet.

This reaches into paho 2's reader and writer (``_out_packet``, ``_packet_write``,
``_sock_send``, ``_sock_recv``, ``loop_read``): aiomqtt 2 has no public hook for either. Only the
paho releases this was read against and tested with (:data:`TESTED_PAHO`) are changed; any other
is left as it is, so a paho whose internals moved costs speed, never correctness.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import aiomqtt
import paho.mqtt
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties, VariableByteIntegers

__all__ = ["AnswerProperties", "coalesce"]

log = logging.getLogger(__name__)
_PUBLISH, _DISCONNECT = 0x30, 0xE0
_MAX_SEND = 256 * 1024  # one send at most: the socket's buffer takes no more at once anyway
_READ = 64 * 1024
_NEEDS = ("_packet_write", "_out_packet", "_sock_send", "_sock_recv", "loop_read", "_msgtime_mutex")
TESTED_PAHO = frozenset({"2.1.0", "2.2.0"})  # the releases whose reader and writer this matches


def coalesce(client: aiomqtt.Client) -> bool:
    """Make ``client``'s connection write and read in bulk; whether its paho allows it."""
    inner: Any = client._client  # noqa: SLF001 - aiomqtt's paho client: see the module's docstring
    if paho.mqtt.__version__ not in TESTED_PAHO or not all(hasattr(inner, name) for name in _NEEDS):
        return False
    _bulk_writes(inner)
    _buffered_reads(inner)
    return True


def _bulk_writes(inner: Any) -> None:
    plain = inner._packet_write  # noqa: SLF001 - paho's writer, wrapped: see the module's docstring

    def write() -> MQTTErrorCode:
        out = inner._out_packet  # noqa: SLF001 - paho's queue of packets to write
        while out:
            batch: list[dict[str, Any]] = []
            size = 0
            for packet in out:
                kind = packet["command"] & 0xF0
                if kind == _DISCONNECT or (kind == _PUBLISH and packet["qos"] == 0):
                    break
                batch.append(packet)
                size += packet["to_process"]
                if size >= _MAX_SEND:
                    break
            if len(batch) < 2:  # nothing to join: paho writes the rest its own way
                result: MQTTErrorCode = plain()
                return result
            data = b"".join(memoryview(p["packet"])[p["pos"]:] for p in batch)
            try:
                sent = inner._sock_send(data)  # noqa: SLF001 - registers for writability when full
            except (AttributeError, ValueError):  # no socket (any more): as paho does
                return MQTTErrorCode.MQTT_ERR_SUCCESS
            except BlockingIOError:
                return MQTTErrorCode.MQTT_ERR_AGAIN
            except OSError as exc:
                log.warning("MQTT send failed: %s", exc)
                return MQTTErrorCode.MQTT_ERR_CONN_LOST
            for packet in batch:  # what was sent leaves the queue; a packet sent in part stays first
                done = min(sent, packet["to_process"])
                packet["pos"] += done
                packet["to_process"] -= done
                sent -= done
                if packet["to_process"]:
                    break
                out.popleft()
        with inner._msgtime_mutex:  # noqa: SLF001 - the keepalive's clock, as paho's own write sets it
            inner._last_msg_out = time.monotonic()  # noqa: SLF001 - paho's time_func
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    inner._packet_write = write  # noqa: SLF001 - the wrapping itself (checked by _NEEDS first)


def _buffered_reads(inner: Any) -> None:
    plain_recv, plain_loop_read = inner._sock_recv, inner.loop_read  # noqa: SLF001 - paho's reader, wrapped
    buffer = bytearray()
    source: list[Any] = [None]  # the socket the buffer's bytes came from

    def recv(size: int) -> bytes:
        if source[0] is not inner._sock:  # noqa: SLF001 - a new connection: nothing of the old one
            buffer.clear()
            source[0] = inner._sock  # noqa: SLF001 - paho's socket, the connection's identity
        if not buffer:
            data = plain_recv(_READ)  # BlockingIOError when the socket is empty, b"" at its end
            if len(data) <= size:
                return bytes(data)
            buffer.extend(data)
        chunk = bytes(buffer[:size])
        del buffer[:size]
        return chunk

    def loop_read(max_packets: int = 1) -> MQTTErrorCode:
        result: MQTTErrorCode = plain_loop_read(max_packets)
        # Read on while the buffer holds bytes of this very connection (paho's socket is the one it came from).
        while result == MQTTErrorCode.MQTT_ERR_SUCCESS and buffer and inner._sock is source[0]:  # noqa: SLF001 - paho's socket, no public name
            result = plain_loop_read(max_packets)
        return result

    inner._sock_recv = recv  # noqa: SLF001 - the wrapping itself (checked by _NEEDS first)
    inner.loop_read = loop_read


class AnswerProperties(Properties):
    """The PUBLISH properties of an answer, its request's Correlation Data, packed once.

    paho's :class:`Properties` builds its tables in every instance, checks each assignment
    against them and scans them all at every ``pack``: a tenth of a millisecond per answer,
    measured. This one is what :func:`~m2mpay.agents.mqtt.answer_properties` makes, on the wire
    byte for byte (identifier 9, a two-byte length, the bytes), and is read the same way.
    """

    def __init__(self, correlation: bytes) -> None:
        if len(correlation) > 0xFFFF:
            raise ValueError("Correlation Data is at most 65,535 bytes")
        body = b"\x09" + len(correlation).to_bytes(2, "big") + correlation
        object.__setattr__(self, "packetType", PacketTypes.PUBLISH)
        object.__setattr__(self, "CorrelationData", correlation)
        object.__setattr__(self, "_packed", VariableByteIntegers.encode(len(body)) + body)  # type: ignore[no-untyped-call]  # paho is unannotated

    def pack(self) -> bytes:
        """The properties as they go on the wire."""
        packed: bytes = self.__dict__["_packed"]
        return packed
