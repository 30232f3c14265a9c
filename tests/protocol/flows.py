"""The steps of a coin's life against the bank's own pipeline (:class:`LocalBank`), for the core's tests.

Withdraw, offer, authorize, block, pay, settle: each a function over the bank, a vendor and a
wallet coin, returning what the next step needs.
"""

from __future__ import annotations

import os

import pytest

from m2mpay.protocol import envelope, hashchain, sealing
from m2mpay.protocol.errors import ErrorCode, RemoteProtocolError
from m2mpay.protocol.messages import (
    BlockAnswer,
    BlockRequest,
    Offer,
    OpenSession,
    SettleAnswer,
    WithdrawAnswer,
)
from m2mpay.protocol.rules import wallet
from m2mpay.protocol.rules.keyring import Keyring
from m2mpay.protocol.rules.vendor import VendorSession

from .world import BANK, NOW, LocalBank, Vendor, det_rng

T = NOW + 600


def small_keyset(bank: LocalBank) -> str:
    return next(k for k, v in bank.keysets.items() if v.info.n == 100)


def withdraw(bank: LocalBank, count: int = 1, *, keyset: str | None = None, seed: int = 1) -> list[wallet.WalletCoin]:
    key = bank.open_account(f"user{seed}", 10_000)
    ks = bank.keysets[keyset or small_keyset(bank)]
    pending = wallet.prepare_withdrawal(f"user{seed}", ks.info, ks.public, count, det_rng(seed))
    data = envelope.sign_request(pending.request, key, f"user{seed}", BANK, "withdraw")
    answer = envelope.open_answer(bank.handle("withdraw", data), bank.answer_key.public_key(), BANK,
                                  "withdraw", WithdrawAnswer, request=data)
    return wallet.complete_withdrawal(pending, answer, ks.info, ks.public)


def make_offer(vendor: Vendor, keyring: Keyring, *, deadline: int = T) -> Offer:
    return Offer(cert=vendor.cert, service="parking", unit="minute", price=1, deadline=deadline,
                 nonce=os.urandom(16), bank=BANK, keysets=tuple(sorted(keyring.keysets)))


def authorize(bank: LocalBank, wc: wallet.WalletCoin, offer: Offer, now: int = NOW,
              ) -> tuple[wallet.WalletCoin, OpenSession]:
    wc, auth = wallet.authorize(wc, deadline=offer.deadline, nonce=offer.nonce,
                                cert_hash=hashchain.h(offer.cert), now=now)
    sealed = sealing.seal(auth.encode(), bank.keyring().sealing_key, sealing.info_for_bank(BANK))
    return wc, OpenSession(coin=wc.coin, sealed=sealed, deadline=offer.deadline, nonce=offer.nonce)


def block(bank: LocalBank, vendor: Vendor, request: BlockRequest, now: int = NOW) -> BlockAnswer:
    signed = vendor.sign(request, "block")
    return envelope.open_answer(bank.handle("block", signed, now), bank.answer_key.public_key(), BANK, "block",
                                BlockAnswer, request=signed)


def open_session(bank: LocalBank, vendor: Vendor, wc: wallet.WalletCoin, now: int = NOW,
                 ) -> tuple[wallet.WalletCoin, VendorSession]:
    keyring = bank.keyring()
    session = VendorSession(make_offer(vendor, keyring, deadline=now + 600), keyring, vendor.name)
    wc, request = authorize(bank, wc, session.offer, now)
    session.blocked(block(bank, vendor, session.open(request, os.urandom(16), now), now))
    return wc, session


def pay(session: VendorSession, wc: wallet.WalletCoin, tokens: int, now: int = NOW) -> wallet.WalletCoin:
    """Pay ``tokens`` tokens at once (what metering asks for is :mod:`tests.protocol.test_pricing`'s)."""
    wc, message = wallet.reveal(wc, tokens)
    session.pay(message, now)
    return wc


def settle(bank: LocalBank, vendor: Vendor, session: VendorSession, *, keep_open: bool = False,
           now: int = NOW) -> SettleAnswer:
    request = session.settle_request(os.urandom(16), keep_open=keep_open)
    signed = vendor.sign(request, "settle")
    answer = envelope.open_answer(bank.handle("settle", signed, now), bank.answer_key.public_key(), BANK, "settle",
                                  SettleAnswer, request=signed)
    session.settled(answer)
    return answer


def refusal(bank: LocalBank, op: str, request: bytes, now: int = NOW) -> ErrorCode:
    """The code of the bank's signed refusal of ``request``."""
    with pytest.raises(RemoteProtocolError) as info:
        envelope.open_answer(bank.handle(op, request, now), bank.answer_key.public_key(), BANK, op, BlockAnswer,
                             request=request)
    return info.value.code
