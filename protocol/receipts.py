"""A vendor's signed final receipt: what a session came to, provable by the wallet that paid.

The close of a session is answered with a COSE_Sign1 (Ed25519) of a
:class:`~m2mpay.protocol.messages.FinalReceipt`, signed by the vendor's key — the one its certificate
names — with ``kid`` = the vendor id and external_aad ``m2mpay/receipt/1``, so no other signature
of the vendor (a request to the bank) passes as a receipt. The wallet checks it against the
certificate it checked at the offer and keeps both: together with the bank CA's key they prove
what the wallet paid whom, for which coin.
"""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from . import cose, wire
from .errors import ErrorCode, RemoteProtocolError
from .messages import CertificateBody, FinalReceipt

__all__ = ["AAD_RECEIPT", "sign_receipt", "verify_receipt"]

AAD_RECEIPT = wire.AAD_RECEIPT


def sign_receipt(receipt: FinalReceipt, key: Ed25519PrivateKey) -> bytes:
    """The receipt as the close answers it: signed by the vendor's certified key."""
    return cose.sign1(receipt.encode(), key, kid=receipt.vendor.encode(), external_aad=AAD_RECEIPT)


def verify_receipt(signed: bytes, cert: CertificateBody, *, tip: bytes, session: bytes | None = None) -> FinalReceipt:
    """Check a receipt against the vendor's (already checked) certificate and the session paid in.

    ``bad_signature`` unless the certificate's key signed it as a receipt, under the certificate's
    vendor id; ``bad_request`` if it is about another coin or session.
    """
    message = cose.verify_sign1(signed, Ed25519PublicKey.from_public_bytes(cert.key), external_aad=AAD_RECEIPT)
    receipt = FinalReceipt.decode(message.payload)
    if message.kid != cert.vendor.encode() or receipt.vendor != cert.vendor:
        raise RemoteProtocolError("receipt signed under another vendor's name", ErrorCode.BAD_SIGNATURE)
    if receipt.tip != tip or (session is not None and receipt.session != session):
        raise RemoteProtocolError("receipt of another coin or session", ErrorCode.BAD_REQUEST)
    return receipt
