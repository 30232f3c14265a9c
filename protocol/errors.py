"""The one error hierarchy of m2mpay, with the stable wire codes of DESIGN.md §7.

::

    ProtocolError                 (abstract: never raised itself)
    ├── LocalProtocolError        our own misuse: a bug or a wrong call in this process
    └── RemoteProtocolError       a peer's fault: bad bytes, forged or replayed data

Every error carries an :class:`ErrorCode`; the code knows its CoAP response code, so a
transport turns an error into an answer without a lookup table of its own. Peer-facing text is
``message``: it must never contain secrets or internal state. The core raises these and nothing
else for bad input; anything else escaping the core is a bug and is answered as ``internal``
with no detail.
"""

from __future__ import annotations

import enum

__all__ = [
    "ErrorCode",
    "LocalProtocolError",
    "ProtocolError",
    "RemoteProtocolError",
]


class ErrorCode(enum.Enum):
    """Stable error codes. The value is ``(wire code, CoAP response code)``."""

    BAD_REQUEST = ("bad_request", "4.00")
    UNSUPPORTED_VERSION = ("unsupported_version", "4.00")
    TOO_LARGE = ("too_large", "4.13")
    BAD_SIGNATURE = ("bad_signature", "4.01")
    CERT_INVALID = ("cert_invalid", "4.01")
    UNKNOWN_KEYSET = ("unknown_keyset", "4.04")
    UNKNOWN_SESSION = ("unknown_session", "4.04")
    UNKNOWN_OP = ("unknown_op", "4.04")
    UNKNOWN_COIN = ("unknown_coin", "4.04")
    UNKNOWN_ACCOUNT = ("unknown_account", "4.04")
    KEYSET_EXPIRED = ("keyset_expired", "4.03")
    CHAIN_MISMATCH = ("chain_mismatch", "4.03")
    DEADLINE = ("deadline", "4.03")
    INSUFFICIENT_FUNDS = ("insufficient_funds", "4.03")
    POLICY = ("policy", "4.03")
    REVOKED = ("revoked", "4.03")
    COIN_BLOCKED = ("coin_blocked", "4.09")
    COIN_SPENT = ("coin_spent", "4.09")
    REPLAY = ("replay", "4.09")
    SESSION_CLOSED = ("session_closed", "4.09")
    NO_PROGRESS = ("no_progress", "4.09")
    # Coin lifecycle (docs/LIFECYCLE.md): an exchange whose outputs and change cannot add up to
    # the coin's remainder exactly; an announcement that moves a keyset's phase back or brings
    # its redeem deadline forward (a wallet keeps the phase it had).
    VALUE_MISMATCH = ("value_mismatch", "4.03")
    PHASE_ROLLBACK = ("phase_rollback", "4.03")
    INTERNAL = ("internal", "5.00")
    UNAVAILABLE = ("unavailable", "5.03")

    @property
    def wire(self) -> str:
        """The code as it travels in a CBOR error ``{code, message}``."""
        return self.value[0]

    @property
    def coap(self) -> str:
        """The CoAP response code in dotted form, e.g. ``"4.09"``."""
        return self.value[1]

    @classmethod
    def from_wire(cls, code: str) -> ErrorCode:
        """The code for a wire string; unknown strings map to ``internal``."""
        return _BY_WIRE.get(code, cls.INTERNAL)


_BY_WIRE = {c.wire: c for c in ErrorCode}
if len(_BY_WIRE) != len(ErrorCode):  # pragma: no cover - a self-check, like aiocoap's error.py
    raise RuntimeError("duplicate wire error codes")


class ProtocolError(Exception):
    """Base of every error the protocol core raises. Abstract: raise a subclass."""

    code: ErrorCode

    def __init__(self, message: str, code: ErrorCode = ErrorCode.BAD_REQUEST) -> None:
        if type(self) is ProtocolError:
            raise TypeError("raise LocalProtocolError or RemoteProtocolError, not ProtocolError")
        super().__init__(message)
        self.message = message
        self.code = code

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code.wire}: {self.message})"


class LocalProtocolError(ProtocolError):
    """We tried to do something the protocol forbids: a bug or a misuse of the API."""


class RemoteProtocolError(ProtocolError):
    """A peer sent something invalid, forged, replayed or out of order.

    The answer to the peer is ``{code: self.code.wire, message: self.message}``.
    """
