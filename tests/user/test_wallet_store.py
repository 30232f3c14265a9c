"""The wallet store: private file, write-ahead positions, withdrawals that survive a crash."""

from __future__ import annotations

import dataclasses
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from m2mpay.agents.user.store import KeptReceipt, WalletStore
from m2mpay.protocol import blindrsa, envelope
from m2mpay.protocol.messages import FinalReceipt, WithdrawAnswer
from m2mpay.protocol.receipts import sign_receipt
from m2mpay.protocol.rules import wallet

from ..protocol.world import BANK, NOW, LocalBank, det_rng, make_keyset


@pytest.fixture(scope="module")
def bank() -> Iterator[LocalBank]:
    ks = make_keyset(rsa.generate_private_key(public_exponent=65537, key_size=2048), value=100, n=100)
    world = LocalBank(keysets={ks.info.id: ks})
    yield world
    world.close()


def test_withdrawal_survives_a_crash_and_debits_once(bank: LocalBank, tmp_path: Path) -> None:
    key = bank.open_account("alice", 1_000)
    ks = next(iter(bank.keysets.values()))
    store = WalletStore(tmp_path / "wallet")
    assert stat.S_IMODE((tmp_path / "wallet" / "wallet.sqlite3").stat().st_mode) == 0o600
    pending = wallet.prepare_withdrawal("alice", ks.info, ks.public, 2, det_rng(3))
    signed = envelope.sign_request(pending.request, key, "alice", BANK, "withdraw")
    store.begin_withdrawal(pending, signed, NOW, value=2 * ks.info.value)
    bank.handle("withdraw", signed)  # the bank debits; the answer is lost with the crash
    store.close()

    store = WalletStore(tmp_path / "wallet")
    ((again, same_bytes),) = store.pending_withdrawals()
    assert same_bytes == signed and again == pending
    answer = envelope.open_answer(bank.handle("withdraw", same_bytes), bank.answer_key.public_key(), BANK,
                                  "withdraw", WithdrawAnswer, request=same_bytes)
    coins = wallet.complete_withdrawal(again, answer, ks.info, ks.public)
    store.finish_withdrawal(pending.request.req_id, coins)
    assert bank.balances["alice"] == 800 and store.pending_withdrawals() == []
    assert [wc for wc, _ in store.coins()] == coins
    for wc, _ in store.coins():
        blindrsa.verify(ks.public, wc.coin.signed_input, wc.coin.sig, blindrsa.SHA384_PSS_RANDOMIZED)


def test_write_ahead_never_reuses_a_position(bank: LocalBank, tmp_path: Path) -> None:
    key = bank.open_account("bob", 1_000)
    ks = next(iter(bank.keysets.values()))
    pending = wallet.prepare_withdrawal("bob", ks.info, ks.public, 1, det_rng(4))
    signed = envelope.sign_request(pending.request, key, "bob", BANK, "withdraw")
    answer = envelope.open_answer(bank.handle("withdraw", signed), bank.answer_key.public_key(), BANK, "withdraw",
                                  WithdrawAnswer, request=signed)
    (wc,) = wallet.complete_withdrawal(pending, answer, ks.info, ks.public)
    store = WalletStore(tmp_path / "wallet")
    store.save(wc)
    wc, auth = wallet.authorize(wc, deadline=NOW + 600, nonce=os.urandom(16), cert_hash=os.urandom(32), now=NOW)
    store.save(wc, frozenset({"meter"}))  # written ahead, then the token may leave
    wc, pay = wallet.reveal(wc, 3)
    store.save(wc)
    store.close()  # crash: did the Pay arrive? unknown

    store = WalletStore(tmp_path / "wallet")
    ((resumed, vendors),) = store.coins()
    assert resumed.position == pay.index == 96 and vendors == {"meter"}
    resumed, nxt = wallet.reveal(resumed, 1)
    assert nxt.index == 95 and nxt.index < pay.index < auth.index  # strictly below anything revealed
    stale = wallet.WalletCoin(coin=resumed.coin, n=resumed.n, token_value=resumed.token_value, position=99,
                              seed=resumed.seed, traversal=resumed.traversal)
    store.save(stale)  # an older state can never overwrite a newer one
    assert store.coin(resumed.coin.tip).position == 96  # type: ignore[union-attr]


def test_a_final_receipt_replaces_a_pending_one_never_the_reverse(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    pending = FinalReceipt(session=b"s" * 16, tip=b"t" * 32, index=90, tokens=10, credited=0, pending=True,
                           vendor="meter", ts=NOW)
    final = dataclasses.replace(pending, credited=10, pending=None, ts=NOW + 5)

    def kept(receipt: FinalReceipt) -> KeptReceipt:
        return KeptReceipt(receipt=receipt, signed=sign_receipt(receipt, key), cert=b"cert", address="coap://[::1]:1")

    store = WalletStore(tmp_path / "wallet")
    store.keep_receipt(kept(pending))
    assert [k.receipt for k in store.receipts()] == [pending]
    store.keep_receipt(kept(final))
    store.keep_receipt(kept(dataclasses.replace(pending, ts=NOW + 9)))  # a late pending answer changes nothing
    store.close()
    store = WalletStore(tmp_path / "wallet")
    (again,) = store.receipts()
    assert again == kept(final) and again.address == "coap://[::1]:1"
    store.close()
