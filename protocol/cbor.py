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
    reader = _Reader(bytes(data), max_depth)
    value = reader.item(0)
    if reader.pos != len(reader.data):
        raise RemoteProtocolError("trailing bytes after CBOR item")
    return value


class _Reader:
    __slots__ = ("data", "max_depth", "pos")

    def __init__(self, data: bytes, max_depth: int) -> None:
        self.data = data
        self.pos = 0
        self.max_depth = max_depth

    def _take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise RemoteProtocolError("truncated CBOR")
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def _head(self) -> tuple[int, int]:
        """Read an initial byte and its argument; returns (major type, argument)."""
        if self.pos >= len(self.data):
            raise RemoteProtocolError("truncated CBOR")
        initial = self.data[self.pos]
        self.pos += 1
        major, info = initial >> 5, initial & 0x1F
        if info < 24:
            return major, info
        if major == 7:
            raise RemoteProtocolError("floats and extended simple values are not accepted")
        if info > 27:
            raise RemoteProtocolError("indefinite lengths are not accepted")
        width = 1 << (info - 24)
        arg = int.from_bytes(self._take(width), "big")
        # Deterministic encoding: the argument must not fit in a shorter form.
        floor = 24 if width == 1 else 1 << (4 * width)
        if arg < floor:
            raise RemoteProtocolError("non-shortest CBOR integer or length")
        return major, arg

    def _count(self, n: int) -> int:
        # Every item needs at least one byte: a count beyond what is left is a lie.
        if n > len(self.data) - self.pos:
            raise RemoteProtocolError("CBOR length exceeds the message")
        return n

    def item(self, depth: int) -> Any:
        start = self.pos
        major, arg = self._head()
        if major == 0:
            return arg
        if major == 1:
            return -1 - arg
        if major == 2:
            return self._take(self._count(arg))
        if major == 3:
            raw = self._take(self._count(arg))
            try:
                return raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise RemoteProtocolError("invalid UTF-8 in text string") from exc
        if major in (4, 5):
            if depth >= self.max_depth:
                raise RemoteProtocolError("CBOR nested too deeply")
            n = self._count(arg)
            if major == 4:
                return [self.item(depth + 1) for _ in range(n)]
            return self._map(n, depth + 1)
        if major == 6:
            raise RemoteProtocolError("CBOR tags are not accepted")
        if arg in _SIMPLE:
            return _SIMPLE[arg]
        self.pos = start
        raise RemoteProtocolError("unsupported CBOR simple value")

    def _map(self, n: int, depth: int) -> dict[Any, Any]:
        out: dict[Any, Any] = {}
        previous = b""
        for i in range(n):
            key_start = self.pos
            key = self.item(depth)
            if not isinstance(key, (str, int)) or isinstance(key, bool):
                raise RemoteProtocolError("map keys must be text or integers")
            encoded_key = self.data[key_start : self.pos]
            if i and encoded_key <= previous:
                raise RemoteProtocolError("map keys unsorted or duplicated")
            previous = encoded_key
            out[key] = self.item(depth)
        return out
