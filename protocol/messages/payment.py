"""Messages between a user device and a vendor over CoAP (DESIGN.md §4)."""

from __future__ import annotations

from ._fields import AMOUNT, COSE_BLOB, IDENT, MAX_TOKENS, NONCE, POSITION, SESSION_ID, TIME, TOKEN
from ._schema import Bool, Bytes, ListOf, Message, Nested, Optional, Text, UInt, field, message
from .coins import Coin

__all__ = ["Due", "FinalReceipt", "Offer", "OpenSession", "Pay", "Receipt", "SessionOpened"]


@message
class Offer(Message):
    """``GET /offer``: who the vendor is, what it sells, at what price, until when."""

    cert: bytes = field(COSE_BLOB)
    service: str = field(Text(64, min_len=1))
    unit: str = field(Text(16, min_len=1))
    price: int = field(UInt(1 << 20, minimum=1))
    """Money per unit of service, in minor units; the tokens owed follow from the coin's token value
    (:func:`m2mpay.protocol.rules.pricing.tokens_owed`)."""
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
    """An Observe notification of ``/sessions/{id}/due``: pay ``tokens`` more (a count of tokens), for ``reason``."""

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
    tokens: int = field(UInt(MAX_TOKENS))
    """Tokens received in this session so far, the blocking token included (a count, not money)."""


@message
class FinalReceipt(Message):
    """The answer to ``POST /sessions/{id}/close``, as the payload of a COSE_Sign1 by the vendor's
    certified key (external_aad ``m2mpay/receipt/1``): what the session came to.

    ``pending`` (true, or absent) says the bank has not answered the final settlement yet: the
    session is over and every token paid is the vendor's, ``credited`` is what was credited so far,
    and the coin stays blocked for this vendor until the settlement lands or ``T`` passes; a later
    close gets the final receipt.
    """

    session: bytes = field(SESSION_ID)
    tip: bytes = field(TOKEN)
    index: int = field(POSITION)
    tokens: int = field(UInt(MAX_TOKENS))
    """Tokens the vendor holds from the session, the blocking token included."""
    credited: int = field(AMOUNT)
    """Money the bank credited for the session (so far, while pending)."""
    pending: bool | None = field(Optional(Bool()), default=None)
    vendor: str = field(IDENT)
    ts: int = field(TIME)
