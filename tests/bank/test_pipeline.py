"""The real bank, on SQLite and PostgreSQL, against a certified device with bad intent.

The same cases as ``tests/protocol/test_bank_pipeline.py`` (the pipeline on SQLite in memory),
here through the bank's service and its store: an operation the bank does not know, a body of
another request type than its operation, a forged signature under a request id already used.
Each gets one signed refusal with a stable code; no stored answer, coin or journal row moves.
"""

from __future__ import annotations

import os

import pytest

from m2mpay.agents.bank.operations import OPERATIONS
from m2mpay.agents.bank.tx import Tx
from m2mpay.protocol import cose, envelope
from m2mpay.protocol.errors import ErrorCode
from m2mpay.protocol.messages import (
    OPS,
    BlockAnswer,
    Message,
    SettleRequest,
    StatusAnswer,
    StatusRequest,
    WithdrawRequest,
)
from m2mpay.protocol.rules.bank import CoinRecord

from ..bank_world import BankWorld, Device

def _signed_as(world: BankWorld, device: Device, message: Message, op: str) -> bytes:
    """``message`` signed by ``device`` for ``op``, whatever the pair: what a device may send."""
    return cose.sign1(message.encode(), device.key, kid=device.name.encode(),
                      external_aad=envelope.request_aad(world.bank, op))


async def _refusal(world: BankWorld, op: str, data: bytes, *, context: str | None = None) -> ErrorCode:
    with pytest.raises(envelope.Refusal) as info:
        envelope.open_answer(await world.send(op, data), world.keys.answer_key.public_key(), world.bank,
                             context or op, BlockAnswer, request=data)
    return info.value.code


def _books(world: BankWorld, tip: bytes) -> tuple[object, ...]:
    def read(tx: Tx) -> tuple[object, ...]:
        return tuple(tx.journal()), tuple(tx.stored_answers()), tx.coin(tip, lock=False), tuple(tx.issuance())

    return world.store.run_sync(read)


async def _blocked(world: BankWorld) -> tuple[Device, CoinRecord]:
    vendor = world.vendor("meter")
    (wc,) = await world.withdraw(world.user("alice"))
    wc, _ = await world.block(vendor, wc)
    record = world.store.run_sync(lambda tx: tx.coin(wc.coin.tip, lock=False))
    assert record is not None
    return vendor, record


def test_one_handler_per_operation() -> None:
    assert sorted(OPERATIONS) == sorted(OPS) == ["block", "exchange", "restore", "settle", "status", "withdraw"]
    assert all(OPERATIONS[op].request is OPS[op][0] for op in OPS)


@pytest.mark.asyncio
async def test_unknown_operations_and_foreign_bodies_are_refused_and_change_nothing(world: BankWorld) -> None:
    vendor, record = await _blocked(world)
    before = _books(world, record.tip)
    for op in ("refund", "mint", "", "Block", "__class__", "block/x"):
        data = _signed_as(world, vendor, StatusRequest(tip=record.tip, req_id=os.urandom(16)), op)
        assert await _refusal(world, op, data, context="error") is ErrorCode.UNKNOWN_OP, op
    bodies: dict[str, Message] = {
        "settle": SettleRequest(tip=record.tip, session=record.session or b"\0" * 16, index=record.position - 1,
                                token=os.urandom(32), keep_open=False, req_id=os.urandom(16)),
        "status": StatusRequest(tip=record.tip, req_id=os.urandom(16)),
        "withdraw": WithdrawRequest(account="alice", keyset=record.keyset, blinded=(os.urandom(256),),
                                    req_id=os.urandom(16)),
    }
    for op, body in (("block", "settle"), ("settle", "status"), ("status", "settle"), ("withdraw", "status"),
                     ("settle", "withdraw")):
        code = await _refusal(world, op, _signed_as(world, vendor, bodies[body], op))
        assert code is ErrorCode.BAD_REQUEST, (op, body)
    assert _books(world, record.tip) == before


@pytest.mark.asyncio
async def test_forged_signature_under_a_used_request_id_is_bad_signature(world: BankWorld) -> None:
    vendor, record = await _blocked(world)
    mallory = world.vendor("mallory")
    ask = StatusRequest(tip=record.tip, req_id=os.urandom(16))
    honest = vendor.sign(ask, "status")
    answer = envelope.open_answer(await world.send("status", honest), world.keys.answer_key.public_key(),
                                  world.bank, "status", StatusAnswer, request=honest)
    assert answer.known and answer.session == record.session
    before = _books(world, record.tip)
    forged = cose.sign1(ask.encode(), mallory.key, kid=vendor.name.encode(),
                        external_aad=envelope.request_aad(world.bank, "status"))
    assert await _refusal(world, "status", forged) is ErrorCode.BAD_SIGNATURE
    assert _books(world, record.tip) == before
