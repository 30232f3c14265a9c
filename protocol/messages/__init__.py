"""Every m2mpay message: frozen, slotted, self-validating dataclasses with strict CBOR codecs."""

from ._schema import Message
from .bank import (
    MAX_WITHDRAW_BATCH,
    OPS,
    BlockAnswer,
    BlockRequest,
    ErrorAnswer,
    SettleAnswer,
    SettleRequest,
    StatusAnswer,
    StatusRequest,
    WithdrawAnswer,
    WithdrawRequest,
)
from .coins import (
    COIN_DOMAIN,
    Authorization,
    CertificateBody,
    Coin,
    KeysAnnouncement,
    KeysetInfo,
    coin_message,
    keyset_id,
)
from .payment import Closed, Due, Offer, OpenSession, Pay, Receipt, SessionOpened

__all__ = [
    "COIN_DOMAIN",
    "MAX_WITHDRAW_BATCH",
    "OPS",
    "Authorization",
    "BlockAnswer",
    "BlockRequest",
    "CertificateBody",
    "Closed",
    "Coin",
    "Due",
    "ErrorAnswer",
    "KeysAnnouncement",
    "KeysetInfo",
    "Message",
    "Offer",
    "OpenSession",
    "Pay",
    "Receipt",
    "SessionOpened",
    "SettleAnswer",
    "SettleRequest",
    "StatusAnswer",
    "StatusRequest",
    "WithdrawAnswer",
    "WithdrawRequest",
    "coin_message",
    "keyset_id",
]
