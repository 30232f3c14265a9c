"""Finding "the blinding factor is not uniform": the bank must not link coins to withdrawals.

For the true (withdrawal, coin) pair the bank can compute ``blind_sig · sig⁻¹ mod n = r``; for
any other pair the same computation gives a uniform value. If ``r`` is drawn as
``urandom(k) mod n``, values below ``2^(8k) − n`` are twice as likely, and the statistic
"``z · s⁻¹ mod n < 2^(8k) − n``" tells the true pair apart. With rejection sampling its frequency
over the true pairs is exactly what a uniform value gives.
"""

from __future__ import annotations

import math

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from m2mpay.protocol import blindrsa
from m2mpay.protocol.errors import LocalProtocolError, RemoteProtocolError
from m2mpay.protocol.messages import MAX_TOKENS, KeysetInfo, WithdrawAnswer, keyset_id
from m2mpay.protocol.rules import wallet

NOW = 1_800_000_000
COINS = 2048  # 32 withdrawals of 64 coins


def _low_modulus_key() -> rsa.RSAPrivateKey:
    """An RSA-2048 key whose modulus is well below 2^2048, where the bias is largest."""
    for _ in range(64):
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if key.public_key().public_numbers().n < 3 << 2046:  # n < 0.75 · 2^2048
            return key
    raise RuntimeError("no RSA key with a low modulus in 64 tries")


def _keyset(public: blindrsa.PublicKey) -> KeysetInfo:
    der = public.to_der()
    return KeysetInfo(id=keyset_id(1, 1, "EUR", NOW + 86400, NOW + 2 * 86400, der), value=1, n=1,
                      currency="EUR", withdraw_until=NOW + 86400, spend_until=NOW + 2 * 86400, public_key=der)


def test_blinding_factor_uniform_bank_cannot_link_withdrawals() -> None:
    """The linking statistic over 2,048 real coins stays within 4.5 standard deviations of chance."""
    key = _low_modulus_key()
    signer = blindrsa.BlindSigner.from_private_key(key)
    public = signer.public_key
    info = _keyset(public)
    n = public.n
    threshold = (1 << (8 * public.size)) - n
    hits = 0
    for _ in range(COINS // 64):
        pending = wallet.prepare_withdrawal("alice", info, public, 64)
        blind_sigs = tuple(signer.sign(m) for m in pending.request.blinded)
        answer = WithdrawAnswer(req_id=pending.request.req_id, keyset=info.id, blind_sigs=blind_sigs, balance=0)
        coins = wallet.complete_withdrawal(pending, answer, info, public)
        for blind_sig, coin in zip(blind_sigs, coins, strict=True):
            r = int.from_bytes(blind_sig, "big") * pow(int.from_bytes(coin.coin.sig, "big"), -1, n) % n
            hits += r < threshold
    p = threshold / (n - 1)  # P(r < threshold) for r uniform in [1, n)
    z = (hits - COINS * p) / math.sqrt(COINS * p * (1 - p))
    assert abs(z) < 4.5, f"linking statistic {hits / COINS:.3f} against {p:.3f} by chance (z = {z:.1f})"


def test_blinding_factor_rejects_candidates_not_below_n() -> None:
    """Candidates ≥ n are drawn again, never reduced mod n."""
    public = blindrsa.PublicKey.from_cryptography(rsa.generate_private_key(public_exponent=65537,
                                                                         key_size=2048).public_key())
    size = public.size
    good = 0x1234567 << 1000  # well below n, coprime to n with overwhelming probability
    draws = [b"\xff" * size, public.n.to_bytes(size, "big"), b"\x00" * size, good.to_bytes(size, "big")]

    def rng(length: int) -> bytes:
        assert length == size
        return draws.pop(0)

    _, secret = blindrsa.blind(public, b"message", blindrsa.SHA384_PSSZERO_DETERMINISTIC, rng)
    assert secret.inv == pow(good, -1, public.n)  # the 4th candidate: ≥ n twice, then 0, all refused
    assert draws == []


def test_random_below_is_uniform_on_a_small_range() -> None:
    """Over [1, 11) with 4-bit candidates every value is equally likely (a chi-square bound)."""
    counts = [0] * 11
    rounds = 22_000
    for _ in range(rounds):
        counts[blindrsa.random_below(11)] += 1
    assert counts[0] == 0
    expected = rounds / 10
    chi2 = sum((c - expected) ** 2 / expected for c in counts[1:])
    assert chi2 < 33.7  # 9 degrees of freedom, p = 0.0001


@pytest.mark.parametrize("exponent", [3, 65539])
def test_wallet_refuses_bank_key_with_other_exponent(exponent: int) -> None:
    """A bank choosing e (gcd(e, φ) > 1 makes blinding lossy) could tag users: only 65537 passes."""
    n = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key().public_numbers().n
    der = blindrsa.PublicKey(n=n, e=exponent).to_der()
    with pytest.raises(RemoteProtocolError, match="65537"):
        blindrsa.PublicKey.from_der(der)


def test_wallet_refuses_bank_key_below_2048_bits() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    der = blindrsa.PublicKey.from_cryptography(key.public_key()).to_der()
    with pytest.raises(RemoteProtocolError, match="2048"):
        blindrsa.PublicKey.from_der(der)


def test_keyset_chain_length_capped() -> None:
    """A chain check costs up to n hashes inside the bank's lock: n is capped at 2^16 per keyset."""
    assert MAX_TOKENS == 1 << 16
    der = blindrsa.PublicKey.from_cryptography(rsa.generate_private_key(public_exponent=65537,
                                                                      key_size=2048).public_key()).to_der()
    ok = MAX_TOKENS
    KeysetInfo(id=keyset_id(ok, ok, "EUR", NOW, NOW, der), value=ok, n=ok, currency="EUR", withdraw_until=NOW,
               spend_until=NOW, public_key=der)
    too_long = MAX_TOKENS + 1
    with pytest.raises(LocalProtocolError, match="65536"):
        KeysetInfo(id=keyset_id(too_long, too_long, "EUR", NOW, NOW, der), value=too_long, n=too_long,
                   currency="EUR", withdraw_until=NOW, spend_until=NOW, public_key=der)
