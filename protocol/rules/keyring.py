"""A bank's public keys as one verification context, built from its keys announcement.

Every party verifies with the same keyring: the bank, a vendor checking a coin before relaying
it, and a wallet choosing a keyset. Keysets not listed in the announcement do not exist for it
(DESIGN.md §5, tagging). Vendors the announcement lists as revoked are refused by name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from .. import blindrsa
from ..errors import ErrorCode, RemoteProtocolError
from ..messages import Coin, KeysAnnouncement, KeysetInfo

__all__ = ["COIN_VARIANT", "Keyring"]

COIN_VARIANT = blindrsa.SHA384_PSS_RANDOMIZED


@dataclass(frozen=True, slots=True)
class Keyring:
    """Public keys of one bank: CA, answer signing, sealing, each keyset's RSA key, and the
    names of the vendors whose certificates it revoked."""

    bank: str
    ca_key: Ed25519PublicKey
    answer_key: Ed25519PublicKey
    sealing_key: X25519PublicKey
    keysets: Mapping[str, KeysetInfo]
    rsa_keys: Mapping[str, blindrsa.PublicKey]
    revoked: frozenset[str] = frozenset()

    @classmethod
    def from_announcement(cls, announcement: KeysAnnouncement) -> Keyring:
        """Build a keyring from a verified announcement."""
        return cls(
            bank=announcement.bank,
            ca_key=Ed25519PublicKey.from_public_bytes(announcement.ca_key),
            answer_key=Ed25519PublicKey.from_public_bytes(announcement.answer_key),
            sealing_key=X25519PublicKey.from_public_bytes(announcement.sealing_key),
            keysets={k.id: k for k in announcement.keysets},
            rsa_keys={k.id: blindrsa.PublicKey.from_der(k.public_key) for k in announcement.keysets},
            revoked=frozenset(announcement.revoked),
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
        """A keyset one may withdraw from at ``now``."""
        info = self.keyset(keyset_id)
        if now > info.withdraw_until:
            raise RemoteProtocolError("keyset closed for withdrawal", ErrorCode.KEYSET_EXPIRED)
        return info

    def verify_coin(self, coin: Coin, now: int) -> KeysetInfo:
        """Check that ``coin`` carries the bank's signature under a keyset spendable at ``now``."""
        info = self.keyset(coin.keyset)
        if now > info.spend_until:
            raise RemoteProtocolError("keyset no longer spendable", ErrorCode.KEYSET_EXPIRED)
        if not blindrsa.is_valid(self.rsa_keys[coin.keyset], coin.signed_input, coin.sig, COIN_VARIANT):
            raise RemoteProtocolError("coin signature does not verify", ErrorCode.BAD_SIGNATURE)
        return info
