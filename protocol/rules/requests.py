"""Checks a bank makes on a signed request before its rules run: pure, keys passed in."""

from __future__ import annotations

import functools
import hmac
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from .. import cose, sealing
from ..certificates import CertificateCache, cert_hash, verify_certificate
from ..envelope import request_aad
from ..errors import ErrorCode, RemoteProtocolError
from ..messages import Authorization, BlockRequest, CertificateBody, KeysetInfo
from .keyring import Keyring

__all__ = ["BlockIntent", "BlockWindow", "verify_block", "verify_signed"]


@dataclass(frozen=True, slots=True)
class BlockWindow:
    """How far ahead a blocking deadline may lie, in seconds."""

    min_ahead: int = 10
    max_ahead: int = 24 * 3600

    def check(self, deadline: int, now: int) -> None:
        """Refuse a deadline outside ``[now + min_ahead, now + max_ahead]``."""
        if not now + self.min_ahead <= deadline <= now + self.max_ahead:
            raise RemoteProtocolError("deadline outside the allowed window", ErrorCode.DEADLINE)


@dataclass(frozen=True, slots=True)
class BlockIntent:
    """A block request that passed every check: what :func:`apply_block` needs."""

    request: BlockRequest
    cert: CertificateBody
    keyset: KeysetInfo
    auth: Authorization


def verify_signed(
    signed: cose.Sign1, bank: str, op: str, key_of: Callable[[str], Ed25519PublicKey | None]
) -> str:
    """Verify a request's signature with the key of the signer its ``kid`` names; return it."""
    try:
        signer = signed.kid.decode("ascii")
    except UnicodeDecodeError as exc:
        raise RemoteProtocolError("signer id is not ASCII", ErrorCode.BAD_SIGNATURE) from exc
    cose.verify_sign1(signed, lambda _kid: key_of(signer), external_aad=request_aad(bank, op))
    return signer


@functools.lru_cache(maxsize=4096)
def _ed25519_key(raw: bytes) -> Ed25519PublicKey:
    """A vendor's key object, built once per key rather than once per block."""
    return Ed25519PublicKey.from_public_bytes(raw)


def verify_block(
    signed: cose.Sign1,
    keyring: Keyring,
    sealing_key: X25519PrivateKey,
    now: int,
    window: BlockWindow,
    certificates: CertificateCache | None = None,
    verified_key: bytes | None = None,
    request: BlockRequest | None = None,
) -> BlockIntent:
    """Everything DESIGN.md §4 asks of a block before the coin's record is touched.

    Vendor certificate (CA, bank, validity), the request signed by the certified key, the coin's
    keyset and signature, the sealed authorization opened and matching tip, ``T``, nonce and
    beneficiary, and ``T`` inside the window. ``verified_key``: the raw Ed25519 key that has
    already verified ``signed`` (the bank's record of the vendor); when the certificate certifies
    that very key, the same signature is not verified a second time. ``request``: the payload,
    when the caller has decoded it already (it must be ``signed``'s own).
    """
    if request is None:
        request = BlockRequest.decode(signed.payload)
    if certificates is not None:
        cert = certificates.verify(request.cert, now)
    else:
        cert = verify_certificate(request.cert, keyring.ca_key, keyring.bank, now)
    if signed.kid != cert.vendor.encode():
        raise RemoteProtocolError("request not signed by the certified vendor", ErrorCode.BAD_SIGNATURE)
    if verified_key is None or not hmac.compare_digest(verified_key, cert.key):
        cose.verify_sign1(signed, _ed25519_key(cert.key), external_aad=request_aad(keyring.bank, "block"))
    keyset = keyring.verify_coin(request.coin, now)
    plain = sealing.open_sealed(request.sealed, sealing_key, sealing.info_for_bank(keyring.bank))
    auth = Authorization.decode(plain)
    if not (
        hmac.compare_digest(auth.tip, request.coin.tip)
        and auth.deadline == request.deadline
        and hmac.compare_digest(auth.nonce, request.nonce)
        and hmac.compare_digest(auth.cert, cert_hash(request.cert))
    ):
        raise RemoteProtocolError("authorization does not match the request", ErrorCode.BAD_SIGNATURE)
    if auth.index >= keyset.n:
        raise RemoteProtocolError("chain position above the keyset's n", ErrorCode.BAD_REQUEST)
    window.check(request.deadline, now)
    return BlockIntent(request=request, cert=cert, keyset=keyset, auth=auth)
