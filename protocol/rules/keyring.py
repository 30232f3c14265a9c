"""A bank's public keys as one verification context, built from its keys announcement.

Every party verifies with the same keyring: the bank, a vendor checking a coin before relaying
it, and a wallet choosing a keyset. Keysets not listed in the announcement do not exist for it
(DESIGN.md §5, tagging). Vendors the announcement lists as revoked are refused by name. Each
keyset's phase record (docs/LIFECYCLE.md) decides what it may still be used for: a retired keyset
takes no withdrawals but its coins are spent until ``spend_until``.

Which keyset a wallet withdraws from when not told is :func:`default_withdrawal`: the bank's
power-of-two keysets (:func:`is_change`) are its change denominations, not coins to pay with.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from .. import blindrsa
from ..errors import ErrorCode, RemoteProtocolError
from ..messages import Coin, KeysAnnouncement, KeysetInfo, KeysetPhase
from .phases import Use, follow_phases, require

__all__ = ["COIN_VARIANT", "Keyring", "default_withdrawal", "is_change"]

COIN_VARIANT = blindrsa.SHA384_PSS_RANDOMIZED


def is_change(info: KeysetInfo) -> bool:
    """Whether ``info`` is one of the bank's change denominations: its token count is a power of
    two, the only keysets an exchange makes change in (docs/LIFECYCLE.md, "Exchange")."""
    return info.n & (info.n - 1) == 0


def default_withdrawal(keysets: Iterable[KeysetInfo]) -> KeysetInfo | None:
    """The keyset a wallet withdraws from when none is named; ``None`` when ``keysets`` is empty.

    The cheapest coin among those that are not change (:func:`is_change`): a wallet paying with
    one-token change coins would need a coin per token. Only when every keyset given is change is
    the cheapest of them taken. Equal values go to the longest-lived keyset, then the lowest id,
    so every caller picks the same one. The caller passes the keysets open for withdrawal.
    """
    ranked = sorted(keysets, key=lambda k: (is_change(k), k.value, -k.spend_until, k.id))
    return ranked[0] if ranked else None


@dataclass(frozen=True, slots=True)
class Keyring:
    """Public keys of one bank: CA, answer signing, sealing, each keyset's RSA key, the names of
    the vendors whose certificates it revoked, and the keysets' phase records."""

    bank: str
    ca_key: Ed25519PublicKey
    answer_key: Ed25519PublicKey
    sealing_key: X25519PublicKey
    keysets: Mapping[str, KeysetInfo]
    rsa_keys: Mapping[str, blindrsa.PublicKey]
    revoked: frozenset[str] = frozenset()
    phases: Mapping[str, KeysetPhase] = field(default_factory=dict)
    """Phase records by keyset id, as followed (never moved back): see :meth:`following`."""

    @classmethod
    def from_announcement(cls, announcement: KeysAnnouncement,
                          known: Mapping[str, KeysetPhase] | None = None) -> Keyring:
        """Build a keyring from a verified announcement, following the phase records ``known``
        from earlier ones (see :meth:`following`)."""
        return cls.following(announcement, known or {})[0]

    @classmethod
    def following(cls, announcement: KeysAnnouncement,
                  known: Mapping[str, KeysetPhase]) -> tuple[Keyring, tuple[str, ...]]:
        """The keyring of a verified announcement, its phase records merged into ``known`` by
        :func:`~m2mpay.protocol.rules.phases.follow_phases`, and the keysets whose record update
        was refused as a rollback (the old record stays). A record that does not fit its keyset
        refuses the whole announcement (``bad_request``)."""
        phases, refused = follow_phases(known, announcement.keysets, announcement.phases or ())
        return cls._build(announcement, phases), refused

    @classmethod
    def _build(cls, announcement: KeysAnnouncement, phases: Mapping[str, KeysetPhase]) -> Keyring:
        return cls(
            bank=announcement.bank,
            ca_key=Ed25519PublicKey.from_public_bytes(announcement.ca_key),
            answer_key=Ed25519PublicKey.from_public_bytes(announcement.answer_key),
            sealing_key=X25519PublicKey.from_public_bytes(announcement.sealing_key),
            keysets={k.id: k for k in announcement.keysets},
            rsa_keys={k.id: blindrsa.PublicKey.from_der(k.public_key) for k in announcement.keysets},
            revoked=frozenset(announcement.revoked),
            phases=phases,
        )

    def refuse_revoked(self, vendor: str) -> None:
        """Raise ``revoked`` if the bank revoked this vendor's certificates."""
        if vendor in self.revoked:
            raise RemoteProtocolError(f"vendor {vendor} revoked by the bank", ErrorCode.REVOKED)

    def keyset(self, keyset_id: str) -> KeysetInfo:
        """The keyset with this id; ``unknown_keyset`` if the bank does not list it."""
        info = self.keysets.get(keyset_id)
        if info is None:
            raise RemoteProtocolError(f"unknown keyset {keyset_id}", ErrorCode.UNKNOWN_KEYSET)
        return info

    def withdrawable(self, keyset_id: str, now: int) -> KeysetInfo:
        """A keyset one may withdraw from at ``now`` (``keyset_expired`` once retired or past its date)."""
        info = self.keyset(keyset_id)
        require(info, self.phases.get(info.id), now, Use.WITHDRAW)
        return info

    def spendable(self, keyset_id: str, now: int) -> bool:
        """Whether coins of this listed keyset may still be spent (blocked, settled) at ``now``."""
        info = self.keysets.get(keyset_id)
        if info is None:
            return False
        try:
            require(info, self.phases.get(info.id), now, Use.SPEND)
        except RemoteProtocolError:
            return False
        return True

    def signed(self, coin: Coin) -> bool:
        """Whether ``coin`` carries the bank's signature under its keyset (``False``: not listed)."""
        key = self.rsa_keys.get(coin.keyset)
        return key is not None and blindrsa.is_valid(key, coin.signed_input, coin.sig, COIN_VARIANT)

    def verify_coin(self, coin: Coin, now: int) -> KeysetInfo:
        """Check that ``coin`` carries the bank's signature under a keyset spendable at ``now``."""
        info = self.keyset(coin.keyset)
        require(info, self.phases.get(info.id), now, Use.SPEND)
        if not self.signed(coin):
            raise RemoteProtocolError("coin signature does not verify", ErrorCode.BAD_SIGNATURE)
        return info
