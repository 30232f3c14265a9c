"""Field kinds and the :class:`Message` base that every m2mpay message is built on.

A message is a frozen, slotted, keyword-only dataclass whose fields each carry a *kind* (bytes of
a length range, bounded text, bounded unsigned integer, nested message, bounded list, optional).
The kind checks values when the message is built, converts to and from CBOR-ready values, and
bounds everything a peer can send. On the wire a message is a CBOR map of its field names plus
``"v"`` (the version); optional fields that are ``None`` are left out; unknown keys are refused.

Errors: building an invalid message locally raises :class:`LocalProtocolError`; decoding invalid
peer bytes raises :class:`RemoteProtocolError` (``bad_request``, ``unsupported_version`` or
``too_large``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Generic, TypeVar, dataclass_transform

from .. import cbor
from ..errors import ErrorCode, LocalProtocolError, RemoteProtocolError

__all__ = [
    "Bool",
    "Bytes",
    "Kind",
    "ListOf",
    "Message",
    "Nested",
    "Optional",
    "Text",
    "UInt",
    "field",
    "message",
]

VERSION = 1
_IDENT_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_.")

T = TypeVar("T")
M = TypeVar("M", bound="Message")


class Kind(Generic[T]):
    """How one field is checked and carried. Subclasses override :meth:`check`."""

    def check(self, value: Any) -> None:
        """Raise ``ValueError`` with a short reason if ``value`` is not acceptable."""
        raise NotImplementedError

    def to_wire(self, value: T) -> Any:
        """The CBOR-ready form of a checked value."""
        return value

    def from_wire(self, raw: Any) -> T:
        """Build the value from decoded CBOR; raise ``ValueError`` if it does not fit."""
        self.check(raw)
        value: T = raw  # check() accepted it as a T (kinds whose value differs override this)
        return value


class Bytes(Kind[bytes]):
    """A byte string of ``min_len`` to ``max_len`` bytes (``size`` for an exact length)."""

    def __init__(self, min_len: int = 0, max_len: int = 1024, *, size: int | None = None) -> None:
        self.min_len, self.max_len = (size, size) if size is not None else (min_len, max_len)

    def check(self, value: Any) -> None:
        if not isinstance(value, bytes):
            raise ValueError("must be bytes")
        if not self.min_len <= len(value) <= self.max_len:
            if self.min_len == self.max_len:
                raise ValueError(f"must be {self.min_len} bytes")
            raise ValueError(f"must be {self.min_len}..{self.max_len} bytes")


class Text(Kind[str]):
    """A text string of at most ``max_len`` characters; ``ident`` limits it to [a-z0-9-_.]."""

    def __init__(self, max_len: int = 64, *, ident: bool = False, min_len: int = 0) -> None:
        self.max_len, self.ident, self.min_len = max_len, ident, min_len

    def check(self, value: Any) -> None:
        if not isinstance(value, str):
            raise ValueError("must be text")
        if not self.min_len <= len(value) <= self.max_len:
            raise ValueError(f"must be {self.min_len}..{self.max_len} characters")
        if self.ident and (not value or not _IDENT_CHARS.issuperset(value)):
            raise ValueError("must be a non-empty identifier of [a-z0-9-_.]")


class UInt(Kind[int]):
    """An integer in ``[minimum, maximum]`` (``bool`` is refused although it is an ``int``)."""

    def __init__(self, maximum: int = 2**63 - 1, *, minimum: int = 0) -> None:
        self.minimum, self.maximum = minimum, maximum

    def check(self, value: Any) -> None:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError("must be an integer")
        if not self.minimum <= value <= self.maximum:
            raise ValueError(f"must be in {self.minimum}..{self.maximum}")


class Bool(Kind[bool]):
    """``true`` or ``false``."""

    def check(self, value: Any) -> None:
        if not isinstance(value, bool):
            raise ValueError("must be a boolean")


class Nested(Kind[M]):
    """Another message, carried as its map without a version."""

    def __init__(self, cls: type[M]) -> None:
        self.cls = cls

    def check(self, value: Any) -> None:
        if not isinstance(value, self.cls):
            raise ValueError(f"must be a {self.cls.__name__}")

    def to_wire(self, value: M) -> Any:
        return value.to_obj(versioned=False)

    def from_wire(self, raw: Any) -> M:
        return self.cls.from_obj(raw, versioned=False)


class ListOf(Kind[tuple[T, ...]]):
    """A list of up to ``max_items`` values of one kind (a tuple in Python)."""

    def __init__(self, inner: Kind[T], max_items: int, *, min_items: int = 0) -> None:
        self.inner, self.max_items, self.min_items = inner, max_items, min_items

    def check(self, value: Any) -> None:
        if not isinstance(value, tuple):
            raise ValueError("must be a tuple")
        if not self.min_items <= len(value) <= self.max_items:
            raise ValueError(f"must have {self.min_items}..{self.max_items} items")
        for item in value:
            self.inner.check(item)

    def to_wire(self, value: tuple[T, ...]) -> Any:
        return [self.inner.to_wire(item) for item in value]

    def from_wire(self, raw: Any) -> tuple[T, ...]:
        if not isinstance(raw, list):
            raise ValueError("must be an array")
        if not self.min_items <= len(raw) <= self.max_items:
            raise ValueError(f"must have {self.min_items}..{self.max_items} items")
        return tuple(self.inner.from_wire(item) for item in raw)


class Optional(Kind[T | None]):
    """A value of ``inner`` kind, or ``None`` (left out on the wire)."""

    def __init__(self, inner: Kind[T]) -> None:
        self.inner = inner

    def check(self, value: Any) -> None:
        if value is not None:
            self.inner.check(value)

    def to_wire(self, value: T | None) -> Any:
        return None if value is None else self.inner.to_wire(value)

    def from_wire(self, raw: Any) -> T | None:
        return self.inner.from_wire(raw)


def field(kind: Kind[Any], *, default: Any = dataclasses.MISSING) -> Any:
    """Declare a message field of the given kind; optional fields pass ``default=None``."""
    return dataclasses.field(default=default, metadata={"kind": kind})


@dataclass_transform(frozen_default=True, kw_only_default=True, field_specifiers=(field,))
def message(cls: type[M]) -> type[M]:
    """Make ``cls`` a frozen, slotted, keyword-only message dataclass."""
    return dataclasses.dataclass(frozen=True, slots=True, kw_only=True)(cls)


_KINDS: dict[type[Any], tuple[tuple[str, Kind[Any]], ...]] = {}


def _kinds(cls: type[Message]) -> tuple[tuple[str, Kind[Any]], ...]:
    kinds = _KINDS.get(cls)
    if kinds is None:
        kinds = tuple((f.name, f.metadata["kind"]) for f in dataclasses.fields(cls))
        _KINDS[cls] = kinds
    return kinds


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Message:
    """Base of every message. Subclasses are final: don't subclass a concrete message."""

    MAX_SIZE: ClassVar[int] = cbor.DEFAULT_MAX_SIZE

    def __post_init__(self) -> None:
        for name, kind in _kinds(type(self)):
            try:
                kind.check(getattr(self, name))
            except ValueError as exc:
                raise LocalProtocolError(f"{type(self).__name__}.{name} {exc}") from None
        self.validate()

    def validate(self) -> None:
        """Cross-field checks; raise :class:`LocalProtocolError`. Override when needed."""

    def to_obj(self, *, versioned: bool = True) -> dict[str, Any]:
        """The message as a CBOR-ready map."""
        obj: dict[str, Any] = {"v": VERSION} if versioned else {}
        for name, kind in _kinds(type(self)):
            value = getattr(self, name)
            if value is not None:
                obj[name] = kind.to_wire(value)
        return obj

    def encode(self) -> bytes:
        """Deterministic CBOR bytes of the message."""
        return cbor.encode(self.to_obj())

    @classmethod
    def from_obj(cls: type[M], obj: Any, *, versioned: bool = True) -> M:
        """Build a message from decoded peer data; invalid data raises ``RemoteProtocolError``."""
        if not isinstance(obj, dict):
            raise RemoteProtocolError(f"{cls.__name__} must be a map")
        if versioned:
            if obj.get("v") != VERSION:
                raise RemoteProtocolError(
                    f"unsupported message version {obj.get('v')!r}", ErrorCode.UNSUPPORTED_VERSION
                )
            extra = obj.keys() - {"v"}
        else:
            extra = set(obj.keys())
        kinds = _kinds(cls)
        unknown = extra - {name for name, _ in kinds}
        if unknown:
            raise RemoteProtocolError(f"{cls.__name__}: unknown field {sorted(map(str, unknown))[0]}")
        values: dict[str, Any] = {}
        for name, kind in kinds:
            if name not in obj:
                if isinstance(kind, Optional):
                    continue
                raise RemoteProtocolError(f"{cls.__name__}.{name} is missing")
            try:
                values[name] = kind.from_wire(obj[name])
            except ValueError as exc:
                raise RemoteProtocolError(f"{cls.__name__}.{name} {exc}") from None
        try:
            return cls(**values)
        except LocalProtocolError as exc:
            raise RemoteProtocolError(exc.message, exc.code) from None

    @classmethod
    def decode(cls: type[M], data: bytes) -> M:
        """Strictly decode peer bytes into this message."""
        return cls.from_obj(cbor.decode(data, max_size=cls.MAX_SIZE))

