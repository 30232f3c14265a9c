"""Coins, keysets, the bank's keys announcement, vendor certificates and the sealed authorization."""

from __future__ import annotations

import hashlib
from typing import ClassVar

from .. import cbor, wire
from ..errors import LocalProtocolError
from ._fields import COSE_BLOB, IDENT, MAX_TOKENS, NONCE, POSITION, RSA_SIG, TIME, TOKEN
from ._schema import Bytes, ListOf, Message, Nested, Optional, Text, UInt, field, message

__all__ = [
    "COIN_DOMAIN",
    "MAX_REVOKED",
    "PHASES",
    "PURPOSE_ANNOUNCE",
    "Authorization",
    "CertificateBody",
    "Coin",
    "KeyDelegation",
    "KeysAnnouncement",
    "KeysetInfo",
    "KeysetPhase",
    "coin_message",
    "keyset_id",
]

COIN_DOMAIN = wire.COIN_DOMAIN


def coin_message(keyset: str, tip: bytes) -> bytes:
    """The message the bank blind-signs for a coin: ``CBOR(["m2mpay/coin/1", keyset, tip])``."""
    return cbor.encode([COIN_DOMAIN, keyset, tip])


def keyset_id(
    value: int, n: int, currency: str, withdraw_until: int, spend_until: int, public_key: bytes
) -> str:
    """A keyset's id: a digest of everything it fixes, so one id never names two keysets."""
    digest = hashlib.sha256(
        cbor.encode([wire.KEYSET_DOMAIN, value, n, currency, withdraw_until, spend_until, public_key])
    ).hexdigest()
    return "ks-" + digest[:16]


@message
class Coin(Message):
    """A coin on the wire: ``{keyset, tip, prefix, sig}`` (DESIGN.md §2)."""

    keyset: str = field(IDENT)
    tip: bytes = field(TOKEN)
    prefix: bytes = field(Bytes(size=32))
    sig: bytes = field(RSA_SIG)

    @property
    def signed_input(self) -> bytes:
        """The RFC 9474 ``input_msg`` the signature covers: ``prefix || coin_message``."""
        return self.prefix + coin_message(self.keyset, self.tip)


@message
class KeysetInfo(Message):
    """A denomination: coin value ``M`` in minor units, ``n`` tokens, validity, RSA key (DER)."""

    id: str = field(IDENT)
    value: int = field(UInt(1 << 53, minimum=1))
    n: int = field(UInt(MAX_TOKENS, minimum=1))
    currency: str = field(Text(8, min_len=1))
    withdraw_until: int = field(TIME)
    spend_until: int = field(TIME)
    public_key: bytes = field(Bytes(200, 800))

    def validate(self) -> None:
        if self.value % self.n:
            raise LocalProtocolError("KeysetInfo: token value M/n must be an integer")
        if self.spend_until < self.withdraw_until:
            raise LocalProtocolError("KeysetInfo: spend_until precedes withdraw_until")
        expected = keyset_id(
            self.value, self.n, self.currency, self.withdraw_until, self.spend_until,
            self.public_key,
        )
        if self.id != expected:
            raise LocalProtocolError("KeysetInfo: id does not match its contents")

    @property
    def token_value(self) -> int:
        """Value of one token, ``M/n`` minor units."""
        return self.value // self.n


MAX_REVOKED = 1024
"""Most vendors an announcement lists as revoked (only those whose certificate has not expired)."""

PURPOSE_ANNOUNCE = "announce"
"""The one purpose a :class:`KeyDelegation` certifies today: signing the keys announcement."""


@message
class KeyDelegation(Message):
    """The CA certifies an online key of the bank for one purpose and a limited time.

    It lets the CA key stay offline: the running bank signs its announcement with the delegated
    key, and devices check this certificate under the CA key they are provisioned with.
    """

    bank: str = field(IDENT)
    key: bytes = field(Bytes(size=32))
    purpose: str = field(IDENT)
    nbf: int = field(TIME)
    exp: int = field(TIME)

    def validate(self) -> None:
        if self.exp <= self.nbf:
            raise LocalProtocolError("KeyDelegation: exp must follow nbf")


