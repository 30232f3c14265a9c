"""RFC 9474 blind RSA: every Appendix A vector, interop with standard RSA-PSS, and refusals."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gmpy2
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from m2mpay.protocol import blindrsa
from m2mpay.protocol.errors import ErrorCode, LocalProtocolError, RemoteProtocolError

VECTORS: list[dict[str, Any]] = json.loads((Path(__file__).parent.parent / "data" / "rfc9474.json").read_text())


def _h(vector: dict[str, Any], key: str) -> bytes:
    return bytes.fromhex(vector[key])


def _i(vector: dict[str, Any], key: str) -> int:
    return int(vector[key], 16)


@pytest.mark.parametrize("vector", VECTORS, ids=[v["variant"] for v in VECTORS])
def test_rfc9474_vector(vector: dict[str, Any]) -> None:
    variant = blindrsa.VARIANTS[vector["variant"]]
    public = blindrsa.PublicKey(n=_i(vector, "n"), e=_i(vector, "e"))
    prefix, input_msg = blindrsa.prepare(_h(vector, "msg"), variant, lambda size: _h(vector, "msg_prefix"))
    assert input_msg == _h(vector, "prepared_msg")
    assert prefix == (_h(vector, "msg_prefix") if variant.randomized else b"")
    r = int(gmpy2.invert(_i(vector, "inv"), public.n))
    blinded, secret = blindrsa.blind_with(public, input_msg, variant, r, _h(vector, "salt"))
    assert blinded == _h(vector, "blinded_msg")
    assert secret.inv == _i(vector, "inv")
    signer = blindrsa.BlindSigner(_i(vector, "p"), _i(vector, "q"), _i(vector, "d"), _i(vector, "e"))
    blind_sig = signer.sign(blinded)
    assert blind_sig == _h(vector, "blind_sig")
    sig = blindrsa.finalize(public, input_msg, blind_sig, secret, variant)
    assert sig == _h(vector, "sig")
    blindrsa.verify(public, input_msg, sig, variant)
    # OpenSSL's verification (the fast path) and the step-by-step one agree, on good and bad input.
    assert blindrsa.is_valid_reference(public, input_msg, sig, variant)
    for i in (0, len(sig) // 2, len(sig) - 1):
        bad = bytearray(sig)
        bad[i] ^= 0x01
        assert not blindrsa.is_valid(public, input_msg, bytes(bad), variant)
        assert not blindrsa.is_valid_reference(public, input_msg, bytes(bad), variant)
    other = next(v for v in blindrsa.VARIANTS.values() if v.salt_len != variant.salt_len)
    assert not blindrsa.is_valid(public, input_msg, sig, other)
    assert not blindrsa.is_valid_reference(public, input_msg, sig, other)


@pytest.fixture(scope="module")
def key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _issue(key: rsa.RSAPrivateKey, msg: bytes, variant: blindrsa.Variant) -> tuple[bytes, bytes]:
    public = blindrsa.PublicKey.from_cryptography(key.public_key())
    _, input_msg = blindrsa.prepare(msg, variant)
    blinded, secret = blindrsa.blind(public, input_msg, variant)
    blind_sig = blindrsa.BlindSigner.from_private_key(key).sign(blinded)
    return input_msg, blindrsa.finalize(public, input_msg, blind_sig, secret, variant)


@pytest.mark.parametrize("variant", list(blindrsa.VARIANTS.values()), ids=lambda v: v.name)
def test_finalized_signature_verifies_with_standard_rsa_pss(key: rsa.RSAPrivateKey, variant: blindrsa.Variant) -> None:
    input_msg, sig = _issue(key, b"coin message", variant)
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=variant.salt_len)
    key.public_key().verify(sig, input_msg, pss, hashes.SHA384())  # raises if invalid


def test_standard_rsa_pss_signature_verifies_here(key: rsa.RSAPrivateKey) -> None:
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)
    sig = key.sign(b"message", pss, hashes.SHA384())
    public = blindrsa.PublicKey.from_cryptography(key.public_key())
    blindrsa.verify(public, b"message", sig, blindrsa.SHA384_PSS_DETERMINISTIC)


@settings(max_examples=20, deadline=None)
@given(msg=st.binary(max_size=200))
def test_round_trip(key: rsa.RSAPrivateKey, msg: bytes) -> None:
    input_msg, sig = _issue(key, msg, blindrsa.SHA384_PSS_RANDOMIZED)
    public = blindrsa.PublicKey.from_cryptography(key.public_key())
    assert blindrsa.is_valid(public, input_msg, sig, blindrsa.SHA384_PSS_RANDOMIZED)
    assert not blindrsa.is_valid(public, input_msg + b"x", sig, blindrsa.SHA384_PSS_RANDOMIZED)


def test_refusals(key: rsa.RSAPrivateKey) -> None:
    variant = blindrsa.SHA384_PSS_RANDOMIZED
    public = blindrsa.PublicKey.from_cryptography(key.public_key())
    input_msg, sig = _issue(key, b"m", variant)
    tampered = sig[:-1] + bytes([sig[-1] ^ 1])
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    other = blindrsa.PublicKey.from_cryptography(other_key.public_key())
    for bad_key, bad_sig in [(public, tampered), (other, sig), (public, sig[:-1]), (public, b"\xff" * 256)]:
        with pytest.raises(RemoteProtocolError) as info:
            blindrsa.verify(bad_key, input_msg, bad_sig, variant)
        assert info.value.code is ErrorCode.BAD_SIGNATURE
    signer = blindrsa.BlindSigner.from_private_key(key)
    with pytest.raises(RemoteProtocolError):
        signer.sign(public.n.to_bytes(256, "big"))  # not below the modulus
    with pytest.raises(RemoteProtocolError):
        signer.sign(b"\x01" * 255)  # wrong length


def test_signer_refuses_to_return_a_faulty_signature(key: rsa.RSAPrivateKey) -> None:
    """A fault in one CRT half would leak a factor of n: the s^e == m check catches it."""
    signer = blindrsa.BlindSigner.from_private_key(key)
    signer._d_p += 2  # type: ignore[attr-defined]  # simulate a fault in the private operation
    blinded, _ = blindrsa.blind(signer.public_key, b"m", blindrsa.SHA384_PSS_DETERMINISTIC)
    with pytest.raises(LocalProtocolError):
        signer.sign(blinded)


def test_finalize_refuses_a_wrong_blind_signature(key: rsa.RSAPrivateKey) -> None:
    public = blindrsa.PublicKey.from_cryptography(key.public_key())
    _, input_msg = blindrsa.prepare(b"m", blindrsa.SHA384_PSS_RANDOMIZED)
    blinded, secret = blindrsa.blind(public, input_msg, blindrsa.SHA384_PSS_RANDOMIZED)
    other = blindrsa.BlindSigner.from_private_key(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    with pytest.raises(RemoteProtocolError):
        blindrsa.finalize(public, input_msg, other.sign(blinded), secret, blindrsa.SHA384_PSS_RANDOMIZED)


def test_secret_and_key_serialisation(key: rsa.RSAPrivateKey) -> None:
    public = blindrsa.PublicKey.from_cryptography(key.public_key())
    assert blindrsa.PublicKey.from_der(public.to_der()) == public
    _, secret = blindrsa.blind(public, b"m", blindrsa.SHA384_PSS_DETERMINISTIC)
    assert blindrsa.BlindingSecret.from_bytes(secret.to_bytes()) == secret
    with pytest.raises(RemoteProtocolError):
        blindrsa.PublicKey.from_der(b"\x30\x00")
