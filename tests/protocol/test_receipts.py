"""The vendor's signed final receipt: a message like any other, signed under its own context."""

from __future__ import annotations

import dataclasses

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from m2mpay.protocol import cose, wire
from m2mpay.protocol.errors import ErrorCode, RemoteProtocolError
from m2mpay.protocol.messages import CertificateBody, FinalReceipt
from m2mpay.protocol.receipts import AAD_RECEIPT, sign_receipt, verify_receipt

from .world import BANK, NOW

KEY = Ed25519PrivateKey.generate()
CERT = CertificateBody(bank=BANK, vendor="meter", account="meter", name="Meter", category="parking",
                       key=cose.public_key_bytes(KEY.public_key()), nbf=NOW - 60, exp=NOW + 86400)
RECEIPT = FinalReceipt(session=b"s" * 16, tip=b"t" * 32, index=88, tokens=12, credited=120, vendor="meter", ts=NOW)


def test_final_receipt_round_trip_and_verification() -> None:
    assert FinalReceipt.decode(RECEIPT.encode()) == RECEIPT
    pending = dataclasses.replace(RECEIPT, pending=True)
    assert FinalReceipt.decode(pending.encode()).pending is True
    signed = sign_receipt(RECEIPT, KEY)
    assert cose.decode_sign1(signed).kid == b"meter"
    assert verify_receipt(signed, CERT, tip=b"t" * 32, session=b"s" * 16) == RECEIPT


@pytest.mark.parametrize(("name", "signed", "code"), [
    ("another key", sign_receipt(RECEIPT, Ed25519PrivateKey.generate()), ErrorCode.BAD_SIGNATURE),
    ("another context", cose.sign1(RECEIPT.encode(), KEY, b"meter", wire.request_aad("bank", "settle")),
     ErrorCode.BAD_SIGNATURE),
    ("another vendor's name", sign_receipt(dataclasses.replace(RECEIPT, vendor="kiosk"), KEY),
     ErrorCode.BAD_SIGNATURE),
    ("kid of another vendor", cose.sign1(RECEIPT.encode(), KEY, b"kiosk", AAD_RECEIPT), ErrorCode.BAD_SIGNATURE),
    ("a flipped bit", (lambda s: s[:-1] + bytes([s[-1] ^ 1]))(sign_receipt(RECEIPT, KEY)), ErrorCode.BAD_SIGNATURE),
    ("another coin", sign_receipt(dataclasses.replace(RECEIPT, tip=b"u" * 32), KEY), ErrorCode.BAD_REQUEST),
    ("another session", sign_receipt(dataclasses.replace(RECEIPT, session=b"x" * 16), KEY), ErrorCode.BAD_REQUEST),
], ids=lambda v: v if isinstance(v, str) else "")
def test_a_receipt_that_does_not_verify_is_refused(name: str, signed: bytes, code: ErrorCode) -> None:
    with pytest.raises(RemoteProtocolError) as refused:
        verify_receipt(signed, CERT, tip=b"t" * 32, session=b"s" * 16)
    assert refused.value.code is code, name
