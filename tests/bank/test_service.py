"""The bank service on SQLite and PostgreSQL: money moves once, refusals change nothing."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import stat

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from m2mpay.agents.bank import admin
from m2mpay.protocol import cbor, cose
from m2mpay.protocol.errors import ErrorCode, RemoteProtocolError
from m2mpay.protocol.messages import BlockAnswer, BlockRequest, StatusAnswer, StatusRequest
from m2mpay.protocol.rules import wallet

from tests.bank_world import BankWorld

pytestmark = pytest.mark.asyncio


async def test_withdraw_pay_settle(world: BankWorld) -> None:
    user, vendor = world.user("alice"), world.vendor("meter")
    (wc,) = await world.withdraw(user)
    assert admin.balance(world.store, "alice") == 10_000 - 100
    wc, session = await world.block(vendor, wc)
    for _ in range(10):
        wc, pay = wallet.reveal(wc, 1)
        session.pay(pay, world.clock.now)
    answer = await world.settle(vendor, session)
    assert answer.credited == 11 and admin.balance(world.store, "meter") == 11
    report = world.audit()
    assert (report.withdrawn, report.credited, report.outstanding) == (100, 11, 89)


async def test_checkpoint_then_lapse_by_sweep(world: BankWorld) -> None:
    user, vendor = world.user("alice"), world.vendor("meter")
    (wc,) = await world.withdraw(user)
    wc, session = await world.block(vendor, wc)
    wc, pay = wallet.reveal(wc, 4)
    session.pay(pay, world.clock.now)
    assert (await world.settle(vendor, session, keep_open=True)).credited == 5
    world.clock.now += 601
    assert await world.service.sweep() == 1
    assert admin.balance(world.store, "meter") == 5  # nothing new seen since the checkpoint


async def test_withdraw_retry_debits_once_and_replay_is_refused(world: BankWorld) -> None:
    user = world.user("alice")
    info = world.keys.keyring.keysets[world.keyset]
    pending = wallet.prepare_withdrawal("alice", info, world.keys.keyring.rsa_keys[world.keyset], 2)
    data = user.sign(pending.request, "withdraw")
    first, second = await asyncio.gather(world.send("withdraw", data), world.send("withdraw", data))
    assert first == second  # the second is the stored answer, byte for byte
    assert admin.balance(world.store, "alice") == 10_000 - 200
    other = dataclasses.replace(pending.request, blinded=pending.request.blinded[:1])
    with pytest.raises(RemoteProtocolError) as info_:
        signed = user.sign(other, "withdraw")
        world.open(await world.send("withdraw", signed), "withdraw", BlockAnswer, request=signed)
    assert info_.value.code is ErrorCode.REPLAY and admin.balance(world.store, "alice") == 9_800


async def test_same_coin_two_vendors_at_once(world: BankWorld) -> None:
    user = world.user("alice", deposit=100_000)
    first, second = world.vendor("first"), world.vendor("second")
    for _ in range(10):
        (wc,) = await world.withdraw(user)
        _, _, a = world.session(first, wc)
        _, _, b = world.session(second, wc)
        answers = await asyncio.gather(world.send("block", a), world.send("block", b))
        outcomes = []
        for request, raw in zip((a, b), answers, strict=True):
            try:
                world.open(raw, "block", BlockAnswer, request=request)
                outcomes.append("ok")
            except RemoteProtocolError as exc:
                outcomes.append(exc.code.wire)
        assert sorted(outcomes) == ["coin_blocked", "ok"], outcomes


async def test_settlement_delivered_twice_credits_once(world: BankWorld) -> None:
    user, vendor = world.user("alice"), world.vendor("meter")
    (wc,) = await world.withdraw(user)
    wc, session = await world.block(vendor, wc)
    signed = vendor.sign(session.settle_request(os.urandom(16), keep_open=False), "settle")
    answers = await asyncio.gather(*(world.send("settle", signed) for _ in range(3)))
    assert len(set(answers)) == 1 and admin.balance(world.store, "meter") == 1


async def test_status_for_its_vendor(world: BankWorld) -> None:
    user, vendor = world.user("alice"), world.vendor("meter")
    (wc,) = await world.withdraw(user)
    wc, session = await world.block(vendor, wc)
    ask = vendor.sign(StatusRequest(tip=wc.coin.tip, req_id=os.urandom(16)), "status")
    status = world.open(await world.send("status", ask), "status", StatusAnswer, request=ask)
    assert isinstance(status, StatusAnswer)
    assert status.known and status.position == 99 and status.session == session.session


BAD_INPUTS = [
    ("block", b"\xff\xff", "bad_request"),  # malformed CBOR
    ("block", cbor.encode([b"", {}, b"", b""]), "bad_request"),  # not a valid COSE_Sign1
    ("block", b"\x00" * 100_000, "too_large"),  # oversize
    ("nonsense", b"\x80", "unknown_op"),  # unknown operation
]


@pytest.mark.parametrize(("op", "data", "code"), BAD_INPUTS, ids=["malformed", "bad-cose", "oversize", "unknown-op"])
async def test_bad_input_gets_a_signed_error_and_changes_nothing(world: BankWorld, op: str, data: bytes,
                                                                  code: str) -> None:
    raw = await world.send(op, data)
    signed = cose.decode_sign1(raw)
    assert cbor.decode(signed.payload)["code"] == code
    assert world.audit().coins == 0


async def test_unsigned_or_wrongly_signed_requests(world: BankWorld) -> None:
    user, vendor = world.user("alice"), world.vendor("meter")
    (wc,) = await world.withdraw(user)
    _, _, signed = world.session(vendor, wc)
    forged = dataclasses.replace(vendor, key=Ed25519PrivateKey.generate())
    request = cose.decode_sign1(signed)
    forgery = forged.sign(BlockRequest.decode(request.payload), "block")
    raw = await world.send("block", forgery)
    with pytest.raises(RemoteProtocolError) as info:
        world.open(raw, "block", BlockAnswer, request=forgery)
    assert info.value.code is ErrorCode.BAD_SIGNATURE and world.audit().coins == 0
    balance = admin.balance(world.store, "alice")
    other = world.user("bob")
    pending = wallet.prepare_withdrawal("alice", world.keys.keyring.keysets[world.keyset],
                                        world.keys.keyring.rsa_keys[world.keyset], 1)
    by_bob = other.sign(pending.request, "withdraw")  # bob signs for alice
    raw = await world.send("withdraw", by_bob)
    with pytest.raises(RemoteProtocolError):
        world.open(raw, "withdraw", BlockAnswer, request=by_bob)
    assert admin.balance(world.store, "alice") == balance


async def test_key_files_are_private(world: BankWorld) -> None:
    world.user("alice")
    for path in (world.directory / "bank" / "keys").iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE((world.directory / "alice.json").stat().st_mode) == 0o600


async def test_retired_keyset_is_refused_for_withdrawal(world: BankWorld) -> None:
    from m2mpay.agents.bank.keys import load_bank, retire_keyset
    from m2mpay.agents.bank.service import BankService

    user = world.user("alice")
    retired = world.keyset
    info, public = world.keys.keyring.keysets[retired], world.keys.keyring.rsa_keys[retired]
    retire_keyset(world.store, retired, world.clock.now)
    keys, store = load_bank(world.directory / "bank", world.clock.now)  # still listed: its coins are spent
    try:
        assert keys.keyring.phases[retired].phase == "spend-only"
        service = BankService(keys, store, clock=world.clock)
        pending = wallet.prepare_withdrawal("alice", info, public, 1)
        signed = user.sign(pending.request, "withdraw")
        raw = await service.handle("withdraw", signed)
        with pytest.raises(RemoteProtocolError) as refused:
            world.open(raw, "withdraw", BlockAnswer, request=signed)
        assert refused.value.code is ErrorCode.KEYSET_EXPIRED and admin.balance(store, "alice") == 10_000
    finally:
        store.close()
