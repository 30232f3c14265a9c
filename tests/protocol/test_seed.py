"""The wallet seed: its human form catches typos, and its derivations are deterministic,
independent per keyset, counter and use, and uniform where RFC 9474 asks for uniform."""

from __future__ import annotations

import collections
import hashlib
import hmac
import math

import gmpy2
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from m2mpay.protocol import blindrsa, cbor, hashchain, seed
from m2mpay.protocol.errors import ErrorCode, LocalProtocolError
from m2mpay.protocol.messages import KeysetInfo, coin_message, keyset_id
from m2mpay.protocol.rules.keyring import COIN_VARIANT
from m2mpay.protocol.seed import WalletSeed

SEED = WalletSeed(bytes(range(16)))
ALPHABET = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"


def _hkdf_expand(prk: bytes, info: bytes, length: int) -> bytes:
    """RFC 5869 §2.3 written out, independent of the module's HKDF."""
    out, block, i = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([i]), hashlib.sha256).digest()
        out, i = out + block, i + 1
    return out[:length]


def _reference(label: str, keyset: str, counter: int, length: int, *extra: int) -> bytes:
    prk = hmac.new(b"m2mpay/wallet/1", SEED.secret, hashlib.sha256).digest()
    return _hkdf_expand(prk, cbor.encode([label, keyset, counter, *extra]), length)


def test_known_answers() -> None:
    """Pinned values: a change to any label, the encoding or the KDF shows here."""
    assert SEED.phrase() == "m2mseed1 qqqq syqc yq5r qwzq fpg9 scrg wpu8 tz5wf"
    assert WalletSeed(bytes(16)).phrase() == "m2mseed1 qqqq qqqq qqqq qqqq qqqq qqqq qqqa juts7"
    assert seed.chain_secret(SEED, "ks-a", 0) == _reference("m2mpay/wallet/chain/1", "ks-a", 0, 32)
    assert seed.message_randomizer(SEED, "ks-a", 7) == _reference("m2mpay/wallet/prefix/1", "ks-a", 7, 32)
    assert seed.pss_salt(SEED, "ks-b", 3, 48) == _reference("m2mpay/wallet/salt/1", "ks-b", 3, 48)
    assert seed.chain_secret(SEED, "ks-a", 0).hex() == (
        "312e74508faabdae4a10813b7807f7ae895d6a20c73db7b464609e3e1e278af3")
    assert [seed.blinding_factor(SEED, "ks-a", c, 35) for c in (0, 1)] == [13, 17]


def test_blinding_factor_is_random_below_over_the_hkdf_stream() -> None:
    """The first candidate in ``[2, n)`` and prime to ``n``, candidates being successive HKDF
    blocks shifted to ``bit_len(n)`` bits: exactly RFC 9474's ``random_integer_uniform``."""
    n = 3 * 43 * (1 << 200) + 1
    size, excess = (n.bit_length() + 7) // 8, -n.bit_length() % 8
    for counter in range(20):
        attempt = 0
        while True:
            candidate = int.from_bytes(_reference("m2mpay/wallet/blind/1", "ks-a", counter, size, attempt), "big")
            candidate >>= excess
            attempt += 1
            if 1 < candidate < n and gmpy2.gcd(candidate, n) == 1:
                break
        assert seed.blinding_factor(SEED, "ks-a", counter, n) == candidate


def test_derivations_are_deterministic() -> None:
    again = WalletSeed.parse(SEED.phrase())
    for counter in (0, 1, seed.MAX_COUNTER):
        assert seed.chain_secret(again, "ks-x", counter) == seed.chain_secret(SEED, "ks-x", counter)
        assert seed.message_randomizer(again, "ks-x", counter) == seed.message_randomizer(SEED, "ks-x", counter)
        assert seed.pss_salt(again, "ks-x", counter, 48) == seed.pss_salt(SEED, "ks-x", counter, 48)
        assert seed.blinding_factor(again, "ks-x", counter, 10**40 + 1) == seed.blinding_factor(
            SEED, "ks-x", counter, 10**40 + 1)


