"""The bank's restore: the signatures it issued on the messages a wallet asks about, byte for byte,
nothing it did not sign, nothing written; and withdrawals and exchanges refusing a blinded message
signed before (``replay``), so a restored wallet replaying a counter never pays twice for one coin."""

from __future__ import annotations

import asyncio
import os

import pytest

from m2mpay.agents.bank import admin
from m2mpay.agents.bank.restore import RESTORE_BURST, RESTORE_SIGNATURES_PER_SECOND, SignatureBudget
from m2mpay.agents.mqtt import BankClient
from m2mpay.protocol import cbor, cose, envelope
from m2mpay.protocol.errors import ErrorCode, RemoteProtocolError
from m2mpay.protocol.messages import MAX_WITHDRAW_BATCH, WithdrawAnswer, WithdrawRequest
from m2mpay.protocol.messages.exchange import MAX_RESTORE, ExchangeAnswer, Output, RestoreAnswer
from m2mpay.protocol.rules import wallet
from tests.bank_world import BankWorld

from .exchange_world import (
    answer_of,
    every_row,
    exchanging,
    prepare,
    random_blinded,
    resealed,
    restore,
    restore_request,
    send,
    send_withdrawal,
    withdraw,
)

pytestmark = pytest.mark.asyncio


async def _refused(world: BankWorld, data: bytes) -> ErrorCode:
    with pytest.raises(envelope.Refusal) as refusal:
        await restore(world, data)
    return refusal.value.code


def _withdrawal(world: BankWorld, user: str, keyset: str, count: int) -> wallet.PendingWithdrawal:
    return wallet.prepare_withdrawal(user, world.keys.keyring.keysets[keyset], world.keys.keyring.rsa_keys[keyset],
                                     count)


def _withdrawal_refusal(world: BankWorld, signed: bytes, raw: bytes) -> ErrorCode:
    with pytest.raises(envelope.Refusal) as refusal:
        world.open(raw, "withdraw", WithdrawAnswer, request=signed)
    return refusal.value.code


async def test_bad_intent_restores_are_refused_or_find_nothing_and_change_nothing(world: BankWorld) -> None:
    """What anyone on the broker can send: malformed, oversize and duplicated requests are refused
    with their codes; messages the bank never signed, or signed for another keyset, are not found."""
    with exchanging(world) as keyset:
        user = world.user("alice")
        pending = _withdrawal(world, user.name, keyset, 2)
        signed, raw = await send_withdrawal(world, user, pending.request)
        world.open(raw, "withdraw", WithdrawAnswer, request=signed)
        before = every_row(world)
        one = pending.request.blinded[0]
        other_keyset = next(k for k in world.keys.keyring.keysets
                            if k != keyset and world.keys.keyring.rsa_keys[k].size == len(one))
        # Malformed: not CBOR, no messages, a field too many, a message that is not a blinded one,
        # a signed envelope around it (a restore is plain CBOR), more than 64 messages.
        obj = cbor.decode(restore_request([(keyset, one)]))
        assert isinstance(obj, dict)
        assert await _refused(world, b"\xff\x00") is ErrorCode.BAD_REQUEST
        assert await _refused(world, cbor.encode({**obj, "blinded": []})) is ErrorCode.BAD_REQUEST
        assert await _refused(world, cbor.encode({**obj, "account": "alice"})) is ErrorCode.BAD_REQUEST
        asked = obj["blinded"]
        assert isinstance(asked, list)
        short = [{"keyset": keyset, "blinded": b"short"}]
        assert await _refused(world, cbor.encode({**obj, "blinded": short})) is ErrorCode.BAD_REQUEST
        assert await _refused(world, signed) is ErrorCode.BAD_REQUEST  # the withdrawal's signed bytes
        many = [{"keyset": keyset, "blinded": random_blinded(world, keyset)} for _ in range(MAX_RESTORE + 1)]
        assert await _refused(world, cbor.encode({**obj, "blinded": many})) is ErrorCode.BAD_REQUEST
        # Oversize, and the same message twice (a restore asks about a message once).
        assert await _refused(world, b"\xa0" + b"\x00" * (65 * 1024)) is ErrorCode.TOO_LARGE
        assert await _refused(world, cbor.encode({**obj, "blinded": asked * 2})) is ErrorCode.BAD_REQUEST
        # Never signed, or signed for another keyset than the one named: not found, no signature.
        nothing = await restore(world, restore_request([(keyset, random_blinded(world, keyset)),
                                                        (other_keyset, one)]))
        assert (nothing.found, nothing.blind_sigs) == ((), ())
        assert every_row(world) == before