PHASES = ("active", "spend-only", "exchange-only", "closed")
"""A keyset's phases, in the only order they move (docs/LIFECYCLE.md)."""


@message
class KeysetPhase(Message):
    """A keyset's phase as the bank announces it, with the dates that move it on by themselves.

    ``withdraw_until`` is the keyset's own date, or the moment it was retired if earlier;
    ``spend_until`` stays the keyset's own (its id binds it); ``redeem_until`` (not before
    ``spend_until``) ends exchanges. ``phase`` may be ahead of the dates (a retirement), never
    behind them: a device takes the later of the two.
    """

    keyset: str = field(IDENT)
    phase: str = field(Text(16, min_len=1))
    withdraw_until: int = field(TIME)
    redeem_until: int = field(TIME)
    retired: int | None = field(Optional(TIME), default=None)

    def validate(self) -> None:
        if self.phase not in PHASES:
            raise LocalProtocolError(f"KeysetPhase.phase must be one of {', '.join(PHASES)}")
        if self.redeem_until < self.withdraw_until:
            raise LocalProtocolError("KeysetPhase: redeem_until precedes withdraw_until")
        if self.retired is not None and self.withdraw_until > self.retired:
            raise LocalProtocolError("KeysetPhase: withdrawals end at the retirement at the latest")


@message
class KeysAnnouncement(Message):
    """The bank's public keys, retained on ``m2mpay/{bank}/keys``, signed by the online key that
    ``delegation`` (a CA-signed :class:`KeyDelegation`) certifies; ``revoked`` names the vendors
    whose certificates no wallet may pay any more."""

    MAX_SIZE: ClassVar[int] = 128 * 1024

    bank: str = field(IDENT)
    issued: int = field(TIME)
    ca_key: bytes = field(Bytes(size=32))
    delegation: bytes = field(COSE_BLOB)
    answer_key: bytes = field(Bytes(size=32))
    sealing_key: bytes = field(Bytes(size=32))
    keysets: tuple[KeysetInfo, ...] = field(ListOf(Nested(KeysetInfo), 64))
    revoked: tuple[str, ...] = field(ListOf(IDENT, MAX_REVOKED))
    phases: tuple[KeysetPhase, ...] | None = field(Optional(ListOf(Nested(KeysetPhase), 64, min_items=1)),
                                                   default=None)
    """Phase records, at most one per listed keyset; left out when there are none (a keyset
    without one is active by its dates). Devices adopt them through
    :func:`~m2mpay.protocol.rules.phases.follow_phases`, which also checks each against its keyset."""

    def validate(self) -> None:
        listed = {k.id for k in self.keysets}
        named = [p.keyset for p in self.phases or ()]
        if len(set(named)) != len(named) or not listed.issuperset(named):
            raise LocalProtocolError("KeysAnnouncement: a phase record for an unlisted keyset, or two for one")

    def keyset(self, keyset_id: str) -> KeysetInfo | None:
        """The listed keyset with this id, or ``None``."""
        for info in self.keysets:
            if info.id == keyset_id:
                return info
        return None


@message
class CertificateBody(Message):
    """What the bank CA certifies about a vendor: ``{bank, vendor, account, name, category, key, nbf, exp}``."""

    bank: str = field(IDENT)
    vendor: str = field(IDENT)
    account: str = field(IDENT)
    name: str = field(Text(64, min_len=1))
    category: str = field(IDENT)
    key: bytes = field(Bytes(size=32))
    nbf: int = field(TIME)
    exp: int = field(TIME)

    def validate(self) -> None:
        if self.exp <= self.nbf:
            raise LocalProtocolError("CertificateBody: exp must follow nbf")


@message
class Authorization(Message):
    """The plaintext the user seals to the bank: token, deadline, beneficiary and session bound."""

    tip: bytes = field(TOKEN)
    index: int = field(POSITION)
    token: bytes = field(TOKEN)
    deadline: int = field(TIME)
    cert: bytes = field(Bytes(size=32))
    nonce: bytes = field(NONCE)

