"""COSE_Sign1 with Ed25519: our signatures verify with python-cwt, and forgeries fail."""

from __future__ import annotations

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cwt import COSE, COSEKey

from m2mpay.protocol import cbor, cose
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


@pytest.mark.parametrize("size", [0, 1, 23, 24, 255, 256, 65_535, 65_536])
def test_the_arrays_laid_out_by_hand_are_the_deterministic_encoding(size: int) -> None:
    payload, aad, kid = bytes(size), b"m2mpay/req/block"[: size % 17], b"k" * (1 + size % 64)
    signed = cose.sign1(payload, KEY, kid=kid, external_aad=aad)
    protected = cbor.encode({1: -8, 4: kid})
    signature = KEY.sign(cbor.encode(["Signature1", protected, aad, payload]))
    assert signed == cbor.encode([protected, {}, payload, signature])
    assert cose.decode_sign1(signed, max_size=size + 200).to_be_signed(aad) == cbor.encode(
        ["Signature1", protected, aad, payload])


def test_a_prepared_key_signs_the_bytes_openssl_signs() -> None:
    for seed in (bytes(32), bytes(range(32)), bytes([255] * 32)):
        key = Ed25519PrivateKey.from_private_bytes(seed)
        prepared = cose.SigningKey.of(key)
        for message in (b"", b"m", bytes(range(256)) * 9):
            assert prepared.sign(message) == key.sign(message)
        assert cose.sign1(b"p", prepared, kid=b"v", external_aad=b"a") == cose.sign1(b"p", key, kid=b"v",
                                                                                     external_aad=b"a")
    assert KEY.private_bytes_raw().hex() not in repr(cose.SigningKey.of(KEY))  # never in a log line


# RFC 8032 §7.1, TEST 2: the verifier is libsodium, the vector's signature must verify and its flips must not.
_RFC8032_PUBLIC = bytes.fromhex("3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c")
_RFC8032_MESSAGE = bytes.fromhex("72")
_RFC8032_SIGNATURE = bytes.fromhex(
    "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da"
    "085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00")


def test_the_verifier_agrees_with_rfc8032_and_refuses_what_openssl_refuses() -> None:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    public = Ed25519PublicKey.from_public_bytes(_RFC8032_PUBLIC)
    assert cose._verifies(public, _RFC8032_SIGNATURE, _RFC8032_MESSAGE)
    # S + L: the same point arithmetic, a non-canonical scalar. Both libraries must refuse it.
    order = 2**252 + 27742317777372353535851937790883648493
    s = int.from_bytes(_RFC8032_SIGNATURE[32:], "little") + order
    malleable = _RFC8032_SIGNATURE[:32] + s.to_bytes(32, "little")
    with pytest.raises(InvalidSignature):
        public.verify(malleable, _RFC8032_MESSAGE)
    assert not cose._verifies(public, malleable, _RFC8032_MESSAGE)
    for i in (0, 31, 32, 63):
        flipped = bytearray(_RFC8032_SIGNATURE)
        flipped[i] ^= 0x01
        assert not cose._verifies(public, bytes(flipped), _RFC8032_MESSAGE)
    assert not cose._verifies(public, _RFC8032_SIGNATURE[:63], _RFC8032_MESSAGE)
