"""Vendor certificates, the CA's key delegation and the keys announcement (DESIGN.md §5).

All three are COSE_Sign1 (Ed25519), each under its own context string (external_aad), so a
signature made for one can never pass as another:

- a vendor certificate is signed by the bank CA (``m2mpay/cert/1``);
- a key delegation is signed by the bank CA (``m2mpay/delegation/1``): it certifies the bank's
  online announcement key for one purpose and a validity window, so the CA key can stay offline;
- the keys announcement is signed by that delegated key (``m2mpay/keys/2``) and carries the
  delegation. Devices know only the CA fingerprint: they check the CA key against it, the
  delegation under the CA key, then the announcement under the delegated key.
"""

from __future__ import annotations

import hashlib

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from . import cose, wire
from .errors import ErrorCode, RemoteProtocolError
from .messages import PURPOSE_ANNOUNCE, CertificateBody, KeyDelegation, KeysAnnouncement

__all__ = [
    "AAD_CERT",
    "AAD_DELEGATION",
    "AAD_KEYS",
    "CertificateCache",
    "ca_fingerprint",
    "cert_hash",
    "issue_certificate",
    "issue_delegation",
    "sign_announcement",
    "verify_announcement",
    "verify_certificate",
    "verify_delegation",
]

AAD_CERT = wire.AAD_CERT
AAD_DELEGATION = wire.AAD_DELEGATION
AAD_KEYS = wire.AAD_KEYS


def ca_fingerprint(ca_key: bytes) -> str:
    """The fingerprint devices are provisioned with: hex SHA-256 of the raw CA public key."""
    return hashlib.sha256(ca_key).hexdigest()


def cert_hash(cert: bytes) -> bytes:
    """``SHA-256(C)``: how the sealed authorization names its beneficiary."""
    return hashlib.sha256(cert).digest()


def issue_certificate(body: CertificateBody, ca_key: Ed25519PrivateKey) -> bytes:
    """Sign a vendor certificate with the CA key."""
    return cose.sign1(body.encode(), ca_key, kid=body.bank.encode(), external_aad=AAD_CERT)


def verify_certificate(
    cert: bytes, ca_key: Ed25519PublicKey, bank: str, now: int
) -> CertificateBody:
    """Check a vendor certificate: CA signature, issuing bank, validity at ``now``."""
    try:
        signed = cose.verify_sign1(cert, ca_key, external_aad=AAD_CERT)
        body = CertificateBody.decode(signed.payload)
    except RemoteProtocolError as exc:
        raise RemoteProtocolError(f"certificate: {exc.message}", ErrorCode.CERT_INVALID) from exc
    if body.bank != bank:
        raise RemoteProtocolError("certificate issued by another bank", ErrorCode.CERT_INVALID)
    if not body.nbf <= now < body.exp:
        raise RemoteProtocolError("certificate not valid now", ErrorCode.CERT_INVALID)
    return body


class CertificateCache:
    """Remembers certificates whose CA signature verified, so a vendor's every block does not
    pay for it again. The validity window is still checked on every use. Bounded: the oldest
    entry goes first."""

    def __init__(self, ca_key: Ed25519PublicKey, bank: str, size: int = 4096) -> None:
        self.ca_key, self.bank, self.size = ca_key, bank, size
        self._verified: dict[bytes, CertificateBody] = {}

    def verify(self, cert: bytes, now: int) -> CertificateBody:
        """Like :func:`verify_certificate`, with the signature check done once per certificate."""
        body = self._verified.get(cert)
        if body is None:
            body = verify_certificate(cert, self.ca_key, self.bank, now)
            if len(self._verified) >= self.size:
                del self._verified[next(iter(self._verified))]
            self._verified[cert] = body
        elif not body.nbf <= now < body.exp:
            raise RemoteProtocolError("certificate not valid now", ErrorCode.CERT_INVALID)
        return body


def issue_delegation(body: KeyDelegation, ca_key: Ed25519PrivateKey) -> bytes:
    """Certify an online key of the bank with the CA key (an admin command; the CA key is offline)."""
    return cose.sign1(body.encode(), ca_key, kid=body.bank.encode(), external_aad=AAD_DELEGATION)


def verify_delegation(
    data: bytes, ca_key: Ed25519PublicKey, bank: str, now: int, purpose: str = PURPOSE_ANNOUNCE
) -> KeyDelegation:
    """Check a key delegation: CA signature, issuing bank, purpose, validity at ``now``."""
    try:
        signed = cose.verify_sign1(data, ca_key, external_aad=AAD_DELEGATION)
        body = KeyDelegation.decode(signed.payload)
    except RemoteProtocolError as exc:
        raise RemoteProtocolError(f"key delegation: {exc.message}", ErrorCode.BAD_SIGNATURE) from exc
    if body.bank != bank:
        raise RemoteProtocolError("key delegated by another bank", ErrorCode.BAD_SIGNATURE)
    if body.purpose != purpose:
        raise RemoteProtocolError(f"key delegated for {body.purpose}, not {purpose}", ErrorCode.BAD_SIGNATURE)
    if not body.nbf <= now < body.exp:
        raise RemoteProtocolError("key delegation not valid now", ErrorCode.BAD_SIGNATURE)
    return body


def sign_announcement(announcement: KeysAnnouncement, key: Ed25519PrivateKey) -> bytes:
    """Sign the keys announcement with the online key its ``delegation`` certifies."""
    return cose.sign1(
        announcement.encode(), key, kid=announcement.bank.encode(), external_aad=AAD_KEYS
    )


def verify_announcement(data: bytes, fingerprint: str, now: int) -> KeysAnnouncement:
    """Verify a keys announcement against the provisioned CA fingerprint, at time ``now``.

    The CA key it names must have that fingerprint; its delegation must be signed by that CA
    key, for this bank and the purpose ``announce``, valid at ``now``; and the announcement must
    be signed by the delegated key.
    """
    signed = cose.decode_sign1(data, max_size=KeysAnnouncement.MAX_SIZE)
    announcement = KeysAnnouncement.decode(signed.payload)
    if ca_fingerprint(announcement.ca_key) != fingerprint:
        raise RemoteProtocolError("keys announced under an unknown CA", ErrorCode.BAD_SIGNATURE)
    ca_key = Ed25519PublicKey.from_public_bytes(announcement.ca_key)
    delegation = verify_delegation(announcement.delegation, ca_key, announcement.bank, now)
    cose.verify_sign1(
        signed, Ed25519PublicKey.from_public_bytes(delegation.key), external_aad=AAD_KEYS
    )
    return announcement
