"""Messages between devices and the bank over MQTT (DESIGN.md §3, §4, §7).

Requests travel signed (COSE_Sign1) on ``m2mpay/{bank}/req/{op}``; answers, signed by the
bank's answer key, go to the request's Response Topic. Every request carries a 16-byte
``req_id``: the bank's idempotency key is ``(signer, req_id)``.
"""

from __future__ import annotations

from typing import ClassVar

from ..errors import ErrorCode, LocalProtocolError
from ._fields import AMOUNT, COSE_BLOB, IDENT, NONCE, POSITION, REQ_ID, SESSION_ID, TIME, TOKEN
from ._schema import Bool, Bytes, ListOf, Message, Nested, Optional, Text, field, message
from .coins import Coin
from .exchange import ExchangeAnswer, ExchangeRequest, RestoreAnswer, RestoreRequest

__all__ = [
    "MAX_WITHDRAW_BATCH",
    "OPS",
    "BlockAnswer",
    "BlockRequest",
    "ErrorAnswer",
    "SettleAnswer",
    "SettleRequest",
    "StatusAnswer",
    "StatusRequest",
    "WithdrawAnswer",
    "WithdrawRequest",
]

MAX_WITHDRAW_BATCH = 64
_BLINDED = Bytes(256, 512)


@message
class WithdrawRequest(Message):
    """``U→F withdraw {account, keyset, blinded_msgs[], req_id}``, signed with the account key."""

    MAX_SIZE: ClassVar[int] = 64 * 1024

    account: str = field(IDENT)
    keyset: str = field(IDENT)
    blinded: tuple[bytes, ...] = field(ListOf(_BLINDED, MAX_WITHDRAW_BATCH, min_items=1))
    req_id: bytes = field(REQ_ID)


@message
class WithdrawAnswer(Message):
    """``F→U {blind_sigs[]}``: one blind signature per blinded message, in order."""

    MAX_SIZE: ClassVar[int] = 64 * 1024

    req_id: bytes = field(REQ_ID)
    keyset: str = field(IDENT)
    blind_sigs: tuple[bytes, ...] = field(ListOf(_BLINDED, MAX_WITHDRAW_BATCH, min_items=1))
    balance: int = field(AMOUNT)


@message
class BlockRequest(Message):
    """``V→F block {cert, coin, sealed, T, nonce, req_id}``, signed by the vendor's key."""

    cert: bytes = field(COSE_BLOB)
    coin: Coin = field(Nested(Coin))
    sealed: bytes = field(Bytes(64, 512))
    deadline: int = field(TIME)
    nonce: bytes = field(NONCE)
    req_id: bytes = field(REQ_ID)


@message
class BlockAnswer(Message):
    """The bank's answer to a block: the session starts at ``start`` and now stands at ``position``."""

    req_id: bytes = field(REQ_ID)
    session: bytes = field(SESSION_ID)
    tip: bytes = field(TOKEN)
    start: int = field(POSITION)
    position: int = field(POSITION)
    last: bytes = field(TOKEN)
    remaining: int = field(AMOUNT)
    deadline: int = field(TIME)

    def validate(self) -> None:
        if self.position >= self.start:
            raise LocalProtocolError("BlockAnswer: position must be below start")


@message
class SettleRequest(Message):
    """``V→F settle {tip, session, index j, token, keep_open, req_id}``, signed by the vendor."""

    tip: bytes = field(TOKEN)
    session: bytes = field(SESSION_ID)
    index: int = field(POSITION)
    token: bytes = field(TOKEN)
    keep_open: bool = field(Bool())
    req_id: bytes = field(REQ_ID)


@message
class SettleAnswer(Message):
    """What a settlement did: the amount credited now and where the coin stands."""

    req_id: bytes = field(REQ_ID)
    session: bytes = field(SESSION_ID)
    credited: int = field(AMOUNT)
    position: int = field(POSITION)
    spent: bool = field(Bool())
    open: bool = field(Bool())


@message
class StatusRequest(Message):
    """A vendor asks where a coin stands."""

    tip: bytes = field(TOKEN)
    req_id: bytes = field(REQ_ID)


@message
class StatusAnswer(Message):
    """A coin's public state; ``blocked_until`` only while a block is in force."""

    req_id: bytes = field(REQ_ID)
    tip: bytes = field(TOKEN)
    known: bool = field(Bool())
    position: int | None = field(Optional(POSITION), default=None)
    spent: bool = field(Bool(), default=False)
    blocked_until: int | None = field(Optional(TIME), default=None)
    session: bytes | None = field(Optional(SESSION_ID), default=None)


@message
class ErrorAnswer(Message):
    """Every rejection: ``{code, message}`` with a stable code (DESIGN.md §7)."""

    code: str = field(IDENT)
    message: str = field(Text(200))
    req_id: bytes | None = field(Optional(REQ_ID), default=None)

    @property
    def error_code(self) -> ErrorCode:
        """The code as an :class:`ErrorCode` (unknown codes read as ``internal``)."""
        return ErrorCode.from_wire(self.code)


OPS = {
    "withdraw": (WithdrawRequest, WithdrawAnswer),
    "block": (BlockRequest, BlockAnswer),
    "settle": (SettleRequest, SettleAnswer),
    "status": (StatusRequest, StatusAnswer),
    "exchange": (ExchangeRequest, ExchangeAnswer),  # plain CBOR: no account signs it (docs/LIFECYCLE.md)
    "restore": (RestoreRequest, RestoreAnswer),  # plain CBOR, like exchange: it names nobody and only reads
}
"""Each bank operation's request and answer message types, by topic name."""


