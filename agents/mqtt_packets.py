"""MQTT v5 packets for the bank's own client (:mod:`~m2mpay.agents.bank.link`) and the broker probe
(:mod:`~m2mpay.agents.reach`): pure functions on bytes.

Framing (the fixed header's Variable Byte Integer length), properties (every kind MQTT v5
defines is read or stepped over, MQTT v5 §2.2.2.2), and the few packets the client sends. Nothing
here touches a socket; anything the broker sent that does not parse is a :class:`LinkError`.
"""

from __future__ import annotations

from dataclasses import dataclass

from .mqtt import TransportError

__all__ = ["CONNACK", "CONNECT", "CORRELATION", "DISCONNECT", "MAXIMUM_PACKET", "MAX_PACKET", "PINGREQ",
           "PINGRESP", "PUBACK", "PUBLISH", "RECEIVE_MAXIMUM", "RESPONSE_TOPIC", "SUBACK", "SUBSCRIBE",
           "Incoming", "LinkError", "connect", "frame", "incoming", "packet", "properties", "text", "varint"]

MAX_PACKET = 1 << 20
"""Largest packet the broker may send us (a withdrawal of 64 coins is ~17 kB)."""
CONNECT, CONNACK, PUBLISH, PUBACK = 0x10, 0x20, 0x30, 0x40
SUBSCRIBE, SUBACK, PINGREQ, PINGRESP, DISCONNECT = 0x82, 0x90, 0xC0, 0xD0, 0xE0
RESPONSE_TOPIC, CORRELATION, RECEIVE_MAXIMUM, MAXIMUM_PACKET = 0x08, 0x09, 0x21, 0x27

# How long each property's value is (MQTT v5 §2.2.2.2): a fixed width, or a kind of its own.
_BYTE, _TWO, _FOUR, _VARINT, _TEXT, _BINARY, _PAIR = 1, 2, 4, -1, -2, -3, -4
_PROPERTY = {0x01: _BYTE, 0x02: _FOUR, 0x03: _TEXT, 0x08: _TEXT, 0x09: _BINARY, 0x0B: _VARINT, 0x11: _FOUR,
             0x12: _TEXT, 0x13: _TWO, 0x15: _TEXT, 0x16: _BINARY, 0x17: _BYTE, 0x18: _FOUR, 0x19: _BYTE,
             0x1A: _TEXT, 0x1C: _TEXT, 0x1F: _TEXT, 0x21: _TWO, 0x22: _TWO, 0x23: _TWO, 0x24: _BYTE,
             0x25: _BYTE, 0x26: _PAIR, 0x27: _FOUR, 0x28: _BYTE, 0x29: _BYTE, 0x2A: _BYTE}


class LinkError(TransportError):
    """The connection failed, ended, or the broker sent what this client does not take."""


@dataclass(frozen=True, slots=True)
class Incoming:
    """A PUBLISH the broker delivered: its topic, payload, retain flag and the two properties a
    request carries (``None`` when absent)."""

    topic: str
    payload: bytes
    retain: bool
    response_topic: str | None
    correlation: bytes | None


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def text(value: str) -> bytes:
    data = value.encode()
    return len(data).to_bytes(2, "big") + data


def packet(kind: int, body: bytes) -> bytes:
    return bytes((kind,)) + varint(len(body)) + body


def connect(client_id: str, keepalive: int, props: bytes = b"") -> bytes:
    """CONNECT, MQTT v5: clean start, the client id as username too (a certificate login's name
    replaces both at the broker), ``props`` its properties already encoded (without their length)."""
    body = (text("MQTT") + bytes((5, 0x82)) + keepalive.to_bytes(2, "big") + varint(len(props)) + props
            + text(client_id) + text(client_id))
    return packet(CONNECT, body)


def _read_varint(data: bytes | memoryview, pos: int, end: int) -> tuple[int, int]:
    """A Variable Byte Integer at ``pos`` (at most four bytes); its value and the next position."""
    value, shift = 0, 0
    for i in range(4):
        if pos + i >= end:
            raise LinkError("truncated variable byte integer")
        byte = data[pos + i]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos + i + 1
        shift += 7
    raise LinkError("variable byte integer longer than four bytes")


def frame(buffer: bytearray, pos: int, size: int) -> tuple[int, int] | None:
    """Where the body of the packet at ``pos`` starts and ends, or ``None`` while it is incomplete."""
    length, shift = 0, 0
    for i in range(1, 5):
        if pos + i >= size:
            return None
        byte = buffer[pos + i]
        length |= (byte & 0x7F) << shift
        if not byte & 0x80:
            if length > MAX_PACKET:
                raise LinkError(f"a packet of {length} bytes (at most {MAX_PACKET})")
            body = pos + i + 1
            return (body, body + length) if body + length <= size else None
        shift += 7
    raise LinkError("a remaining length longer than four bytes")


def properties(data: bytes, pos: int, end: int) -> tuple[dict[int, object], int]:
    """The properties at ``pos`` (length first); the ones read by value and the position after."""
    length, pos = _read_varint(data, pos, end)
    stop = pos + length
    if stop > end:
        raise LinkError("properties longer than their packet")
    found: dict[int, object] = {}
    while pos < stop:
        ident = data[pos]
        kind = _PROPERTY.get(ident)
        pos += 1
        if kind is None:
            raise LinkError(f"unknown property 0x{ident:02x}")
        if kind > 0:
            value: object = int.from_bytes(data[pos:pos + kind], "big")
            pos += kind
        elif kind == _VARINT:
            value, pos = _read_varint(data, pos, stop)
        else:
            size = int.from_bytes(data[pos:pos + 2], "big")
            value = data[pos + 2:pos + 2 + size]
            pos += 2 + size
            if kind == _PAIR:
                size = int.from_bytes(data[pos:pos + 2], "big")
                pos += 2 + size
        if pos > stop:
            raise LinkError("property longer than its properties")
        found[ident] = value
    return found, stop


def incoming(body: bytes, first: int, topic_size: int, pos: int) -> Incoming:
    """The PUBLISH whose properties start at ``pos``."""
    topic = body[2:2 + topic_size].decode()
    found, pos = properties(body, pos, len(body))
    reply, correlation = found.get(RESPONSE_TOPIC), found.get(CORRELATION)
    return Incoming(topic, body[pos:], bool(first & 0x01),
                    bytes(reply).decode() if isinstance(reply, (bytes, bytearray)) else None,
                    bytes(correlation) if isinstance(correlation, (bytes, bytearray)) else None)
