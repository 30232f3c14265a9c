"""RFC 9474 RSA blind signatures (RSABSSA), all four variants, pure and typed.

Roles and math (``n`` the modulus, ``e``/``d`` the exponents, ``H`` = SHA-384):

- ``prepare``:  ``input_msg = prefix || msg`` with a 32-byte random prefix (randomized variants).
- ``blind``:    ``encoded = EMSA-PSS-ENCODE(input_msg, bit_len(n) - 1)``, random ``r`` invertible
  mod ``n``; ``blinded = encoded * r^e mod n``; keep ``inv = r^-1 mod n``.
- ``blind_sign``: ``s = blinded^d mod n`` with constant-time CRT (``gmpy2.powmod_sec``), and
  ``s^e == blinded`` checked before answering (a faulty CRT half would leak a factor of ``n``).
- ``finalize``: ``sig = s * inv mod n``, then RSASSA-PSS-VERIFY; an invalid result is refused.
- ``verify``:   RSASSA-PSS-VERIFY of ``sig`` over ``input_msg`` (standard RSA-PSS, so any PSS
  verifier accepts a finalized signature).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import os
from collections.abc import Callable
from dataclasses import dataclass

import gmpy2
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from .errors import ErrorCode, LocalProtocolError, RemoteProtocolError

__all__ = [
    "SHA384_PSSZERO_DETERMINISTIC",
    "SHA384_PSSZERO_RANDOMIZED",
    "SHA384_PSS_DETERMINISTIC",
    "SHA384_PSS_RANDOMIZED",
    "VARIANTS",
    "BlindSigner",
    "BlindingSecret",
    "MIN_MODULUS_BITS",
    "PUBLIC_EXPONENT",
    "PublicKey",
    "Variant",
    "blind",
    "blind_sign",
    "blind_with",
    "finalize",
    "is_valid",
    "prepare",
    "random_below",
    "verify",
]

Rng = Callable[[int], bytes]
_HLEN = 48  # SHA-384
MIN_MODULUS_BITS = 2048
"""Smallest keyset modulus a wallet or vendor accepts."""
PUBLIC_EXPONENT = 65537
"""The only public exponent a keyset may use."""


@dataclass(frozen=True, slots=True)
class Variant:
    """One RFC 9474 variant: SHA-384, its PSS salt length, and whether messages get a prefix."""

    name: str
    salt_len: int
    randomized: bool


SHA384_PSS_RANDOMIZED = Variant("RSABSSA-SHA384-PSS-Randomized", 48, True)
SHA384_PSSZERO_RANDOMIZED = Variant("RSABSSA-SHA384-PSSZERO-Randomized", 0, True)
SHA384_PSS_DETERMINISTIC = Variant("RSABSSA-SHA384-PSS-Deterministic", 48, False)
SHA384_PSSZERO_DETERMINISTIC = Variant("RSABSSA-SHA384-PSSZERO-Deterministic", 0, False)
VARIANTS = {v.name: v for v in (SHA384_PSS_RANDOMIZED, SHA384_PSSZERO_RANDOMIZED,
                                SHA384_PSS_DETERMINISTIC, SHA384_PSSZERO_DETERMINISTIC)}


@dataclass(frozen=True, slots=True)
class PublicKey:
    """An RSA public key as integers, with its size in bytes."""

    n: int
    e: int

    @property
    def size(self) -> int:
        """Modulus length in bytes (``k`` in RFC 8017)."""
        return (self.n.bit_length() + 7) // 8

    @classmethod
    def from_cryptography(cls, key: rsa.RSAPublicKey) -> PublicKey:
        """From a ``cryptography`` RSA public key."""
        numbers = key.public_numbers()
        return cls(n=numbers.n, e=numbers.e)

    def to_cryptography(self) -> rsa.RSAPublicKey:
        """As a ``cryptography`` RSA public key."""
        return rsa.RSAPublicNumbers(self.e, self.n).public_key()

    def to_der(self) -> bytes:
        """SubjectPublicKeyInfo DER, as keysets announce it."""
        return self.to_cryptography().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)

    @classmethod
    def from_der(cls, der: bytes) -> PublicKey:
        """Parse SubjectPublicKeyInfo DER; anything but an RSA key of 2048+ bits with ``e = 65537``
        is refused.

        The exponent is fixed because a bank that picks ``e`` with ``gcd(e, φ(n)) > 1`` makes
        ``r ↦ r^e`` lose information, and can then tell blinded messages apart: a way to tag users.
        """
        try:
            key = serialization.load_der_public_key(der)
        except ValueError as exc:
            raise RemoteProtocolError("malformed RSA public key") from exc
        if not isinstance(key, rsa.RSAPublicKey) or key.key_size < MIN_MODULUS_BITS:
            raise RemoteProtocolError("keyset key must be RSA-2048 or larger")
        if key.public_numbers().e != PUBLIC_EXPONENT:
            raise RemoteProtocolError("keyset key must have the public exponent 65537")
        return cls.from_cryptography(key)


def _mgf1(seed: bytes, length: int) -> bytes:
    out = bytearray()
    counter = 0
    while len(out) < length:
        out += hashlib.sha384(seed + counter.to_bytes(4, "big")).digest()
        counter += 1
    return bytes(out[:length])


def _emsa_pss_encode(msg: bytes, em_bits: int, salt: bytes) -> bytes:
    """RFC 8017 §9.1.1 with SHA-384 and MGF1-SHA-384."""
    em_len = (em_bits + 7) // 8
    if em_len < _HLEN + len(salt) + 2:
        raise LocalProtocolError("RSA key too small for this encoding")
    m_hash = hashlib.sha384(msg).digest()
    h = hashlib.sha384(b"\x00" * 8 + m_hash + salt).digest()
    db = b"\x00" * (em_len - len(salt) - _HLEN - 2) + b"\x01" + salt
    masked = bytearray(a ^ b for a, b in zip(db, _mgf1(h, em_len - _HLEN - 1), strict=True))
    masked[0] &= 0xFF >> (8 * em_len - em_bits)
    return bytes(masked) + h + b"\xbc"


def _emsa_pss_verify(msg: bytes, em: bytes, em_bits: int, salt_len: int) -> bool:
    """RFC 8017 §9.1.2; returns ``False`` instead of raising."""
    em_len = (em_bits + 7) // 8
    if len(em) != em_len or em_len < _HLEN + salt_len + 2 or em[-1] != 0xBC:
        return False
    masked, h = em[: em_len - _HLEN - 1], em[em_len - _HLEN - 1 : -1]
    top_mask = 0xFF >> (8 * em_len - em_bits)
    if masked[0] & ~top_mask & 0xFF:
        return False
    db = bytearray(a ^ b for a, b in zip(masked, _mgf1(h, em_len - _HLEN - 1), strict=True))
    db[0] &= top_mask
    pad_len = em_len - _HLEN - salt_len - 2
    if any(db[:pad_len]) or db[pad_len] != 0x01:
        return False
    salt = bytes(db[len(db) - salt_len :]) if salt_len else b""
    m_hash = hashlib.sha384(msg).digest()
    return hmac.compare_digest(h, hashlib.sha384(b"\x00" * 8 + m_hash + salt).digest())


@dataclass(frozen=True, slots=True)
class BlindingSecret:
    """What the requester keeps until the blind signature comes back: ``inv = r^-1 mod n``."""

    inv: int

    def to_bytes(self) -> bytes:
        """Serialized form for a wallet's durable store (secret!)."""
        return self.inv.to_bytes((self.inv.bit_length() + 7) // 8 or 1, "big")

    @classmethod
    def from_bytes(cls, data: bytes) -> BlindingSecret:
        """Inverse of :meth:`to_bytes`."""
        return cls(inv=int.from_bytes(data, "big"))


def prepare(msg: bytes, variant: Variant, rng: Rng = os.urandom) -> tuple[bytes, bytes]:
    """``(prefix, input_msg)``: a 32-byte random prefix for randomized variants, none otherwise."""
    prefix = rng(32) if variant.randomized else b""
    return prefix, prefix + msg


def blind_with(public_key: PublicKey, input_msg: bytes, variant: Variant, r: int, salt: bytes
               ) -> tuple[bytes, BlindingSecret]:
    """:func:`blind` with explicit ``r`` and salt (for test vectors)."""
    if len(salt) != variant.salt_len:
        raise LocalProtocolError("salt length does not match the variant")
    n = public_key.n
    encoded = int.from_bytes(_emsa_pss_encode(input_msg, n.bit_length() - 1, salt), "big")
    if gmpy2.gcd(encoded, n) != 1:
        raise LocalProtocolError("encoded message not invertible mod n")
    try:
        inv = int(gmpy2.invert(r, n))
    except ZeroDivisionError as exc:
        raise LocalProtocolError("blinding factor not invertible") from exc
    blinded = encoded * int(gmpy2.powmod(r, public_key.e, n)) % n
    return blinded.to_bytes(public_key.size, "big"), BlindingSecret(inv=inv)


def random_below(n: int, rng: Rng = os.urandom) -> int:
    """A uniform integer in ``[1, n)``: RFC 9474's ``random_integer_uniform(1, n)``.

    Rejection sampling over ``bit_len(n)``-bit candidates. Reducing ``k`` random bytes mod ``n``
    instead makes the values below ``2^(8k) - n`` twice as likely, and the signer sees
    ``blind_sig · sig⁻¹ mod n = r`` for the true (withdrawal, coin) pair only: a biased ``r``
    lets the bank link coins to withdrawals. Each candidate is accepted with probability > 1/2.
    """
    if n < 2:
        raise LocalProtocolError("modulus too small")
    bits = n.bit_length()
    size, excess = (bits + 7) // 8, -bits % 8
    while True:
        candidate = int.from_bytes(rng(size), "big") >> excess
        if 1 <= candidate < n:
            return candidate


def blind(public_key: PublicKey, input_msg: bytes, variant: Variant, rng: Rng = os.urandom
          ) -> tuple[bytes, BlindingSecret]:
    """``(blinded_msg, secret)``: hide ``input_msg`` from the signer behind a uniform random ``r``."""
    salt = rng(variant.salt_len) if variant.salt_len else b""
    while True:
        r = random_below(public_key.n, rng)
        if r > 1 and gmpy2.gcd(r, public_key.n) == 1:
            return blind_with(public_key, input_msg, variant, r, salt)


class BlindSigner:
    """The bank's signing half for one keyset: CRT values precomputed once, as gmpy2 integers."""

    __slots__ = ("_d_p", "_d_q", "_e", "_n", "_p", "_q", "_q_inv", "size")

    def __init__(self, p: int, q: int, d: int, e: int) -> None:
        self._p, self._q = gmpy2.mpz(p), gmpy2.mpz(q)
        self._n, self._e = self._p * self._q, gmpy2.mpz(e)
        self._d_p, self._d_q = gmpy2.mpz(d % (p - 1)), gmpy2.mpz(d % (q - 1))
        self._q_inv = gmpy2.invert(self._q, self._p)
        self.size = (int(self._n).bit_length() + 7) // 8

    @classmethod
    def from_private_key(cls, key: rsa.RSAPrivateKey) -> BlindSigner:
        """From a ``cryptography`` RSA private key."""
        numbers = key.private_numbers()
        return cls(numbers.p, numbers.q, numbers.d, numbers.public_numbers.e)

    @property
    def public_key(self) -> PublicKey:
        """The matching public key."""
        return PublicKey(n=int(self._n), e=int(self._e))

    def sign(self, blinded_msg: bytes) -> bytes:
        """``blinded^d mod n`` by constant-time CRT, checked with ``s^e == blinded``."""
        if len(blinded_msg) != self.size:
            raise RemoteProtocolError("blinded message has the wrong length")
        m = gmpy2.mpz(int.from_bytes(blinded_msg, "big"))
        if m >= self._n:
            raise RemoteProtocolError("blinded message not below the modulus")
        s_p = gmpy2.powmod_sec(m % self._p, self._d_p, self._p)
        s_q = gmpy2.powmod_sec(m % self._q, self._d_q, self._q)
        s = s_q + self._q * ((self._q_inv * (s_p - s_q)) % self._p)
        if gmpy2.powmod(s, self._e, self._n) != m:
            raise LocalProtocolError("signature check failed (fault in the private operation)")
        return int(s).to_bytes(self.size, "big")


def blind_sign(private_key: rsa.RSAPrivateKey, blinded_msg: bytes) -> bytes:
    """One-off :meth:`BlindSigner.sign` (precompute a :class:`BlindSigner` for many)."""
    return BlindSigner.from_private_key(private_key).sign(blinded_msg)


def finalize(public_key: PublicKey, input_msg: bytes, blind_sig: bytes, secret: BlindingSecret,
             variant: Variant) -> bytes:
    """Unblind: ``sig = blind_sig * inv mod n``, verified before it is returned."""
    if len(blind_sig) != public_key.size:
        raise RemoteProtocolError("blind signature has the wrong length", ErrorCode.BAD_SIGNATURE)
    z = int.from_bytes(blind_sig, "big")
    if z >= public_key.n:
        raise RemoteProtocolError("blind signature not below the modulus", ErrorCode.BAD_SIGNATURE)
    sig = (z * secret.inv % public_key.n).to_bytes(public_key.size, "big")
    verify(public_key, input_msg, sig, variant)
    return sig


def is_valid(public_key: PublicKey, input_msg: bytes, sig: bytes, variant: Variant) -> bool:
    """RSASSA-PSS-VERIFY as a boolean.

    A finalized blind signature is a plain RSASSA-PSS signature (SHA-384, MGF1-SHA-384, the
    variant's salt length), so OpenSSL verifies it: every vendor and the bank run this once per
    coin, and it is several times faster than the same steps in Python
    (:func:`is_valid_reference`, kept for the test vectors).
    """
    if len(sig) != public_key.size:
        return False
    try:
        _openssl_key(public_key.n, public_key.e).verify(
            sig, input_msg, padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=variant.salt_len),
            hashes.SHA384())
    except InvalidSignature:
        return False
    return True


@functools.lru_cache(maxsize=64)
def _openssl_key(n: int, e: int) -> rsa.RSAPublicKey:
    return rsa.RSAPublicNumbers(e, n).public_key()


def is_valid_reference(public_key: PublicKey, input_msg: bytes, sig: bytes, variant: Variant) -> bool:
    """RSASSA-PSS-VERIFY step by step (RFC 8017 §8.1.2, §9.1.2)."""
    if len(sig) != public_key.size:
        return False
    s = int.from_bytes(sig, "big")
    if s >= public_key.n:
        return False
    em_bits = public_key.n.bit_length() - 1
    m = int(gmpy2.powmod(s, public_key.e, public_key.n))
    em_len = (em_bits + 7) // 8
    if m.bit_length() > em_bits:
        return False
    return _emsa_pss_verify(input_msg, m.to_bytes(em_len, "big"), em_bits, variant.salt_len)


def verify(public_key: PublicKey, input_msg: bytes, sig: bytes, variant: Variant) -> None:
    """RSASSA-PSS-VERIFY; raises ``bad_signature`` if ``sig`` does not verify."""
    if not is_valid(public_key, input_msg, sig, variant):
        raise RemoteProtocolError("signature does not verify", ErrorCode.BAD_SIGNATURE)
