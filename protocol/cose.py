"""COSE_Sign1 (RFC 9052) with Ed25519, for every signed m2mpay message.

A signed message travels as an *untagged* COSE_Sign1 array (the context says what it is)::

    [protected: bstr .cbor {1: -8, 4: kid}, unprotected: {}, payload: bstr, signature: bstr]

The signature covers ``Sig_structure = ["Signature1", protected, external_aad, payload]``.
m2mpay puts a purpose string into ``external_aad`` (e.g. ``b"m2mpay/req/block"``), so a
signature made for one purpose never verifies for another. A tagged (18) COSE_Sign1 is
accepted too, for interoperability with general COSE libraries.

The four arrays are laid out here byte by byte (their deterministic encoding is fixed: a head
and three or four byte strings; tests compare them with :mod:`m2mpay.protocol.cbor`). The curve
arithmetic is libsodium's (PyNaCl): it verifies in about half the time OpenSSL's Ed25519 takes
(measured: 56 against 108 µs a signature) and is no less strict (it refuses non-canonical
signatures and small-order keys as well). Keys stay ``cryptography`` objects in the API; a key that
signs often is prepared once as a :class:`SigningKey`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import nacl.bindings
import nacl.exceptions
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from . import cbor
from .errors import ErrorCode, RemoteProtocolError

__all__ = [
    "ALG_EDDSA",
    "Sign1",
    "SigningKey",
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
_SIG_STRUCTURE = b"\x84\x6aSignature1"  # an array of 4, then the text "Signature1"
_PROTECTED = b"\xa2\x01\x27\x04"  # a map of 2: alg (1) EdDSA (-8), then kid (4): its bytes follow
_NO_HEADERS = b"\xa0"  # the empty unprotected map


def _bstr(data: bytes) -> bytes:
    """A CBOR byte string, its head in the shortest form (RFC 8949 §4.2.1)."""
    n = len(data)
    if n < 24:
        head = bytes((0x40 + n,))
    elif n < 0x100:
        head = bytes((0x58, n))
    elif n < 0x10000:
        head = b"\x59" + n.to_bytes(2, "big")
    elif n < 0x100000000:
        head = b"\x5a" + n.to_bytes(4, "big")
    else:
        head = b"\x5b" + n.to_bytes(8, "big")
    return head + data


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
    """``cbor.encode(["Signature1", protected, external_aad, payload])``, laid out directly."""
    return b"".join((_SIG_STRUCTURE, _bstr(protected), _bstr(external_aad), _bstr(payload)))


@dataclass(frozen=True, slots=True, repr=False)
class SigningKey:
    """An Ed25519 private key in libsodium's form (seed and public key, 64 bytes), made once.

    Deriving that form costs about as much as a signature (the public key is computed), so a key
    that signs often (the bank's answer key) is prepared with :meth:`of` and kept.
    """

    _secret: bytes = field(repr=False)

    @classmethod
    def of(cls, key: Ed25519PrivateKey) -> SigningKey:
        """``key``, prepared."""
        _public, secret = nacl.bindings.crypto_sign_seed_keypair(key.private_bytes_raw())
        return cls(secret)

    def sign(self, message: bytes) -> bytes:
        """The 64-byte Ed25519 signature of ``message`` (RFC 8032: the same bytes OpenSSL gives)."""
        return nacl.bindings.crypto_sign(message, self._secret)[:64]


def sign1(payload: bytes, key: Ed25519PrivateKey | SigningKey, kid: bytes, external_aad: bytes = b"") -> bytes:
    """Sign ``payload`` as an untagged COSE_Sign1 naming the signer by ``kid``."""
    protected = _PROTECTED + _bstr(kid)
    signature = key.sign(_sig_structure(protected, external_aad, payload))
    return b"".join((b"\x84", _bstr(protected), _NO_HEADERS, _bstr(payload), _bstr(signature)))


def _verifies(public: Ed25519PublicKey, signature: bytes, message: bytes) -> bool:
    try:
        nacl.bindings.crypto_sign_open(signature + message, public.public_bytes_raw())
    except nacl.exceptions.BadSignatureError:
        return False
    return True


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
    if not _verifies(public, msg.signature, msg.to_be_signed(external_aad)):
        raise RemoteProtocolError("signature does not verify", ErrorCode.BAD_SIGNATURE)
    return msg