def test_derivations_independent_across_keysets_counters_and_uses() -> None:
    values = []
    for keyset in ("ks-a", "ks-b", "ks-ab"):
        for counter in range(60):
            values += [seed.chain_secret(SEED, keyset, counter), seed.message_randomizer(SEED, keyset, counter),
                       seed.pss_salt(SEED, keyset, counter, 32)]
    assert len(set(values)) == len(values) == 540
    other = WalletSeed(bytes(16))
    assert seed.chain_secret(other, "ks-a", 0) != seed.chain_secret(SEED, "ks-a", 0)
    # A prefix of one output is never another's: the salt (48 bytes) and the prefix (32) differ.
    assert seed.pss_salt(SEED, "ks-a", 0, 48)[:32] != seed.message_randomizer(SEED, "ks-a", 0)


@pytest.mark.parametrize("modulus", [35, 160, 1000003 * 3])
def test_blinding_factor_uniform_over_units(modulus: int) -> None:
    """Chi-square over every unit above 1: a reduction mod ``n`` instead of rejection (160 takes
    8-bit candidates) would make the values below 96 twice as likely, and fail."""
    units = [r for r in range(2, modulus) if math.gcd(r, modulus) == 1]
    if len(units) > 200:  # a large modulus: bucket by value range instead
        buckets = 50
        counts = collections.Counter(seed.blinding_factor(SEED, "ks-u", c, modulus) * buckets // modulus
                                     for c in range(5000))
        expected = 5000 / buckets
        chi2 = sum((counts[b] - expected) ** 2 / expected for b in range(buckets))
        assert chi2 < 90, chi2  # 49 degrees of freedom: p < 1e-4
        return
    per = 150
    counts = collections.Counter(seed.blinding_factor(SEED, "ks-u", c, modulus) for c in range(per * len(units)))
    assert set(counts) == set(units)
    chi2 = sum((counts[u] - per) ** 2 / per for u in units)
    dof = len(units) - 1
    assert chi2 < dof + 5 * math.sqrt(2 * dof), chi2


def test_reduction_mod_n_would_be_caught() -> None:
    """The statistic above can fail: the biased sampler RFC 9474 forbids is rejected by it."""
    modulus = 160
    units = [r for r in range(2, modulus) if math.gcd(r, modulus) == 1]
    wanted = set(units)
    draws = (hashlib.sha256(i.to_bytes(4, "big")).digest()[0] % modulus for i in range(40000))
    sample = [r for r in draws if r in wanted][:150 * len(units)]
    assert len(sample) == 150 * len(units)
    counts = collections.Counter(sample)
    chi2 = sum((counts[u] - 150) ** 2 / 150 for u in units)
    dof = len(units) - 1
    assert chi2 > dof + 5 * math.sqrt(2 * dof)


@pytest.fixture(scope="module")
def keyset() -> tuple[KeysetInfo, rsa.RSAPrivateKey]:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    der = blindrsa.PublicKey.from_cryptography(private.public_key()).to_der()
    info = KeysetInfo(id=keyset_id(64, 64, "EUR", 10, 20, der), value=64, n=64, currency="EUR",
                      withdraw_until=10, spend_until=20, public_key=der)
    return info, private


def test_derived_coin_is_signed_and_recomputed(keyset: tuple[KeysetInfo, rsa.RSAPrivateKey]) -> None:
    info, private = keyset
    public = blindrsa.PublicKey.from_cryptography(private.public_key())
    coin = seed.derive_coin(SEED, info, public, 5)
    assert coin.tip == hashchain.make_chain(seed.chain_secret(SEED, info.id, 5), 64)
    assert coin.input_msg == seed.message_randomizer(SEED, info.id, 5) + coin_message(info.id, coin.tip)
    blind_sig = blindrsa.BlindSigner.from_private_key(private).sign(coin.blinded)
    sig = blindrsa.finalize(public, coin.input_msg, blind_sig, coin.inv, COIN_VARIANT)
    assert blindrsa.is_valid(public, coin.input_msg, sig, COIN_VARIANT)
    assert seed.derive_coin(SEED, info, public, 5) == coin  # a restore recomputes the same message
    assert seed.derive_coin(SEED, info, public, 6).blinded != coin.blinded
    assert coin.secret.hex() not in repr(coin) and str(coin.inv.inv) not in repr(coin)


@settings(max_examples=200)
@given(raw=st.binary(min_size=16, max_size=16))
def test_phrase_round_trip(raw: bytes) -> None:
    phrase = WalletSeed(raw).phrase()
    assert phrase.startswith("m2mseed1 ") and len(phrase.replace(" ", "")) == 41
    assert [len(g) for g in phrase.split()[1:]] == [4] * 7 + [5]
    assert WalletSeed.parse(phrase).secret == raw
    assert WalletSeed.parse(phrase.upper().replace(" ", "-")).secret == raw
    assert WalletSeed.parse("  " + phrase.replace(" ", "") + "\n").secret == raw


