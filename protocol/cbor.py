"""Deterministic CBOR (RFC 8949 §4.2.1) for everything m2mpay signs, hashes or receives.

Encoding goes through cbor2's C encoder after map keys are put in bytewise order of their
encodings (cbor2's own canonical mode sorts length-first, RFC 7049's older rule). Decoding of peer bytes does *not*:
this small decoder accepts only the subset our messages use — unsigned and negative integers,
byte and text strings, arrays, maps, ``true``, ``false`` and ``null`` — and only in deterministic
form (shortest arguments, definite lengths, map keys unique and in bytewise order). No tags, so
no regex (tag 35), MIME (36), bignum or date objects are ever built from peer input; no floats.
Size and nesting depth are bounded before any allocation.

Everything wrong with the input raises :class:`~m2mpay.protocol.errors.RemoteProtocolError`.
"""

from __future__ import annotations

from typing import Any

import cbor2

from .errors import ErrorCode, LocalProtocolError, RemoteProtocolError

__all__ = ["DEFAULT_MAX_DEPTH", "DEFAULT_MAX_SIZE", "decode", "encode"]

DEFAULT_MAX_SIZE = 16 * 1024
"""Largest message we decode, in bytes. A block request with an RSA-4096 coin is ~1.2 KiB."""

DEFAULT_MAX_DEPTH = 8
"""Deepest nesting of arrays and maps we decode; our messages use at most 4."""

_SIMPLE = {20: False, 21: True, 22: None}


def encode(obj: Any) -> bytes:
    """Encode ``obj`` deterministically. Only for values built by this package."""
    try:
        return cbor2.dumps(_ordered(obj))
    except (cbor2.CBOREncodeError, TypeError, ValueError) as exc:
        raise LocalProtocolError(f"cannot encode {type(obj).__name__}") from exc


_KEY_CACHE: dict[tuple[type, Any], bytes] = {}
_KEY_CACHE_SIZE = 512  # our schemas use a few dozen keys; beyond this, keys are encoded each time


def _key_bytes(key: Any) -> bytes:
    """A map key's encoding, remembered: the same field names are sorted on every message."""
    slot = (type(key), key)
    encoded = _KEY_CACHE.get(slot)
    if encoded is None:
        encoded = cbor2.dumps(key)
        if len(_KEY_CACHE) < _KEY_CACHE_SIZE and isinstance(key, (str, int)):
            _KEY_CACHE[slot] = encoded
    return encoded


def _ordered(obj: Any) -> Any:
    """``obj`` with every map's keys in bytewise order of their encodings (RFC 8949 §4.2.1)."""
    if isinstance(obj, dict):
        keyed = sorted((_key_bytes(k), k) for k in obj)
        return {k: _ordered(obj[k]) for _, k in keyed}
    if isinstance(obj, (list, tuple)):
        return [_ordered(item) for item in obj]
    if isinstance(obj, float):
        raise TypeError("floats are not part of m2mpay messages")
    return obj


def decode(
    data: bytes, *, max_size: int = DEFAULT_MAX_SIZE, max_depth: int = DEFAULT_MAX_DEPTH
) -> Any:
    """Decode one deterministic CBOR item from ``data``, which must hold nothing else."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise RemoteProtocolError("body is not bytes")
    if len(data) > max_size:
        raise RemoteProtocolError(
            f"message of {len(data)} bytes exceeds {max_size}", ErrorCode.TOO_LARGE
        )
    if not data:
        raise RemoteProtocolError("empty message")
    raw = bytes(data)
    value, pos = _item(raw, 0, len(raw), 0, max_depth)
    if pos != len(raw):
        raise RemoteProtocolError("trailing bytes after CBOR item")
    return value


def _item(data: bytes, pos: int, end: int, depth: int, max_depth: int) -> tuple[Any, int]:
    """The item at ``pos`` and the position after it.

    One function with the head read inline (not a reader object with a method per step): every
    request the bank answers is decoded here, three or four times over, and Python's calls were
    most of the time it took.
    """
    if pos >= end:
        raise RemoteProtocolError("truncated CBOR")
    initial = data[pos]
    pos += 1
    major, arg = initial >> 5, initial & 0x1F
    if arg >= 24:
        if major == 7:
            raise RemoteProtocolError("floats and extended simple values are not accepted")
        if arg > 27:
            raise RemoteProtocolError("indefinite lengths are not accepted")
        width = 1 << (arg - 24)
        stop = pos + width
        if stop > end:
            raise RemoteProtocolError("truncated CBOR")
        arg = int.from_bytes(data[pos:stop], "big")
        pos = stop
        # Deterministic encoding: the argument must not fit in a shorter form.
        if arg < (24 if width == 1 else 1 << (4 * width)):
            raise RemoteProtocolError("non-shortest CBOR integer or length")
    if major == 0:
        return arg, pos
    if major == 1:
        return -1 - arg, pos
    if (major == 4 or major == 5) and depth >= max_depth:
        raise RemoteProtocolError("CBOR nested too deeply")
    if major < 6 and arg > end - pos:  # every item needs at least one byte: a count beyond what is left is a lie
        raise RemoteProtocolError("CBOR length exceeds the message")
    if major == 2:
        return data[pos:pos + arg], pos + arg
    if major == 3:
        try:
            return data[pos:pos + arg].decode("utf-8"), pos + arg
        except UnicodeDecodeError as exc:
            raise RemoteProtocolError("invalid UTF-8 in text string") from exc
    if major == 4 or major == 5:
        depth += 1
        if major == 4:
            items = []
            for _ in range(arg):
                value, pos = _item(data, pos, end, depth, max_depth)
                items.append(value)
            return items, pos
        out: dict[Any, Any] = {}
        previous = b""
        for i in range(arg):
            key_start = pos
            key, pos = _item(data, pos, end, depth, max_depth)
            if not isinstance(key, (str, int)) or isinstance(key, bool):
                raise RemoteProtocolError("map keys must be text or integers")
            encoded_key = data[key_start:pos]
            if i and encoded_key <= previous:
                raise RemoteProtocolError("map keys unsorted or duplicated")
            previous = encoded_key
            out[key], pos = _item(data, pos, end, depth, max_depth)
        return out, pos
    if major == 6:
        raise RemoteProtocolError("CBOR tags are not accepted")
    if arg in _SIMPLE:
        return _SIMPLE[arg], pos
    raise RemoteProtocolError("unsupported CBOR simple value")
