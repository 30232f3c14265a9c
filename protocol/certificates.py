"""Vendor certificates and the keys announcement: COSE_Sign1 by the bank CA (DESIGN.md §5)."""

from __future__ import annotations

import hashlib

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from . import cose
from .errors import ErrorCode, RemoteProtocolError
from .messages import CertificateBody, KeysAnnouncement

__all__ = [
    "AAD_CERT",
    "CertificateCache",
    "AAD_KEYS",
    "ca_fingerprint",
    "cert_hash",
    "issue_certificate",
    "sign_announcement",
    "verify_announcement",
    "verify_certificate",
]

AAD_CERT = b"m2mpay/cert/1"
AAD_KEYS = b"m2mpay/keys/1"


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


def sign_announcement(announcement: KeysAnnouncement, ca_key: Ed25519PrivateKey) -> bytes:
    """Sign the keys announcement with the CA key."""
    return cose.sign1(
        announcement.encode(), ca_key, kid=announcement.bank.encode(), external_aad=AAD_KEYS
    )


def verify_announcement(data: bytes, fingerprint: str) -> KeysAnnouncement:
    """Verify a keys announcement against the provisioned CA fingerprint."""
    signed = cose.decode_sign1(data, max_size=KeysAnnouncement.MAX_SIZE)
    announcement = KeysAnnouncement.decode(signed.payload)
    if ca_fingerprint(announcement.ca_key) != fingerprint:
        raise RemoteProtocolError("keys announced under an unknown CA", ErrorCode.BAD_SIGNATURE)
    cose.verify_sign1(
        signed, Ed25519PublicKey.from_public_bytes(announcement.ca_key), external_aad=AAD_KEYS
    )
    return announcement