def _body(phrase: str) -> str:
    return phrase.replace(" ", "")[len("m2mseed1"):]


def _refused(body: str, words: str) -> None:
    with pytest.raises(LocalProtocolError) as caught:
        WalletSeed.parse("m2mseed1" + body)
    assert caught.value.code is ErrorCode.BAD_REQUEST
    assert words in caught.value.message
    assert body not in caught.value.message


def test_every_single_typo_detected() -> None:
    body = _body(SEED.phrase())
    for i, right in enumerate(body):
        for wrong in ALPHABET.replace(right, ""):
            _refused(body[:i] + wrong + body[i + 1:], "checksum")


def test_every_swap_of_neighbours_detected() -> None:
    body = _body(WalletSeed(hashlib.sha256(b"swap").digest()[:16]).phrase())
    swaps = [body[:i] + body[i + 1] + body[i] + body[i + 2:] for i in range(len(body) - 1) if body[i] != body[i + 1]]
    assert len(swaps) > 25
    for swapped in swaps:
        _refused(swapped, "checksum")


@settings(max_examples=300)
@given(raw=st.binary(min_size=16, max_size=16), data=st.data())
def test_up_to_four_typos_detected(raw: bytes, data: st.DataObject) -> None:
    body = list(_body(WalletSeed(raw).phrase()))
    places = data.draw(st.sets(st.integers(0, len(body) - 1), min_size=2, max_size=4))
    for i in places:
        body[i] = data.draw(st.sampled_from(ALPHABET.replace(body[i], "")))
    _refused("".join(body), "checksum")


def test_other_mistakes_named() -> None:
    body = _body(SEED.phrase())
    _refused(body[:-1], "one is missing or extra")
    _refused(body + "q", "one is missing or extra")
    _refused(body[:4] + "b" + body[5:], "character 5 after m2mseed1 is not in the seed alphabet")
    with pytest.raises(LocalProtocolError, match="starts with m2mseed1"):
        WalletSeed.parse("bc1" + body)
    with pytest.raises(LocalProtocolError, match="starts with m2mseed1"):
        WalletSeed.parse("")


def _checksummed(values: list[int]) -> str:
    """A body with a valid checksum over any data values (to reach the checks behind it)."""
    hrp = [ord(c) >> 5 for c in "m2mseed"] + [0] + [ord(c) & 31 for c in "m2mseed"]
    gen = (0x3B6A57B2, 0x26508E6D, 0x1EA119FA, 0x3D4233DD, 0x2A1462B3)
    chk = 1
    for v in hrp + values + [0] * 6:
        top, chk = chk >> 25, (chk & 0x1FFFFFF) << 5 ^ v
        for i, g in enumerate(gen):
            chk ^= g if (top >> i) & 1 else 0
    chk ^= 0x2BC830A3
    return "".join(ALPHABET[v] for v in values + [(chk >> 5 * (5 - i)) & 31 for i in range(6)])


def test_version_and_padding_checked_behind_the_checksum() -> None:
    data = [ALPHABET.index(c) for c in _body(SEED.phrase())[:-6]]
    assert _checksummed(data) == _body(SEED.phrase())
    _refused(_checksummed([1, *data[1:]]), "unsupported version")
    _refused(_checksummed([*data[:-1], data[-1] | 1]), "padding")


def test_seed_never_shown() -> None:
    assert repr(SEED) == str(SEED) == f"{SEED}" == "WalletSeed(<secret>)"
    with pytest.raises(TypeError):
        hash(SEED)
    same, other = WalletSeed(bytes(range(16))), WalletSeed(bytes(16))
    assert same == SEED
    assert other != SEED


def test_generate_takes_its_randomness_and_sizes_are_checked() -> None:
    assert WalletSeed.generate(lambda n: b"\x07" * n).secret == b"\x07" * 16
    for bad in (b"", bytes(15), bytes(32)):
        with pytest.raises(LocalProtocolError):
            WalletSeed(bad)
    with pytest.raises(LocalProtocolError):
        seed.chain_secret(SEED, "ks-a", -1)
    with pytest.raises(LocalProtocolError):
        seed.chain_secret(SEED, "ks-a", seed.MAX_COUNTER + 1)
    with pytest.raises(LocalProtocolError):
        seed.blinding_factor(SEED, "ks-a", 0, 2)
