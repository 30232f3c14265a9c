"""COSE_Sign1 with Ed25519: our signatures verify with python-cwt, and forgeries fail."""

from __future__ import annotations

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cwt import COSE, COSEKey

from m2mpay.protocol import cose
from m2mpay.protocol.errors import ErrorCode, RemoteProtocolError

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))


def _cwt_key(private: Ed25519PrivateKey, kid: bytes) -> COSEKey:
    raw = cose.public_key_bytes(private.public_key())
    return COSEKey.new({1: 1, 2: kid, 3: -8, -1: 6, -2: raw})  # OKP, Ed25519


def test_round_trip_and_kid() -> None:
    data = cose.sign1(b"payload", KEY, kid=b"vendor-1", external_aad=b"ctx")
    signed = cose.verify_sign1(data, KEY.public_key(), external_aad=b"ctx")
    assert (signed.kid, signed.payload) == (b"vendor-1", b"payload")


def test_interop_with_python_cwt() -> None:
    data = cose.sign1(b"hello", KEY, kid=b"k1", external_aad=b"aad")
    tagged = cbor2.dumps(cbor2.CBORTag(18, cbor2.loads(data)))
    ctx = COSE.new()
    assert ctx.decode(tagged, _cwt_key(KEY, b"k1"), external_aad=b"aad") == b"hello"
    # and the other way: a python-cwt signature verifies here
    theirs = ctx.encode_and_sign(b"hi", _cwt_key_private(KEY, b"k1"),
                                 protected={1: -8, 4: b"k1"}, external_aad=b"aad")
    assert cose.verify_sign1(theirs, KEY.public_key(), external_aad=b"aad").payload == b"hi"


def _cwt_key_private(private: Ed25519PrivateKey, kid: bytes) -> COSEKey:
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

    d = private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    x = cose.public_key_bytes(private.public_key())
    return COSEKey.new({1: 1, 2: kid, 3: -8, -1: 6, -2: x, -4: d})


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d[:-1] + bytes([d[-1] ^ 1]),  # signature bit
        lambda d: d.replace(b"payload", b"paylaod"),  # payload
    ],
    ids=["signature", "payload"],
)
def test_tampering_fails(mutate) -> None:  # type: ignore[no-untyped-def]
    data = cose.sign1(b"payload", KEY, kid=b"v")
    with pytest.raises(RemoteProtocolError) as info:
        cose.verify_sign1(mutate(data), KEY.public_key())
    assert info.value.code is ErrorCode.BAD_SIGNATURE


def test_wrong_key_wrong_aad_unknown_signer() -> None:
    data = cose.sign1(b"p", KEY, kid=b"v", external_aad=b"a")
    other = Ed25519PrivateKey.generate().public_key()
    for key, aad in [(other, b"a"), (KEY.public_key(), b"b")]:
        with pytest.raises(RemoteProtocolError):
            cose.verify_sign1(data, key, external_aad=aad)
    with pytest.raises(RemoteProtocolError, match="signature does not verify"):  # the same as a forgery
        cose.verify_sign1(data, lambda kid: None, external_aad=b"a")


def test_malformed_structures_refused() -> None:
    good = cbor2.loads(cose.sign1(b"p", KEY, kid=b"v"))
    bad = [
        [good[0], {}, good[2]],  # three items
        [good[0], {1: 1}, good[2], good[3]],  # unprotected header
        [cbor2.dumps({1: -7, 4: b"v"}), {}, good[2], good[3]],  # ES256
        [cbor2.dumps({1: -8}), {}, good[2], good[3]],  # no kid
        [good[0], {}, good[2], good[3][:10]],  # short signature
        {"not": "array"},
    ]
    for item in bad:
        with pytest.raises(RemoteProtocolError):
            cose.decode_sign1(cbor2.dumps(item, canonical=True))
