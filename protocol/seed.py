"""The wallet seed: one secret from which every coin secret and blinding value is derived.

A wallet that keeps this seed can rebuild its coins after losing its storage (docs/LIFECYCLE.md).

**Seed.** 16 random bytes (128 bits), drawn from randomness passed in. Guessing it takes 2^128
trials; even a bank that tries each guess against the coins of 2^20 wallets at once needs 2^108.

**Human form.** ``m2mseed1`` followed by 33 characters of the bech32 alphabet (BIP-173, with the
bech32m constant of BIP-350): one version character, 26 carrying the seed, 6 of checksum, shown
in groups of four (the last of five). The BCH checksum is *guaranteed* to detect any error touching up to four
characters (so every single typo and every swap of two neighbours), and the alphabet leaves out
``1 b i o``, the characters most often misread. A BIP-39 phrase would need a 2,048-word list
shipped byte-exact with every device and catches only 15 of 16 wrong 12-word phrases (a 4-bit
checksum); the short string is smaller, language-free, and detects more.

**Derivation** (RFC 5869 HKDF-SHA256): ``prk = HKDF-Extract(salt = "m2mpay/wallet/1", seed)``;
each value is ``HKDF-Expand(prk, info, L)`` with ``info`` the deterministic CBOR array
``[label, keyset id, counter]`` (blinding candidates add an attempt number), so no two uses, two
keysets or two counters ever share output:

- ``m2mpay/wallet/chain/1``: the chain secret ``S`` (32 bytes), ``tip = H^n(S)``;
- ``m2mpay/wallet/prefix/1``: the RFC 9474 message randomizer (32 bytes);
- ``m2mpay/wallet/salt/1``: the PSS salt (48 bytes), which the randomized variant also draws;
- ``m2mpay/wallet/blind/1``: the blinding factor ``r``, uniform in ``Z_n^*``: candidates come from
  successive HKDF blocks and go through :func:`~m2mpay.protocol.blindrsa.random_below` itself
  (rejection sampling, never a reduction mod ``n``), then ``r > 1`` and ``gcd(r, n) = 1`` as in
  :func:`~m2mpay.protocol.blindrsa.blind`.

The labels are defined here; they join the other signing contexts in ``protocol/wire.py`` when
the wallet is wired to this module. Nothing here logs, and :class:`WalletSeed` never shows its
value in ``repr`` or ``str``.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from dataclasses import dataclass, field

import gmpy2
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from . import blindrsa, cbor, hashchain, wire
from .errors import LocalProtocolError
from .messages.coins import KeysetInfo, coin_message

__all__ = [
    "EXCHANGE_COUNTERS",
    "MAX_COUNTER",
    "SEED_BYTES",
    "DerivedCoin",
    "WalletSeed",
    "blinding_factor",
    "chain_secret",
    "derive_coin",
    "message_randomizer",
    "pss_salt",
]

Rng = Callable[[int], bytes]

SEED_BYTES = 16
MAX_COUNTER = (1 << 32) - 1
"""Coins per keyset one seed can derive."""
EXCHANGE_COUNTERS = 1 << 31
"""Where exchanges' counters start: withdrawals count per keyset from 0, while exchange number
``e`` of a wallet derives each of its change slots at counter ``EXCHANGE_COUNTERS + e`` of the
slot's keyset. Every exchange has a slot signed, so a restore that tries every keyset at each
``e`` finds no runs of unused numbers but those of requests that never reached the bank."""

# Derivation labels (HKDF salt and info), written once in the wire module.
_EXTRACT_SALT = wire.WALLET_EXTRACT_SALT
_CHAIN = wire.WALLET_CHAIN_INFO
_PREFIX = wire.WALLET_PREFIX_INFO
_SALT = wire.WALLET_SALT_INFO
_BLIND = wire.WALLET_BLIND_INFO
_MAX_ATTEMPTS = 256  # each candidate is accepted with probability > 1/2: 2^-256 to run out

# The human form: bech32 alphabet and the bech32m checksum (BIP-173, BIP-350).
_HRP = "m2mseed"
_SEP = "1"
_VERSION = 0
_ALPHABET = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"
_INDEX = {c: i for i, c in enumerate(_ALPHABET)}
_BECH32M = 0x2BC830A3
_GEN = (0x3B6A57B2, 0x26508E6D, 0x1EA119FA, 0x3D4233DD, 0x2A1462B3)
_DATA_CHARS = 1 + (SEED_BYTES * 8 + 4) // 5  # version + seed bits
_CHECK_CHARS = 6
_PHRASE_LEN = len(_HRP) + 1 + _DATA_CHARS + _CHECK_CHARS


def _polymod(values: list[int]) -> int:
    chk = 1
    for v in values:
        top = chk >> 25
        chk = (chk & 0x1FFFFFF) << 5 ^ v
        for i, g in enumerate(_GEN):
            if (top >> i) & 1:
                chk ^= g
    return chk


def _hrp_values() -> list[int]:
    return [ord(c) >> 5 for c in _HRP] + [0] + [ord(c) & 31 for c in _HRP]


def _to_5bit(data: bytes) -> list[int]:
    acc, bits, out = 0, 0, []
    for byte in data:
        acc, bits = acc << 8 | byte, bits + 8
        while bits >= 5:
            bits -= 5
            out.append(acc >> bits & 31)
    if bits:
        out.append(acc << (5 - bits) & 31)
    return out


def _from_5bit(symbols: list[int]) -> bytes:
    acc, bits, out = 0, 0, bytearray()
    for s in symbols:
        acc, bits = acc << 5 | s, bits + 5
        if bits >= 8:
            bits -= 8
            out.append(acc >> bits & 0xFF)
    if acc & ((1 << bits) - 1):
        raise LocalProtocolError("wallet seed has non-zero padding bits: a character is mistyped")
    return bytes(out)


class WalletSeed:
    """A wallet's 16-byte seed. Its value shows only through :meth:`phrase` and :attr:`secret`."""

    __slots__ = ("_secret",)

    def __init__(self, secret: bytes) -> None:
        if not isinstance(secret, bytes) or len(secret) != SEED_BYTES:
            raise LocalProtocolError(f"a wallet seed is {SEED_BYTES} bytes")
        self._secret = secret

    @classmethod
    def generate(cls, rng: Rng) -> WalletSeed:
        """A new seed from ``rng`` (``os.urandom`` in production)."""
        return cls(rng(SEED_BYTES))

    @property
    def secret(self) -> bytes:
        """The raw seed (secret: for the wallet's encrypted store only)."""
        return self._secret

    def phrase(self) -> str:
        """The seed as the user writes it down, e.g. ``m2mseed1 qq7z 3kp0 …``: shown once."""
        data = [_VERSION, *_to_5bit(self._secret)]
        check = _polymod(_hrp_values() + data + [0] * _CHECK_CHARS) ^ _BECH32M
        data += [(check >> 5 * (5 - i)) & 31 for i in range(_CHECK_CHARS)]
        body = "".join(_ALPHABET[v] for v in data)
        groups = [body[i:i + 4] for i in range(0, len(body), 4)]
        if len(groups[-1]) == 1:  # 33 characters: the last group takes five, not a lone one
            groups[-2:] = [groups[-2] + groups[-1]]
        return " ".join([_HRP + _SEP, *groups])

    @classmethod
    def parse(cls, text: str) -> WalletSeed:
        """Read a seed as the user typed it: any case, spaces and dashes ignored.

        Every mistake raises :class:`LocalProtocolError` (``bad_request``) saying what is wrong
        and where, never what the seed is.
        """
        compact = "".join(text.split()).replace("-", "").lower()
        if not compact.startswith(_HRP + _SEP):
            raise LocalProtocolError(f"not a wallet seed: it starts with {_HRP}{_SEP}")
        if len(compact) != _PHRASE_LEN:
            raise LocalProtocolError(
                f"a wallet seed has {_PHRASE_LEN - len(_HRP) - 1} characters after {_HRP}{_SEP}, "
                f"this one {len(compact) - len(_HRP) - 1}: one is missing or extra")
        body = compact[len(_HRP) + 1:]
        for position, char in enumerate(body, start=1):
            if char not in _INDEX:
                raise LocalProtocolError(
                    f"character {position} after {_HRP}{_SEP} is not in the seed alphabet "
                    "(no 1, b, i or o)")
        values = [_INDEX[c] for c in body]
        if _polymod(_hrp_values() + values) != _BECH32M:
            raise LocalProtocolError("wallet seed checksum does not match: a character is mistyped")
        if values[0] != _VERSION:
            raise LocalProtocolError("wallet seed of an unsupported version")
        return cls(_from_5bit(values[1:-_CHECK_CHARS]))

    def __repr__(self) -> str:
        return "WalletSeed(<secret>)"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, WalletSeed) and hmac.compare_digest(self._secret, other._secret)

    __hash__ = None  # type: ignore[assignment]  # a secret is no dictionary key