async def test_restore_finds_exactly_the_withdrawn_messages_with_the_signatures_issued(world: BankWorld) -> None:
    with exchanging(world) as keyset:
        user = world.user("alice")
        pending = _withdrawal(world, user.name, keyset, 3)
        signed, raw = await send_withdrawal(world, user, pending.request)
        issued = world.open(raw, "withdraw", WithdrawAnswer, request=signed)
        before = every_row(world)
        unused = [random_blinded(world, keyset) for _ in range(3)]
        asked = [(keyset, unused[0]), (keyset, pending.request.blinded[2]), (keyset, unused[1]),
                 (keyset, pending.request.blinded[0]), (keyset, pending.request.blinded[1]), (keyset, unused[2])]
        data = restore_request(asked)
        answer = await restore(world, data)
        assert answer.found == (1, 3, 4)
        assert answer.blind_sigs == (issued.blind_sigs[2], issued.blind_sigs[0], issued.blind_sigs[1])
        # The signatures finalize into the coins the withdrawal gave.
        coins = wallet.complete_withdrawal(pending, issued, world.keys.keyring.keysets[keyset],
                                           world.keys.keyring.rsa_keys[keyset])
        assert len(coins) == 3
        # Nothing written; the same request again gets an equal, valid answer.
        assert every_row(world) == before
        again = await restore(world, data)
        assert (again.found, again.blind_sigs) == (answer.found, answer.blind_sigs)
        assert every_row(world) == before


async def test_restore_finds_exchange_outputs_and_the_change_signed_but_no_unused_slot(world: BankWorld) -> None:
    with exchanging(world) as keyset:
        (wc,) = await withdraw(world, world.user("alice"), keyset)
        pending = prepare(world, wc)  # no outputs, a change slot per power of two up to 64
        exchanged = answer_of(world, await send(world, pending.data), pending.data)
        change = pending.request.change
        assert 0 < len(exchanged.change_used) < len(change)  # 100 = 64 + 32 + 4: some slots unused
        answer = await restore(world, restore_request([(o.keyset, o.blinded) for o in change]))
        assert answer.found == exchanged.change_used
        assert answer.blind_sigs == exchanged.change_sigs


async def test_a_withdrawal_resending_a_signed_message_is_replay_and_debits_nothing(world: BankWorld) -> None:
    with exchanging(world) as keyset:
        user = world.user("alice")
        pending = _withdrawal(world, user.name, keyset, 2)
        first, first_raw = await send_withdrawal(world, user, pending.request)
        world.open(first_raw, "withdraw", WithdrawAnswer, request=first)
        balance = admin.balance(world.store, "alice")
        # A signed message under a new request id, alone or among fresh ones.
        fresh = _withdrawal(world, user.name, keyset, 1).request.blinded[0]
        for blinded in ((pending.request.blinded[1],), (fresh, pending.request.blinded[0])):
            again = WithdrawRequest(account="alice", keyset=keyset, blinded=blinded, req_id=os.urandom(16))
            signed, raw = await send_withdrawal(world, user, again)
            assert _withdrawal_refusal(world, signed, raw) is ErrorCode.REPLAY
            assert await world.send("withdraw", signed) == raw  # the refusal is stored, byte for byte
        # The same fresh message twice in one request.
        twice = WithdrawRequest(account="alice", keyset=keyset, blinded=(fresh, fresh), req_id=os.urandom(16))
        signed, raw = await send_withdrawal(world, user, twice)
        assert _withdrawal_refusal(world, signed, raw) is ErrorCode.REPLAY
        assert admin.balance(world.store, "alice") == balance
        # The honest retry of the paid withdrawal still gets its answer, byte for byte.
        assert await world.send("withdraw", first) == first_raw
        # A message an exchange signed (a used change slot) is refused the same way.
        (wc,) = await withdraw(world, user, keyset)
        balance = admin.balance(world.store, "alice")
        exchange = prepare(world, wc)
        exchanged = answer_of(world, await send(world, exchange.data), exchange.data)
        used = exchange.request.change[exchanged.change_used[0]]
        by_exchange = WithdrawRequest(account="alice", keyset=used.keyset, blinded=(used.blinded,),
                                      req_id=os.urandom(16))
        signed, raw = await send_withdrawal(world, user, by_exchange)
        assert _withdrawal_refusal(world, signed, raw) is ErrorCode.REPLAY
        assert admin.balance(world.store, "alice") == balance


async def test_an_exchange_whose_change_a_withdrawal_signed_is_replay(world: BankWorld) -> None:
    with exchanging(world) as keyset:
        user = world.user("alice")
        (wc,) = await withdraw(world, user, keyset)
        pending = prepare(world, wc)
        slot = pending.request.change[0]
        bought = _withdrawal(world, user.name, slot.keyset, 1)  # a coin of the slot's keyset, paid for
        signed, raw = await send_withdrawal(world, user, bought.request)
        world.open(raw, "withdraw", WithdrawAnswer, request=signed)
        before = every_row(world)
        change = (Output(keyset=slot.keyset, blinded=bought.request.blinded[0]), *pending.request.change[1:])
        data = resealed(world, wc, pending, change)
        with pytest.raises(envelope.Refusal) as refusal:
            answer_of(world, await send(world, data), data)
        assert refusal.value.code is ErrorCode.REPLAY
        assert every_row(world) == before
        assert answer_of(world, await send(world, pending.data), pending.data).position == 100  # its own is fine


