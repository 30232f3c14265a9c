"""COSE_Sign1 (RFC 9052) with Ed25519, for every signed m2mpay message.

A signed message travels as an *untagged* COSE_Sign1 array (the context says what it is)::

    [protected: bstr .cbor {1: -8, 4: kid}, unprotected: {}, payload: bstr, signature: bstr]

The signature covers ``Sig_structure = ["Signature1", protected, external_aad, payload]``.
m2mpay puts a purpose string into ``external_aad`` (e.g. ``b"m2mpay/req/block"``), so a
signature made for one purpose never verifies for another. A tagged (18) COSE_Sign1 is
accepted too, for interoperability with general COSE libraries.

Signing and verification are thin: the CBOR goes through :mod:`m2mpay.protocol.cbor`, the curve
arithmetic through ``cryptography``'s Ed25519 (OpenSSL).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from . import cbor
from .errors import ErrorCode, RemoteProtocolError

__all__ = [
    "ALG_EDDSA",
    "Sign1",
    "decode_sign1",
    "public_key_bytes",
    "sign1",
    "verify_sign1",
]

ALG_EDDSA = -8
_HDR_ALG = 1
_HDR_KID = 4
_TAG_SIGN1 = b"\xd2"  # CBOR tag 18, one byte
_MAX_KID = 64


def public_key_bytes(key: Ed25519PublicKey) -> bytes:
    """The 32 raw bytes of an Ed25519 public key."""
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


@dataclass(frozen=True, slots=True)
class Sign1:
    """A decoded (not yet verified) COSE_Sign1."""

    protected: bytes
    kid: bytes
    payload: bytes
    signature: bytes

    def to_be_signed(self, external_aad: bytes) -> bytes:
        """The Sig_structure bytes the signature covers."""
        return _sig_structure(self.protected, external_aad, self.payload)


def _sig_structure(protected: bytes, external_aad: bytes, payload: bytes) -> bytes:
    return cbor.encode(["Signature1", protected, external_aad, payload])


def sign1(payload: bytes, key: Ed25519PrivateKey, kid: bytes, external_aad: bytes = b"") -> bytes:
    """Sign ``payload`` as an untagged COSE_Sign1 naming the signer by ``kid``."""
    protected = cbor.encode({_HDR_ALG: ALG_EDDSA, _HDR_KID: kid})
    signature = key.sign(_sig_structure(protected, external_aad, payload))
    return cbor.encode([protected, {}, payload, signature])


def decode_sign1(data: bytes, *, max_size: int = cbor.DEFAULT_MAX_SIZE) -> Sign1:
    """Parse a COSE_Sign1 and check its shape; the signature is *not* checked here.

    Use it to learn the ``kid`` before choosing the key; then call :func:`verify_sign1`.
    """
    if isinstance(data, (bytes, bytearray)) and data[:1] == _TAG_SIGN1:
        data = bytes(data[1:])
    item = cbor.decode(data, max_size=max_size)
    if not isinstance(item, list) or len(item) != 4:
        raise RemoteProtocolError("not a COSE_Sign1 array", ErrorCode.BAD_SIGNATURE)
    protected, unprotected, payload, signature = item
    if not (
        isinstance(protected, bytes)
        and isinstance(unprotected, dict)
        and isinstance(payload, bytes)
        and isinstance(signature, bytes)
    ):
        raise RemoteProtocolError("malformed COSE_Sign1", ErrorCode.BAD_SIGNATURE)
    if unprotected:
        raise RemoteProtocolError("unexpected unprotected COSE headers", ErrorCode.BAD_SIGNATURE)
    header = cbor.decode(protected, max_depth=1)
    if not isinstance(header, dict) or header.get(_HDR_ALG) != ALG_EDDSA:
        raise RemoteProtocolError("COSE algorithm must be EdDSA", ErrorCode.BAD_SIGNATURE)
    kid = header.get(_HDR_KID)
    if not isinstance(kid, bytes) or not 0 < len(kid) <= _MAX_KID or len(header) != 2:
        raise RemoteProtocolError("COSE kid missing or malformed", ErrorCode.BAD_SIGNATURE)
    if len(signature) != 64:
        raise RemoteProtocolError("Ed25519 signature must be 64 bytes", ErrorCode.BAD_SIGNATURE)
    return Sign1(protected=protected, kid=kid, payload=payload, signature=signature)


def verify_sign1(
    data: bytes | Sign1,
    key: Ed25519PublicKey | Callable[[bytes], Ed25519PublicKey | None],
    external_aad: bytes = b"",
) -> Sign1:
    """Verify a COSE_Sign1 and return it; raise ``bad_signature`` if it does not verify.

    ``key`` is either the expected public key or a lookup from ``kid`` to a key (``None``
    for an unknown signer).
    """
    msg = data if isinstance(data, Sign1) else decode_sign1(data)
    public = key if isinstance(key, Ed25519PublicKey) else key(msg.kid)
    if public is None:
        # The same words as a wrong signature: a refusal must not tell who has an account.
        raise RemoteProtocolError("signature does not verify", ErrorCode.BAD_SIGNATURE)
    try:
        public.verify(msg.signature, msg.to_be_signed(external_aad))
    except InvalidSignature as exc:
        raise RemoteProtocolError("signature does not verify", ErrorCode.BAD_SIGNATURE) from exc
    return msg
