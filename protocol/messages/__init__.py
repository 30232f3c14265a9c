"""Every m2mpay message: frozen, slotted, self-validating dataclasses with strict CBOR codecs."""

from ._fields import IDENT, MAX_TOKENS
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
    MAX_REVOKED,
    PHASES,
    PURPOSE_ANNOUNCE,
    Authorization,
    CertificateBody,
    Coin,
    KeyDelegation,
    KeysAnnouncement,
    KeysetInfo,
    KeysetPhase,
    coin_message,
    keyset_id,
)
from .exchange import ExchangeAnswer, ExchangeProof, ExchangeRequest, Output
from .payment import Due, FinalReceipt, Offer, OpenSession, Pay, Receipt, SessionOpened



def is_name(text: str) -> bool:
    """Whether ``text`` is a valid name of an account, vendor, bank or category (1-32 of [a-z0-9-_.])."""
    try:
        IDENT.check(text)
    except ValueError:
        return False
    return True


__all__ = [
    "COIN_DOMAIN",
    "MAX_TOKENS",
    "MAX_REVOKED",
    "MAX_WITHDRAW_BATCH",
    "OPS",
    "PHASES",
    "PURPOSE_ANNOUNCE",
    "Authorization",
    "BlockAnswer",
    "BlockRequest",
    "CertificateBody",
    "Coin",
    "Due",
    "ErrorAnswer",
    "ExchangeAnswer",
    "ExchangeProof",
    "ExchangeRequest",
    "FinalReceipt",
    "KeyDelegation",
    "KeysAnnouncement",
    "KeysetInfo",
    "KeysetPhase",
    "Message",
    "Offer",
    "OpenSession",
    "Output",
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
    "is_name",
    "keyset_id",
]
