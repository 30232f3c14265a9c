"""A whole payment life in memory, and every way the bank and vendor refuse one.

The wallet rules, vendor sessions, and the bank's own request pipeline behind ``LocalBank``
(SQLite in memory). No mocks, no network; time is a number passed in.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from m2mpay.protocol import envelope, hashchain, sealing
from m2mpay.protocol.certificates import issue_certificate
from m2mpay.protocol.errors import ErrorCode, RemoteProtocolError
from m2mpay.protocol.messages import (
    Authorization,
    BlockAnswer,
    BlockRequest,
    CertificateBody,

    OpenSession,
    SettleAnswer,
    StatusAnswer,
    StatusRequest,
)
from m2mpay.protocol.rules import wallet
from m2mpay.protocol.rules.vendor import SessionState, VendorSession

from .flows import T, authorize, block, make_offer, open_session, pay, refusal, settle, small_keyset, withdraw
from .world import BANK, NOW, LocalBank, Vendor, det_rng

# --- the lifecycle --------------------------------------------------------------------------

def test_full_lifecycle(bank: LocalBank) -> None:
    """withdraw → block → pay 10 → settle → block at a second vendor → spend to zero."""
    (wc,) = withdraw(bank)
    assert bank.balances["user1"] == 10_000 - 100 and wc.remaining == 100
    parking, charger = bank.enroll("parking", "parking"), bank.enroll("charger", "ev")

    wc, session = open_session(bank, parking, wc)
    for _ in range(10):
        wc = pay(session, wc, 1)
    assert session.paid == 11  # the blocking token is the session's first
    closed = settle(bank, parking, session)
    wc = wc.event(wallet.WalletEvent.CLOSED)
    assert closed.credited == 11 and bank.balances[parking.account] == 11
    assert (wc.position, wc.status) == (89, wallet.CoinStatus.READY)

    wc, session = open_session(bank, charger, wc)
    wc = pay(session, wc, 50)
    wc = pay(session, wc, 38)
    assert wc.position == 0 and session.paid == 89
    answer = settle(bank, charger, session)
    assert answer.spent and answer.credited == 89
    assert wc.event(wallet.WalletEvent.CLOSED).status is wallet.CoinStatus.SPENT
    assert bank.balances[charger.account] == 89
    assert sum(c.amount for c in bank.credits) == bank.withdrawn == 100


def test_checkpoint_lapse_and_late_settlement(bank: LocalBank) -> None:
    (wc,) = withdraw(bank)
    vendor = bank.enroll("meter", "parking")
    wc, session = open_session(bank, vendor, wc)
    wc = pay(session, wc, 4)
    checkpoint = settle(bank, vendor, session, keep_open=True)
    assert checkpoint.open and checkpoint.credited == 5 and session.state is SessionState.OPEN
    wc = pay(session, wc, 3)
    bank.sweep(T + 1)  # the vendor missed its deadline: credited for what the bank saw (nothing new)
    assert bank.balances[vendor.account] == 5
    late = settle(bank, vendor, session, now=T + 5)  # nobody blocked since: accepted
    assert late.credited == 3 and bank.balances[vendor.account] == 8


def test_lapse_credits_the_blocking_token(bank: LocalBank) -> None:
    (wc,) = withdraw(bank)
    vendor = bank.enroll("meter", "parking")
    wc, _ = open_session(bank, vendor, wc)
    bank.sweep(T)
    assert bank.balances[vendor.account] == 1


def test_settlement_delivered_twice_credits_once(bank: LocalBank) -> None:
    (wc,) = withdraw(bank)
    vendor = bank.enroll("meter", "parking")
    wc, session = open_session(bank, vendor, wc)
    wc = pay(session, wc, 2)
    request = vendor.sign(session.settle_request(os.urandom(16), keep_open=False), "settle")
    first, second = bank.handle("settle", request), bank.handle("settle", request)
    assert first == second and bank.balances[vendor.account] == 3


def test_status(bank: LocalBank) -> None:
    (wc,) = withdraw(bank)
    vendor = bank.enroll("meter", "parking")
    wc, _ = open_session(bank, vendor, wc)
    ask = vendor.sign(StatusRequest(tip=wc.coin.tip, req_id=os.urandom(16)), "status")
    status = envelope.open_answer(bank.handle("status", ask), bank.answer_key.public_key(), BANK, "status",
                                  StatusAnswer, request=ask)
    assert status.known and status.position == 99 and status.blocked_until == T


# --- withdraw idempotency -------------------------------------------------------------------

def test_withdraw_retry_debits_once_and_other_request_under_same_id_is_replay(bank: LocalBank) -> None:
    key = bank.open_account("alice", 1_000)
    ks = bank.keysets[small_keyset(bank)]
    pending = wallet.prepare_withdrawal("alice", ks.info, ks.public, 2, det_rng(7))
    data = envelope.sign_request(pending.request, key, "alice", BANK, "withdraw")
    assert bank.handle("withdraw", data) == bank.handle("withdraw", data)
    assert bank.balances["alice"] == 800
    other = dataclasses.replace(pending.request, blinded=pending.request.blinded[:1])
    reused = envelope.sign_request(other, key, "alice", BANK, "withdraw")
    assert refusal(bank, "withdraw", reused) is ErrorCode.REPLAY and bank.balances["alice"] == 800


def test_withdraw_refusals(bank: LocalBank) -> None:
    key = bank.open_account("bob", 150)
    ks = bank.keysets[small_keyset(bank)]
    pending = wallet.prepare_withdrawal("bob", ks.info, ks.public, 2, det_rng(8))
    signed = envelope.sign_request(pending.request, key, "bob", BANK, "withdraw")
    assert refusal(bank, "withdraw", signed) is ErrorCode.INSUFFICIENT_FUNDS
    forged = envelope.sign_request(pending.request, Ed25519PrivateKey.generate(), "bob", BANK, "withdraw")
    assert refusal(bank, "withdraw", forged) is ErrorCode.BAD_SIGNATURE
    assert bank.balances["bob"] == 150


# --- every rejection path of a block --------------------------------------------------------

def _open(bank: LocalBank, vendor: Vendor, wc: wallet.WalletCoin, **offer: int) -> tuple[VendorSession, OpenSession]:
    keyring = bank.keyring()
    session = VendorSession(make_offer(vendor, keyring, **offer), keyring, vendor.name)
    _, request = authorize(bank, wc, session.offer)
    return session, request


def _block_code(bank: LocalBank, vendor: Vendor, request: BlockRequest, now: int = NOW) -> ErrorCode:
    return refusal(bank, "block", vendor.sign(request, "block"), now)


def _raw_block(session: VendorSession, request: OpenSession, **changes: object) -> BlockRequest:
    return dataclasses.replace(
        BlockRequest(cert=session.offer.cert, coin=request.coin, sealed=request.sealed,
                     deadline=request.deadline, nonce=request.nonce, req_id=os.urandom(16)), **changes)


def test_forged_coin(bank: LocalBank) -> None:
    (wc,) = withdraw(bank)
    vendor = bank.enroll("meter", "parking")
    session, request = _open(bank, vendor, wc)
    forged = dataclasses.replace(request.coin, sig=os.urandom(256))
    with pytest.raises(RemoteProtocolError) as info:
        session.open(dataclasses.replace(request, coin=forged), os.urandom(16), NOW)
    assert info.value.code is ErrorCode.BAD_SIGNATURE
    assert _block_code(bank, vendor, _raw_block(session, request, coin=forged)) is ErrorCode.BAD_SIGNATURE


def test_coin_signed_under_another_keyset(bank: LocalBank) -> None:
    big = next(k for k, v in bank.keysets.items() if v.info.n == 1000)
    (wc,) = withdraw(bank, keyset=big)
    relabelled = dataclasses.replace(wc.coin, keyset=small_keyset(bank))  # claim the other denomination
    vendor = bank.enroll("meter", "parking")
    session, request = _open(bank, vendor, dataclasses.replace(wc, coin=relabelled))
    assert _block_code(bank, vendor, _raw_block(session, request)) is ErrorCode.BAD_SIGNATURE


def _seal(bank: LocalBank, auth: Authorization) -> bytes:
    return sealing.seal(auth.encode(), bank.keyring().sealing_key, sealing.info_for_bank(BANK))


def test_chain_position_above_n_and_wrong_chain(bank: LocalBank) -> None:
    (wc,) = withdraw(bank)
    vendor = bank.enroll("meter", "parking")
    session, request = _open(bank, vendor, wc)
    base = Authorization(tip=wc.coin.tip, index=100, token=wc.coin.tip, deadline=T,
                         cert=hashchain.h(vendor.cert), nonce=request.nonce)
    above = _raw_block(session, request, sealed=_seal(bank, base))
    assert _block_code(bank, vendor, above) is ErrorCode.BAD_REQUEST
    wrong = dataclasses.replace(base, index=99, token=os.urandom(32))
    code = _block_code(bank, vendor, _raw_block(session, request, sealed=_seal(bank, wrong)))
    assert code is ErrorCode.CHAIN_MISMATCH
    assert wc.coin.tip not in bank.coins  # nothing registered by a refusal


def test_tampered_sealed_blob(bank: LocalBank) -> None:
    (wc,) = withdraw(bank)
    vendor = bank.enroll("meter", "parking")
    session, request = _open(bank, vendor, wc)
    tampered = request.sealed[:-1] + bytes([request.sealed[-1] ^ 1])
    assert _block_code(bank, vendor, _raw_block(session, request, sealed=tampered)) is ErrorCode.BAD_SIGNATURE


def test_sealed_blob_replayed_in_another_session_or_to_another_vendor(bank: LocalBank) -> None:
    (wc,) = withdraw(bank)
    vendor, thief = bank.enroll("meter", "parking"), bank.enroll("thief", "parking")
    session, request = _open(bank, vendor, wc)
    other_nonce = _raw_block(session, request, nonce=os.urandom(16))
    assert _block_code(bank, vendor, other_nonce) is ErrorCode.BAD_SIGNATURE
    stolen = _raw_block(session, request, cert=thief.cert)
    assert _block_code(bank, thief, stolen) is ErrorCode.BAD_SIGNATURE
    # the genuine block works once; the same authorization again is a replay
    session.blocked(block(bank, vendor, session.open(request, os.urandom(16), NOW)))
    settle(bank, vendor, session)
    assert _block_code(bank, vendor, _raw_block(session, request)) is ErrorCode.REPLAY


def test_wrong_or_expired_certificate(bank: LocalBank) -> None:
    (wc,) = withdraw(bank)
    vendor = bank.enroll("meter", "parking")
    rogue_body = CertificateBody(bank=BANK, vendor="meter", account="acct-meter", name="Meter",
                                 category="parking", key=bank.enroll("x", "p").cert[-32:], nbf=NOW - 1, exp=NOW + 99)
    rogue = dataclasses.replace(vendor, cert=issue_certificate(rogue_body, Ed25519PrivateKey.generate()))
    session, request = _open(bank, rogue, wc)
    assert _block_code(bank, rogue, _raw_block(session, request)) is ErrorCode.CERT_INVALID
    expired = bank.enroll("old", "parking", nbf=NOW - 100, exp=NOW - 1)
    session, request = _open(bank, expired, wc)
    assert _block_code(bank, expired, _raw_block(session, request)) is ErrorCode.CERT_INVALID


@pytest.mark.parametrize("deadline", [NOW + 1, NOW + 2 * 86400], ids=["too-soon", "too-far"])
def test_deadline_outside_window(bank: LocalBank, deadline: int) -> None:
    (wc,) = withdraw(bank)
    vendor = bank.enroll("meter", "parking")
    session, request = _open(bank, vendor, wc, deadline=deadline)
    assert _block_code(bank, vendor, _raw_block(session, request)) is ErrorCode.DEADLINE


def test_coin_blocked_by_another_vendor_then_late_settlement_refused(bank: LocalBank) -> None:
    (wc,) = withdraw(bank)
    first, second = bank.enroll("first", "parking"), bank.enroll("second", "ev")
    wc_after, session = open_session(bank, first, wc)
    s2, r2 = _open(bank, second, wc_after.expire(T))
    assert _block_code(bank, second, _raw_block(s2, r2)) is ErrorCode.COIN_BLOCKED
    # after T the first block lapses and the second vendor may block
    wc2 = wc_after.expire(T + 1)
    _, s2 = open_session(bank, second, wc2, now=T + 1)
    request = session.settle_request(os.urandom(16), keep_open=False)
    assert refusal(bank, "settle", first.sign(request, "settle"), T + 2) is ErrorCode.SESSION_CLOSED
    assert bank.balances[first.account] == 1  # what the bank saw, credited at lapse


def test_coin_spent(bank: LocalBank) -> None:
    (wc,) = withdraw(bank)
    vendor = bank.enroll("meter", "parking")
    wc, session = open_session(bank, vendor, wc)
    wc = pay(session, wc, 99)
    settle(bank, vendor, session)
    record = bank.coins[wc.coin.tip]
    assert record.spent
    # an attacker who kept an old authorization cannot reopen a spent coin
    s2 = VendorSession(make_offer(vendor, bank.keyring()), bank.keyring(), vendor.name)
    auth = Authorization(tip=wc.coin.tip, index=0, token=record.last, deadline=T,
                         cert=hashchain.h(vendor.cert), nonce=s2.offer.nonce)
    req = OpenSession(coin=wc.coin, sealed=_seal(bank, auth), deadline=T, nonce=s2.offer.nonce)
    assert _block_code(bank, vendor, _raw_block(s2, req)) is ErrorCode.COIN_SPENT


def test_forged_bank_answer_is_refused(bank: LocalBank) -> None:
    (wc,) = withdraw(bank)
    vendor = bank.enroll("meter", "parking")
    session, request = _open(bank, vendor, wc)
    signed = vendor.sign(session.open(request, os.urandom(16), NOW), "block")
    raw = bank.handle("block", signed)
    with pytest.raises(RemoteProtocolError) as info:
        envelope.open_answer(raw, Ed25519PrivateKey.generate().public_key(), BANK, "block", BlockAnswer,
                             request=signed)
    assert info.value.code is ErrorCode.BAD_SIGNATURE
    with pytest.raises(RemoteProtocolError):  # an answer for another operation
        envelope.open_answer(raw, bank.answer_key.public_key(), BANK, "settle", SettleAnswer, request=signed)


def test_vendor_refuses_bad_tokens_and_repeats_receipts(bank: LocalBank) -> None:
    (wc,) = withdraw(bank)
    vendor = bank.enroll("meter", "parking")
    wc, session = open_session(bank, vendor, wc)
    wc, message = wallet.reveal(wc, 2)
    receipt = session.pay(message, NOW)
    assert session.pay(message, NOW) == receipt  # a CoAP retransmission
    with pytest.raises(RemoteProtocolError) as info:
        session.pay(dataclasses.replace(message, index=message.index - 1, token=os.urandom(32)), NOW)
    assert info.value.code is ErrorCode.CHAIN_MISMATCH
    wc, late = wallet.reveal(wc, 1)
    with pytest.raises(RemoteProtocolError) as info:
        session.pay(late, T)
    assert info.value.code is ErrorCode.DEADLINE
    assert session.paid == 3


def test_wallet_gap_after_lost_token_is_accepted(bank: LocalBank) -> None:
    """Write-ahead: a token whose fate is unknown is skipped; the vendor accepts the gap."""
    (wc,) = withdraw(bank)
    vendor = bank.enroll("meter", "parking")
    wc, session = open_session(bank, vendor, wc)
    wc, _lost = wallet.reveal(wc, 1)  # recorded as used, never arrived
    wc, message = wallet.reveal(wc, 1)
    assert session.pay(message, NOW).tokens == 3
    assert settle(bank, vendor, session).credited == 3