def _check(keyset: str, counter: int) -> None:
    if not isinstance(keyset, str) or not keyset:
        raise LocalProtocolError("derivation needs a keyset id")
    if isinstance(counter, bool) or not isinstance(counter, int) or not 0 <= counter <= MAX_COUNTER:
        raise LocalProtocolError(f"counter must be in 0..{MAX_COUNTER}")


def _expand(seed: WalletSeed, label: str, keyset: str, counter: int, length: int, *extra: int) -> bytes:
    _check(keyset, counter)
    info = cbor.encode([label, keyset, counter, *extra])
    prk = hmac.new(_EXTRACT_SALT, seed.secret, hashlib.sha256).digest()  # HKDF-Extract
    return HKDFExpand(hashes.SHA256(), length, info).derive(prk)


def chain_secret(seed: WalletSeed, keyset: str, counter: int) -> bytes:
    """``S`` of coin ``counter`` of ``keyset``: the chain's secret end, 32 bytes."""
    return _expand(seed, _CHAIN, keyset, counter, hashchain.TOKEN_SIZE)


def message_randomizer(seed: WalletSeed, keyset: str, counter: int) -> bytes:
    """The RFC 9474 ``msg_prefix`` of coin ``counter`` of ``keyset`` (32 bytes)."""
    return _expand(seed, _PREFIX, keyset, counter, 32)


