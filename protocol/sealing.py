"""HPKE sealing of the blocking authorization (DESIGN.md §4).

RFC 9180 base mode, DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, ChaCha20-Poly1305, through
``cryptography``'s HPKE. The sealed blob is ``enc (32 bytes) || ciphertext``; its ``info`` binds
the bank id, so a blob sealed for one bank never opens at another. Authenticated encryption is
what makes the authorization non-malleable: changing any bit of token, deadline, beneficiary or
nonce makes :func:`open_sealed` fail.
"""

from __future__ import annotations

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from . import wire
from .errors import ErrorCode, RemoteProtocolError

__all__ = ["MAX_SEALED", "SEAL_OVERHEAD", "info_for_bank", "open_sealed", "seal"]

SEAL_OVERHEAD = 32 + 16
"""Encapsulated key plus Poly1305 tag."""

MAX_SEALED = 512
"""An authorization is ~150 bytes; anything much larger is not one."""

_SUITE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.CHACHA20_POLY1305)


def info_for_bank(bank: str) -> bytes:
    """The HPKE ``info`` for sealing to ``bank``."""
    return wire.sealing_info(bank)


def seal(plaintext: bytes, public_key: X25519PublicKey, info: bytes) -> bytes:
    """Encrypt ``plaintext`` to ``public_key``. Randomness comes from the OS (HPKE's KEM)."""
    return _SUITE.encrypt(plaintext, public_key, info=info)


def open_sealed(sealed: bytes, private_key: X25519PrivateKey, info: bytes) -> bytes:
    """Decrypt a sealed blob; any tampering or a wrong ``info`` raises ``bad_request``."""
    if not isinstance(sealed, bytes) or not SEAL_OVERHEAD < len(sealed) <= MAX_SEALED:
        raise RemoteProtocolError("sealed authorization has a wrong size")
    try:
        return _SUITE.decrypt(sealed, private_key, info=info)
    except (InvalidTag, ValueError) as exc:
        raise RemoteProtocolError(
            "sealed authorization does not open", ErrorCode.BAD_SIGNATURE
        ) from exc
