"""Messages between a user device and a vendor over CoAP (DESIGN.md §4)."""

from __future__ import annotations

from ._fields import AMOUNT, COSE_BLOB, IDENT, NONCE, POSITION, SESSION_ID, TIME, TOKEN
from ._schema import Bool, Bytes, ListOf, Message, Nested, Optional, Text, UInt, field, message
from .coins import Coin

__all__ = ["Closed", "Due", "Offer", "OpenSession", "Pay", "Receipt", "SessionOpened"]


@message
class Offer(Message):
    """``GET /offer``: who the vendor is, what it sells, at what price, until when."""

    cert: bytes = field(COSE_BLOB)
    service: str = field(Text(64, min_len=1))
    unit: str = field(Text(16, min_len=1))
    price: int = field(UInt(1 << 20, minimum=1))
    """Tokens per unit."""
    deadline: int = field(TIME)
    nonce: bytes = field(NONCE)
    bank: str = field(IDENT)
    keysets: tuple[str, ...] = field(ListOf(IDENT, 64, min_items=1))


@message
class OpenSession(Message):
    """``POST /sessions``: the coin, the sealed authorization, and the offer's ``T`` and nonce."""

    coin: Coin = field(Nested(Coin))
    sealed: bytes = field(Bytes(64, 512))
    deadline: int = field(TIME)
    nonce: bytes = field(NONCE)


@message
class SessionOpened(Message):
    """The vendor's answer once the bank blocked the coin."""

    session: bytes = field(SESSION_ID)
    position: int = field(POSITION)
    remaining: int = field(AMOUNT)
    deadline: int = field(TIME)


@message
class Due(Message):
    """An Observe notification of ``/sessions/{id}/due``: pay ``tokens`` more, for ``reason``."""

    seq: int = field(UInt(1 << 32))
    tokens: int = field(UInt(1 << 20))
    reason: str = field(Text(64))


@message
class Pay(Message):
    """``POST /sessions/{id}/pay``: the token ``H^index(S)``."""

    index: int = field(POSITION)
    token: bytes = field(TOKEN)


@message
class Receipt(Message):
    """The vendor's acknowledgement; a repeated ``Pay`` gets the same receipt."""

    session: bytes = field(SESSION_ID)
    index: int = field(POSITION)
    paid: int = field(UInt(1 << 24))
    """Tokens received in this session so far, the blocking token included."""


@message
class Closed(Message):
    """``POST /sessions/{id}/close``: what the bank credited and the final chain index.

    ``pending`` (true, or absent) says the bank has not answered the final settlement yet: the
    session is over and every token paid is the vendor's, ``credited`` is what was credited so far,
    and the coin stays blocked for this vendor until the settlement lands or ``T`` passes.
    """

    session: bytes = field(SESSION_ID)
    credited: int = field(AMOUNT)
    index: int = field(POSITION)
    pending: bool | None = field(Optional(Bool()), default=None)
