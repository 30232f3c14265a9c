"""The wallet's seed and counters as the store keeps them, and the coins a seeded withdrawal makes."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from m2mpay.agents.user.seeds import SeedMismatch
from m2mpay.agents.user.store import WalletStore
from m2mpay.protocol import blindrsa, hashchain
from m2mpay.protocol.messages import KeysetInfo, WithdrawAnswer, coin_message, keyset_id
from m2mpay.protocol.errors import LocalProtocolError
from m2mpay.protocol.rules import wallet
from m2mpay.protocol.rules.keyring import COIN_VARIANT
from m2mpay.protocol.seed import WalletSeed, chain_secret
from tests.commands import m2mpay, one_line


@pytest.fixture(scope="module")
def keyset() -> tuple[KeysetInfo, blindrsa.PublicKey, rsa.RSAPrivateKey]:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = blindrsa.PublicKey.from_cryptography(private.public_key())
    return _keyset(public.to_der(), 2_100_000_000), public, private


def _keyset(der: bytes, spend_until: int) -> KeysetInfo:
    return KeysetInfo(id=keyset_id(64, 64, "EUR", 2_000_000_000, spend_until, der), value=64, n=64, currency="EUR",
                      withdraw_until=2_000_000_000, spend_until=spend_until, public_key=der)


def test_a_seed_is_kept_never_replaced_and_shown_once(tmp_path: Path) -> None:
    store = WalletStore(tmp_path)
    seed = WalletSeed.generate(os.urandom)
    assert store.seeds.seed() is None and store.seeds.unshown() is None
    assert store.seeds.put_seed(seed) is True
    assert store.seeds.put_seed(seed) is False  # the same one again: nothing changes
    with pytest.raises(SeedMismatch):
        store.seeds.put_seed(WalletSeed.generate(os.urandom))
    assert store.seeds.unshown() == seed
    store.seeds.mark_shown()
    assert store.seeds.unshown() is None
    store.close()
    reopened = WalletStore(tmp_path)
    assert reopened.seeds.seed() == seed and reopened.seeds.unshown() is None
    reopened.close()


def test_counters_are_reserved_durably_and_given_back_only_when_last(tmp_path: Path) -> None:
    store = WalletStore(tmp_path)
    seeds = store.seeds
    assert seeds.reserve("ks-a", 3) == 0
    assert seeds.reserve("ks-a", 2) == 3
    assert seeds.reserve("ks-b", 1) == 0  # per keyset
    assert seeds.release("ks-a", 0, 3) is False  # something was reserved after it: a gap stays
    assert seeds.release("ks-a", 3, 2) is True
    assert seeds.reserve("ks-a", 1) == 3
    seeds.advance("ks-a", 10)
    seeds.advance("ks-a", 5)  # never back
    assert seeds.counters() == {"ks-a": 10, "ks-b": 1}
    store.close()
    assert WalletStore(tmp_path).seeds.reserve("ks-a", 1) == 10  # across a restart


def test_seeded_withdrawal_makes_the_same_blinded_messages_and_valid_coins(
        keyset: tuple[KeysetInfo, blindrsa.PublicKey, rsa.RSAPrivateKey]) -> None:
    info, public, private = keyset
    seed = WalletSeed.generate(os.urandom)
    first = wallet.pending_withdrawal("alice", info, wallet.derive_coins(seed, info, public, 5, 3), os.urandom(16))
    again = wallet.pending_withdrawal("alice", info, wallet.derive_coins(seed, info, public, 5, 3), os.urandom(16))
    assert first.request.blinded == again.request.blinded  # what restore relies on
    other = wallet.derive_coins(seed, info, public, 8, 1)[0]
    assert other.blinded not in first.request.blinded
    stranger = wallet.derive_coins(WalletSeed.generate(os.urandom), info, public, 5, 1)[0]
    assert stranger.blinded not in first.request.blinded
    signer = blindrsa.BlindSigner.from_private_key(private)
    answer = WithdrawAnswer(req_id=first.request.req_id, keyset=info.id,
                            blind_sigs=tuple(signer.sign(m) for m in first.request.blinded), balance=0)
    coins = wallet.complete_withdrawal(first, answer, info, public)
    assert [c.coin.tip for c in coins] == [hashchain.make_chain(chain_secret(seed, info.id, 5 + i), info.n)
                                           for i in range(3)]
    for c in coins:
        blindrsa.verify(public, c.coin.prefix + coin_message(info.id, c.coin.tip), c.coin.sig, COIN_VARIANT)


def test_a_withdrawal_takes_coins_of_its_own_keyset_only(
        keyset: tuple[KeysetInfo, blindrsa.PublicKey, rsa.RSAPrivateKey]) -> None:
    info, public, _ = keyset
    coins = wallet.derive_coins(WalletSeed.generate(os.urandom), info, public, 0, 1)
    foreign = _keyset(info.public_key, info.spend_until + 1)
    with pytest.raises(LocalProtocolError):
        wallet.pending_withdrawal("alice", foreign, coins, os.urandom(16))
    with pytest.raises(LocalProtocolError):
        wallet.pending_withdrawal("alice", info, [], os.urandom(16))


def test_user_init_shows_the_seed_once_and_never_logs_it(tmp_path: Path) -> None:
    wallet_dir = tmp_path / "wallet"
    shown = m2mpay("user", "init", "--wallet", wallet_dir)
    (phrase,) = re.findall(r"m2mseed1(?: [a-z0-9]{4,5})+", shown.stdout)
    assert shown.stderr == ""
    store = WalletStore(wallet_dir)
    assert store.seeds.seed() == WalletSeed.parse(phrase)
    store.close()
    again = m2mpay("user", "init", "--wallet", wallet_dir, check=False)
    assert again.returncode == 2 and "m2mseed1" not in again.stdout + again.stderr
    assert one_line(again) == (f"m2mpay: user: the wallet at {wallet_dir} has a seed already; it was shown when it "
                               "was made and is never shown again")
    # Nowhere in the wallet directory but the database (a decision log, a lock file: never).
    for path in wallet_dir.iterdir():
        if path.is_file() and not path.name.startswith("wallet.sqlite3"):
            assert WalletSeed.parse(phrase).secret not in path.read_bytes(), path.name


def test_user_init_gives_a_wallet_made_before_seeds_one(tmp_path: Path) -> None:
    WalletStore(tmp_path / "old").close()  # a wallet of an earlier release: no seed
    shown = m2mpay("user", "init", "--wallet", tmp_path / "old").stdout
    (phrase,) = re.findall(r"m2mseed1(?: [a-z0-9]{4,5})+", shown)
    store = WalletStore(tmp_path / "old")
    assert store.seeds.seed() == WalletSeed.parse(phrase) and store.seeds.unshown() is None
    store.close()