async def test_the_signature_budget_refuses_with_unavailable_before_any_signing(world: BankWorld) -> None:
    assert (SignatureBudget().rate, SignatureBudget().burst) == (RESTORE_SIGNATURES_PER_SECOND, RESTORE_BURST)
    with exchanging(world) as keyset:
        user = world.user("alice")
        pending = _withdrawal(world, user.name, keyset, 3)
        signed, raw = await send_withdrawal(world, user, pending.request)
        world.open(raw, "withdraw", WithdrawAnswer, request=signed)
        world.service.pipeline.context.restore_budget = SignatureBudget(rate=2, burst=3)
        three = restore_request([(keyset, b) for b in pending.request.blinded])
        two = restore_request([(keyset, b) for b in pending.request.blinded[:2]])
        before = every_row(world)
        assert (await restore(world, three)).found == (0, 1, 2)
        with pytest.raises(envelope.Refusal) as refusal:
            await restore(world, three)
        assert refusal.value.code is ErrorCode.UNAVAILABLE and not refusal.value.final
        # Nothing found costs nothing: still answered.
        assert (await restore(world, restore_request([(keyset, random_blinded(world, keyset))]))).found == ()
        world.clock.now += 1  # two more signatures
        assert await _refused(world, three) is ErrorCode.UNAVAILABLE
        assert (await restore(world, two)).found == (0, 1)
        world.clock.now += 60  # saved up to the burst, no more
        assert (await restore(world, three)).found == (0, 1, 2)
        assert await _refused(world, two) is ErrorCode.UNAVAILABLE
        assert every_row(world) == before


async def test_a_withdrawal_of_the_largest_batch_opens_and_restores(world: BankWorld) -> None:
    """64 blind signatures make an answer envelope above the default CBOR limit (16 KiB): the wallet
    opens it with the answer type's own limit."""
    user = world.user("alice")
    pending = _withdrawal(world, user.name, world.keyset, MAX_WITHDRAW_BATCH)
    signed, raw = await send_withdrawal(world, user, pending.request)
    assert len(raw) > cbor.DEFAULT_MAX_SIZE
    with pytest.raises(RemoteProtocolError) as before:
        cose.decode_sign1(raw)  # what the wallet did before: the default limit
    assert before.value.code is ErrorCode.TOO_LARGE
    issued = world.open(raw, "withdraw", WithdrawAnswer, request=signed)
    assert len(issued.blind_sigs) == MAX_WITHDRAW_BATCH
    answer = await restore(world, restore_request([(world.keyset, b) for b in pending.request.blinded]))
    assert answer.found == tuple(range(MAX_WITHDRAW_BATCH)) and answer.blind_sigs == issued.blind_sigs


async def test_restore_over_the_broker(online: tuple[BankWorld, BankClient]) -> None:
    """A device's client publishes restore requests (the ACL's ops include it) and gets the answer."""
    world, client = online
    user = world.user("alice")
    pending = _withdrawal(world, user.name, world.keyset, MAX_WITHDRAW_BATCH)
    signed, raw = await send_withdrawal(world, user, pending.request)
    issued = world.open(raw, "withdraw", WithdrawAnswer, request=signed)
    data = restore_request([(world.keyset, b) for b in pending.request.blinded])
    answer = envelope.open_answer(await client.request("restore", data), world.keys.answer_key.public_key(),
                                  world.bank, "restore", RestoreAnswer, request=data)
    assert answer.found == tuple(range(MAX_WITHDRAW_BATCH)) and answer.blind_sigs == issued.blind_sigs


async def test_a_withdrawal_and_an_exchange_racing_for_one_message_never_both_sign_it(world: BankWorld) -> None:
    """A restored wallet replaying a counter sends, at once, a withdrawal and an exchange whose
    change holds the same blinded message. They lock different rows (the account, the coin) and
    record the message in different tables: each, looking before the other's commit, would find
    it unsigned, and the message would be paid for twice and give one coin. One of the two is
    ``replay`` (or, a race lost, retried into it), every time."""
    with exchanging(world) as keyset:
        user = world.user("alice")
        coins = await withdraw(world, user, keyset, 12)
        for wc in coins:
            pending = prepare(world, wc)
            slot = next(o for o in pending.request.change if world.keys.keyring.keysets[o.keyset].value == 64)
            bought = WithdrawRequest(account="alice", keyset=slot.keyset, blinded=(slot.blinded,),
                                     req_id=os.urandom(16))
            signed = user.sign(bought, "withdraw")
            by_withdrawal, by_exchange = await asyncio.gather(world.send("withdraw", signed), send(world, pending.data))
            outcomes = sorted([_outcome(world, "withdraw", WithdrawAnswer, by_withdrawal, signed),
                               _outcome(world, "exchange", ExchangeAnswer, by_exchange, pending.data)])
            assert outcomes == ["REPLAY", "signed"], outcomes


def _outcome(world: BankWorld, op: str, kind: type[WithdrawAnswer | ExchangeAnswer], raw: bytes, request: bytes) -> str:
    try:
        envelope.open_answer(raw, world.keys.answer_key.public_key(), world.bank, op, kind, request=request)
    except envelope.Refusal as refusal:
        return refusal.code.name
    return "signed"
