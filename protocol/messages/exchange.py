"""Messages of a coin's later life: keyset phases, exchange (refresh) and restore (docs/LIFECYCLE.md).

Exchange and restore are served by the bank (``exchange`` and ``restore`` in
:data:`~m2mpay.protocol.messages.bank.OPS`; docs/PROTOCOL.md specifies both). The exchange's CDDL
is in docs/PROTOCOL.md, the restore's is generated into docs/LIFECYCLE.md (``cddl.LIFECYCLE``).

- :class:`KeysetPhase` (defined with the keys announcement, which carries it, in
  :mod:`~m2mpay.protocol.messages.coins`): where a keyset stands and the dates that move it on.
- :class:`ExchangeRequest`: a coin's whole remainder into fresh blind coins. The coin is the
  authorization: its deepest preimage ``S = H^0(S)`` travels sealed to the bank in an
  :class:`ExchangeProof` that also binds the outputs, so whoever relays or reads the request
  cannot take the value for outputs of their own. ``change`` lets a wallet that is unsure how far
  the bank saw its coin spent (tokens written ahead that may never have left) still get the
  exact remainder: the bank signs the subset of ``change`` that covers the difference.
- :class:`RestoreRequest`: blinded messages a restored wallet recomputed from its seed; the bank
  answers with the signatures it already issued on them (by a withdrawal or an exchange, for the
  same keyset), and nothing else.
"""

from __future__ import annotations

import hashlib
from typing import ClassVar

from .. import cbor, wire
from ..errors import LocalProtocolError
from ._fields import IDENT, MAX_TOKENS, REQ_ID, RSA_SIG, TOKEN
from ._schema import Bytes, ListOf, Message, Nested, UInt, field, message
from .coins import PHASES, Coin, KeysetPhase

__all__ = [
    "EXCHANGE_SEALING_CONTEXT",
    "MAX_CHANGE",
    "MAX_OUTPUTS",
    "MAX_RESTORE",
    "PHASES",
    "ExchangeAnswer",
    "ExchangeProof",
    "ExchangeRequest",
    "KeysetPhase",
    "Output",
    "RestoreAnswer",
    "RestoreRequest",
    "exchange_sealing_info",
    "outputs_digest",
]

EXCHANGE_SEALING_CONTEXT = wire.EXCHANGE_SEALING_CONTEXT
"""HPKE ``info`` prefix of a sealed :class:`ExchangeProof`.

Distinct from the block authorization's ``m2mpay/sealed/1/{bank}``: a sealed exchange proof can
never be opened as an authorization, nor the other way round."""

MAX_OUTPUTS = 64
"""Outputs of one exchange: a remainder of up to 2^16 tokens needs 17 with power-of-two keysets."""

MAX_CHANGE = 17
"""Change slots: one per power of two up to 2^16, enough for any gap on any coin."""

MAX_RESTORE = 64
"""Blinded messages one restore request asks about."""

_BLINDED = Bytes(256, 512)


def exchange_sealing_info(bank: str) -> bytes:
    """The HPKE ``info`` for an exchange proof sealed to ``bank``."""
    return f"{EXCHANGE_SEALING_CONTEXT}/{bank}".encode()


@message
class Output(Message):
    """One coin to be: a blinded message for a keyset (whose value it will carry)."""

    keyset: str = field(IDENT)
    blinded: bytes = field(_BLINDED)


def outputs_digest(outputs: tuple[Output, ...], change: tuple[Output, ...]) -> bytes:
    """SHA-256 of ``CBOR([outputs, change])``: what a sealed proof binds."""
    return hashlib.sha256(cbor.encode([[o.to_obj(versioned=False) for o in outputs],
                                       [o.to_obj(versioned=False) for o in change]])).digest()


@message
class ExchangeProof(Message):
    """The sealed part of an exchange: the coin's deepest preimage and what it pays for."""

    tip: bytes = field(TOKEN)
    token: bytes = field(TOKEN)
    outputs: bytes = field(Bytes(size=32))
    req_id: bytes = field(REQ_ID)


def _distinct(outputs: tuple[Output, ...]) -> None:
    if len({o.blinded for o in outputs}) != len(outputs):
        raise LocalProtocolError("the same blinded message twice in one request")


@message
class ExchangeRequest(Message):
    """``U→F exchange {coin, sealed, outputs, change, req_id}``: no account, the coin authorizes."""

    MAX_SIZE: ClassVar[int] = 64 * 1024

    coin: Coin = field(Nested(Coin))
    sealed: bytes = field(Bytes(64, 512))
    outputs: tuple[Output, ...] = field(ListOf(Nested(Output), MAX_OUTPUTS))
    change: tuple[Output, ...] = field(ListOf(Nested(Output), MAX_CHANGE))
    req_id: bytes = field(REQ_ID)

    def validate(self) -> None:
        if not self.outputs and not self.change:
            raise LocalProtocolError("ExchangeRequest: no outputs")
        _distinct(self.outputs + self.change)

    @property
    def digest(self) -> bytes:
        """What the sealed :class:`ExchangeProof` must carry as ``outputs``."""
        return outputs_digest(self.outputs, self.change)


@message
class ExchangeAnswer(Message):
    """The bank's answer: the coin's remainder and a blind signature per output, then per change
    slot used (``change_used``, in increasing order)."""

    MAX_SIZE: ClassVar[int] = 64 * 1024

    req_id: bytes = field(REQ_ID)
    tip: bytes = field(TOKEN)
    position: int = field(UInt(MAX_TOKENS, minimum=1))
    blind_sigs: tuple[bytes, ...] = field(ListOf(RSA_SIG, MAX_OUTPUTS))
    change_used: tuple[int, ...] = field(ListOf(UInt(MAX_CHANGE - 1), MAX_CHANGE))
    change_sigs: tuple[bytes, ...] = field(ListOf(RSA_SIG, MAX_CHANGE))

    def validate(self) -> None:
        if len(self.change_used) != len(self.change_sigs):
            raise LocalProtocolError("ExchangeAnswer: one change signature per change slot used")
        if any(a >= b for a, b in zip(self.change_used, self.change_used[1:], strict=False)):
            raise LocalProtocolError("ExchangeAnswer: change slots in increasing order, once each")
        if not self.blind_sigs and not self.change_sigs:
            raise LocalProtocolError("ExchangeAnswer: no signature")


@message
class RestoreRequest(Message):
    """Which of these blinded messages did the bank sign? No account, no coin, nothing else."""

    MAX_SIZE: ClassVar[int] = 64 * 1024

    blinded: tuple[Output, ...] = field(ListOf(Nested(Output), MAX_RESTORE, min_items=1))
    req_id: bytes = field(REQ_ID)

    def validate(self) -> None:
        _distinct(self.blinded)


@message
class RestoreAnswer(Message):
    """The signatures the bank issued on the asked messages: ``found`` indexes the request."""

    MAX_SIZE: ClassVar[int] = 64 * 1024

    req_id: bytes = field(REQ_ID)
    found: tuple[int, ...] = field(ListOf(UInt(MAX_RESTORE - 1), MAX_RESTORE))
    blind_sigs: tuple[bytes, ...] = field(ListOf(RSA_SIG, MAX_RESTORE))

    def validate(self) -> None:
        if len(self.found) != len(self.blind_sigs):
            raise LocalProtocolError("RestoreAnswer: one signature per message found")
        if any(a >= b for a, b in zip(self.found, self.found[1:], strict=False)):
            raise LocalProtocolError("RestoreAnswer: found in increasing order, once each")