def pss_salt(seed: WalletSeed, keyset: str, counter: int, length: int) -> bytes:
    """The EMSA-PSS salt of coin ``counter`` of ``keyset`` (``length`` bytes, 48 for our variant)."""
    return _expand(seed, _SALT, keyset, counter, length) if length else b""


def blinding_factor(seed: WalletSeed, keyset: str, counter: int, modulus: int) -> int:
    """``r`` for coin ``counter`` of ``keyset``: uniform over the units of ``Z_modulus`` above 1.

    Candidate ``i`` is HKDF-Expand with ``info = [label, keyset, counter, i]`` of the modulus'
    byte length; :func:`blindrsa.random_below` draws from that stream exactly as it draws from
    the OS, so the distribution is the one RFC 9474 asks for.
    """
    _check(keyset, counter)
    if modulus < 3:
        raise LocalProtocolError("modulus too small")
    attempt = 0

    def stream(size: int) -> bytes:
        nonlocal attempt
        if attempt >= _MAX_ATTEMPTS:
            raise LocalProtocolError("no blinding factor found (the modulus is not an RSA modulus)")
        attempt += 1
        return _expand(seed, _BLIND, keyset, counter, size, attempt - 1)

    while True:
        r = blindrsa.random_below(modulus, stream)
        if r > 1 and gmpy2.gcd(r, modulus) == 1:
            return r


@dataclass(frozen=True, slots=True)
class DerivedCoin:
    """Everything a wallet needs to ask for coin ``counter`` of a keyset and to finish it."""

    keyset: str
    counter: int
    tip: bytes
    prefix: bytes
    blinded: bytes
    secret: bytes = field(repr=False)
    """``S``; with ``inv``, as secret as the seed."""
    inv: blindrsa.BlindingSecret = field(repr=False)

    @property
    def input_msg(self) -> bytes:
        """What the finalized signature covers: ``prefix || coin_message(keyset, tip)``."""
        return self.prefix + coin_message(self.keyset, self.tip)


def derive_coin(seed: WalletSeed, keyset: KeysetInfo, public_key: blindrsa.PublicKey, counter: int,
                variant: blindrsa.Variant = blindrsa.SHA384_PSS_RANDOMIZED) -> DerivedCoin:
    """Coin ``counter`` of ``keyset``: the same blinded message every time (``n`` hashes).

    The variant defaults to the one coins use (``rules.keyring.COIN_VARIANT``).
    """
    secret = chain_secret(seed, keyset.id, counter)
    tip = hashchain.make_chain(secret, keyset.n)
    prefix = message_randomizer(seed, keyset.id, counter) if variant.randomized else b""
    salt = pss_salt(seed, keyset.id, counter, variant.salt_len)
    r = blinding_factor(seed, keyset.id, counter, public_key.n)
    blinded, inv = blindrsa.blind_with(public_key, prefix + coin_message(keyset.id, tip), variant, r, salt)
    return DerivedCoin(keyset=keyset.id, counter=counter, tip=tip, prefix=prefix, blinded=blinded,
                       secret=secret, inv=inv)

