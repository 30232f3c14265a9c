"""What a certified device with bad intent gets from the bank's one request pipeline.

Each case is a request signed with a valid vendor key: an operation the bank does not know, a
body of another request type than its operation, a forged signature under a request id already
used. Each gets one signed refusal with a stable code, and the books do not move.
"""

from __future__ import annotations

import os

import pytest

from m2mpay.protocol import cose, envelope
from m2mpay.protocol.errors import ErrorCode
from m2mpay.protocol.messages import (
    BlockAnswer,
    Message,
    SettleRequest,
    StatusAnswer,
    StatusRequest,
    WithdrawRequest,
)
from m2mpay.protocol.rules import wallet

from .flows import open_session, pay, withdraw
from .world import BANK, NOW, LocalBank, Vendor


def _signed_as(vendor: Vendor, message: Message, op: str) -> bytes:
    """``message`` signed by ``vendor`` for ``op``, whatever the pair: what a device may send."""
    return cose.sign1(message.encode(), vendor.key, kid=vendor.name.encode(),
                      external_aad=envelope.request_aad(BANK, op))


def _refusal(bank: LocalBank, op: str, data: bytes, *, context: str | None = None) -> tuple[ErrorCode, str]:
    """The code of the bank's signed refusal of ``data`` sent for ``op``, and the message."""
    with pytest.raises(envelope.Refusal) as info:
        envelope.open_answer(bank.handle(op, data, NOW), bank.answer_key.public_key(), BANK, context or op,
                             BlockAnswer, request=data)
    return info.value.code, info.value.message


def _books(bank: LocalBank, *names: str) -> tuple[object, ...]:
    return tuple(bank.balances[name] for name in names)


@pytest.fixture
def blocked(bank: LocalBank) -> tuple[Vendor, wallet.WalletCoin, bytes]:
    """A vendor with a valid certificate that holds a block on a coin and has paid tokens."""
    vendor = bank.enroll("meter", "parking")
    (wc,) = withdraw(bank)
    wc, session = open_session(bank, vendor, wc)
    pay(session, wc, 3)
    return vendor, wc, session.tip


@pytest.mark.parametrize("op", ["refund", "mint", "", "block/x", "Block", "__class__", "withdraw2"])
def test_unknown_operation_is_refused_and_changes_nothing(bank: LocalBank,
                                                          blocked: tuple[Vendor, wallet.WalletCoin, bytes],
                                                          op: str) -> None:
    vendor, _, tip = blocked
    before = (_books(bank, "user1", vendor.account), bank.coins[tip])
    data = _signed_as(vendor, StatusRequest(tip=tip, req_id=os.urandom(16)), op)
    assert _refusal(bank, op, data, context="error")[0] is ErrorCode.UNKNOWN_OP
    assert (_books(bank, "user1", vendor.account), bank.coins[tip]) == before


@pytest.mark.parametrize(("op", "body"), [
    ("block", "settle"), ("settle", "status"), ("status", "settle"), ("withdraw", "status"), ("settle", "withdraw"),
])
def test_body_of_another_operation_is_refused_and_changes_nothing(bank: LocalBank,
                                                                  blocked: tuple[Vendor, wallet.WalletCoin, bytes],
                                                                  op: str, body: str) -> None:
    vendor, _, tip = blocked
    record = bank.coins[tip]
    bodies: dict[str, Message] = {
        "settle": SettleRequest(tip=tip, session=record.session or b"\0" * 16, index=record.position - 1,
                                token=os.urandom(32), keep_open=False, req_id=os.urandom(16)),
        "status": StatusRequest(tip=tip, req_id=os.urandom(16)),
        "withdraw": WithdrawRequest(account="user1", keyset=record.keyset, blinded=(os.urandom(256),),
                                    req_id=os.urandom(16)),
    }
    before = (_books(bank, "user1", vendor.account), bank.coins[tip])
    code, message = _refusal(bank, op, _signed_as(vendor, bodies[body], op))
    assert code is ErrorCode.BAD_REQUEST, message
    assert (_books(bank, "user1", vendor.account), bank.coins[tip]) == before


def test_forged_signature_under_a_used_request_id_is_bad_signature_not_replay(
        bank: LocalBank, blocked: tuple[Vendor, wallet.WalletCoin, bytes]) -> None:
    """The stored answers are keyed by the *verified* signer: an unverified ``kid`` learns nothing."""
    vendor, _, tip = blocked
    mallory = bank.enroll("mallory", "parking")
    ask = StatusRequest(tip=tip, req_id=os.urandom(16))
    honest = vendor.sign(ask, "status")
    answer = envelope.open_answer(bank.handle("status", honest, NOW), bank.answer_key.public_key(), BANK, "status",
                                  StatusAnswer, request=honest)
    assert answer.known and answer.session is not None
    # mallory signs with its own (certified) key but names the vendor: the same key, other bytes
    forged = cose.sign1(StatusRequest(tip=tip, req_id=ask.req_id).encode(), mallory.key,
                        kid=vendor.name.encode(), external_aad=envelope.request_aad(BANK, "status"))
    assert forged != honest
    assert _refusal(bank, "status", forged)[0] is ErrorCode.BAD_SIGNATURE
    # and a request id of mallory's own that the vendor already used is mallory's: no replay
    own = mallory.sign(StatusRequest(tip=tip, req_id=ask.req_id), "status")
    theirs = envelope.open_answer(bank.handle("status", own, NOW), bank.answer_key.public_key(), BANK, "status",
                                  StatusAnswer, request=own)
    assert (theirs.known, theirs.session) == (False, None)  # a coin mallory never blocked
