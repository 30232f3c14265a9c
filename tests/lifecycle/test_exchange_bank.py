"""The bank's exchange: value conserved to the minor unit, idempotent by the coin's tip, one winner
in a race with a block, and every refusal of a device with bad intent changing nothing."""

from __future__ import annotations

import asyncio
import dataclasses
import os

import pytest

from m2mpay.agents.bank import admin
from m2mpay.agents.bank.exchange import HashBudget
from m2mpay.agents.bank.keys import load_bank
from m2mpay.agents.bank.service import BankService
from m2mpay.protocol import cbor, envelope, sealing
from m2mpay.protocol.errors import ErrorCode
from m2mpay.protocol.messages import BlockAnswer
from m2mpay.protocol.messages.exchange import ExchangeProof, Output, exchange_sealing_info
from m2mpay.protocol.rules import wallet
from m2mpay.protocol.rules.phases import retire
from tests.bank_world import BankWorld

from .exchange_world import answer_of, books, exchange, exchanging, prepare, send, withdraw, with_change

pytestmark = pytest.mark.asyncio


async def _refused(world: BankWorld, data: bytes) -> ErrorCode:
    with pytest.raises(envelope.Refusal) as refusal:
        answer_of(world, await send(world, data), data)
    return refusal.value.code


async def test_exchange_takes_exactly_the_remainder_the_bank_saw(world: BankWorld) -> None:
    with exchanging(world) as keyset:
        user, vendor = world.user("alice"), world.vendor("meter")
        (wc,) = await withdraw(world, user, keyset)
        wc, session = await world.block(vendor, wc)
        wc, pay = wallet.reveal(wc, 4)
        session.pay(pay, world.clock.now)
        await world.settle(vendor, session)  # 5 credited, 95 left at the bank
        wc = wc.event(wallet.WalletEvent.CLOSED)
        written_ahead = dataclasses.replace(wc, status=wallet.CoinStatus.IN_SESSION)
        wc, _ = wallet.reveal(written_ahead, 3)  # tokens written ahead that never left
        assert wc.position == 92
        fresh = await exchange(world, wc)
        assert sorted(c.token_value * c.n for c in fresh) == [1, 2, 4, 8, 16, 64]  # 95, the bank's count
        assert sum(c.remaining for c in fresh) == 95
        report = world.audit()
        assert report.ok and (report.withdrawn, report.credited, report.outstanding) == (100, 5, 95)
        # The fresh coins pay: one is blocked and settled like any coin.
        big = next(c for c in fresh if c.n == 64)
        big, session = await world.block(vendor, big)
        assert (await world.settle(vendor, session)).credited == 1
        assert admin.audit(world.store).ok


async def test_a_retry_gets_the_same_bytes_and_another_request_is_refused(world: BankWorld) -> None:
    with exchanging(world) as keyset:
        (wc,) = await withdraw(world, world.user("alice"), keyset)
        pending = prepare(world, wc)
        first = await send(world, pending.data)
        assert answer_of(world, first, pending.data).position == 100
        state = books(world, wc.coin.tip)
        assert await send(world, pending.data) == first  # byte for byte
        other = prepare(world, wc)
        assert await _refused(world, other.data) is ErrorCode.COIN_SPENT
        same_id = dataclasses.replace(other.request, req_id=pending.request.req_id).encode()
        assert await _refused(world, same_id) is ErrorCode.REPLAY
        assert books(world, wc.coin.tip) == state


async def test_bad_intent_is_refused_and_changes_nothing(world: BankWorld) -> None:
    with exchanging(world) as keyset:
        user, vendor = world.user("alice"), world.vendor("meter")
        coins = await withdraw(world, user, keyset, 2)
        pending = prepare(world, coins[0])
        before = books(world, coins[0].coin.tip)
        other = prepare(world, coins[1])
        # Outputs swapped for the attacker's own under the victim's seal: the seal binds them.
        assert await _refused(world, with_change(pending, change=other.request.change)) is ErrorCode.BAD_SIGNATURE
        # A seal for another bank, or not opening at all.
        foreign = sealing.seal(ExchangeProof(tip=coins[0].coin.tip, token=coins[0].seed,
                                             outputs=pending.request.digest, req_id=pending.request.req_id).encode(),
                               world.keys.keyring.sealing_key, exchange_sealing_info("another-bank"))
        assert await _refused(world, with_change(pending, sealed=foreign)) is ErrorCode.BAD_SIGNATURE
        assert await _refused(world, with_change(pending, sealed=os.urandom(96))) is ErrorCode.BAD_SIGNATURE
        # Someone who saw the coin (a vendor it paid) but not its deepest preimage.
        guess = sealing.seal(ExchangeProof(tip=coins[0].coin.tip, token=os.urandom(32),
                                           outputs=pending.request.digest, req_id=pending.request.req_id).encode(),
                             world.keys.keyring.sealing_key, exchange_sealing_info(world.bank))
        assert await _refused(world, with_change(pending, sealed=guess)) is ErrorCode.CHAIN_MISMATCH
        # A blocked coin: the wallet waits for the block's deadline.
        await world.block(vendor, coins[1])
        blocked = books(world, coins[1].coin.tip)
        assert await _refused(world, other.data) is ErrorCode.COIN_BLOCKED
        assert books(world, coins[1].coin.tip) == blocked
        # Outputs in a keyset that no longer issues (retired).
        info = world.keys.keyring.keysets[pending.request.change[0].keyset]
        world.store.run_sync(lambda tx: tx.put_keyset_phase(retire(info, None, world.clock.now)))
        assert await _refused(world, pending.data) is ErrorCode.KEYSET_EXPIRED
        # Oversize: more outputs than a request may carry, or bytes past the limit.
        obj = pending.request.to_obj()
        obj["outputs"] = [Output(keyset=info.id, blinded=os.urandom(255) + b"\x01").to_obj(versioned=False)
                          for _ in range(65)]
        assert await _refused(world, cbor.encode(obj)) is ErrorCode.BAD_REQUEST
        assert await _refused(world, b"\xa0" + b"\x00" * (65 * 1024)) is ErrorCode.TOO_LARGE
        assert books(world, coins[0].coin.tip) == before


async def test_a_lapsed_block_is_credited_then_exchanged(world: BankWorld) -> None:
    with exchanging(world) as keyset:
        user, vendor = world.user("alice"), world.vendor("meter")
        (wc,) = await withdraw(world, user, keyset)
        wc, session = await world.block(vendor, wc)
        wc, pay = wallet.reveal(wc, 2)
        session.pay(pay, world.clock.now)  # the vendor holds 3 tokens it never settles
        world.clock.now += 700  # past the block's deadline
        fresh = await exchange(world, wc.expire(world.clock.now))
        assert sum(c.remaining for c in fresh) == 99  # the bank saw only the blocking token
        report = world.audit()
        assert report.ok and (report.withdrawn, report.credited, report.outstanding) == (100, 1, 99)
        late = session.settle_request(os.urandom(16), keep_open=False)
        signed = vendor.sign(late, "settle")
        with pytest.raises(envelope.Refusal) as refusal:
            world.open(await world.send("settle", signed), "settle", BlockAnswer, request=signed)
        assert refusal.value.code is ErrorCode.SESSION_CLOSED


@pytest.mark.parametrize("trials", [20, pytest.param(1000, marks=pytest.mark.heavy)])
async def test_exchange_and_block_race_one_winner(world: BankWorld, trials: int) -> None:
    with exchanging(world) as keyset:
        user, vendor = world.user("alice", deposit=100 * trials), world.vendor("meter")
        coins = await withdraw(world, user, keyset, trials)
        wins = {"exchange": 0, "block": 0}
        for wc in coins:
            pending = prepare(world, wc)
            _, _, block = world.session(vendor, wc)
            raw_exchange, raw_block = await asyncio.gather(send(world, pending.data), world.send("block", block))
            won = []
            try:
                answer_of(world, raw_exchange, pending.data)
                won.append("exchange")
            except envelope.Refusal as refusal:
                assert refusal.code is ErrorCode.COIN_BLOCKED
            try:
                world.open(raw_block, "block", BlockAnswer, request=block)
                won.append("block")
            except envelope.Refusal as refusal:
                assert refusal.code is ErrorCode.COIN_SPENT
            assert len(won) == 1, won
            wins[won[0]] += 1
        assert sum(wins.values()) == trials
        assert world.audit().ok


async def test_one_exchange_of_a_coin_at_a_time(world: BankWorld) -> None:
    """While one exchange of a coin is being decided, another of the same coin is refused at once
    (``unavailable``: not final, a retry gets the stored answer) without costing a chain check."""
    with exchanging(world) as keyset:
        (wc,) = await withdraw(world, world.user("alice"), keyset)
        pending, rival = prepare(world, wc), prepare(world, wc)
        steps = world.service.pipeline.handle("exchange", pending.data, world.clock.now)
        step = next(steps)  # the stored-exchange lookup
        step = steps.send(world.store.run_sync(step.fn))  # now deciding under the coin's lock
        assert await _refused(world, rival.data) is ErrorCode.UNAVAILABLE
        try:
            while True:
                step = steps.send(world.store.run_sync(step.fn))
        except StopIteration as done:
            reply = done.value
        assert answer_of(world, reply.answer, pending.data).position == 100
        assert await _refused(world, rival.data) is ErrorCode.COIN_SPENT  # the first one won
        assert await send(world, pending.data) == reply.answer


async def test_one_exchange_sent_to_two_bank_processes_at_once_gets_one_answer_in_both(world: BankWorld) -> None:
    """A device's retry, or the broker's redelivery, reaches a second bank process while the first
    decides: the second must answer with the first's exchange, never refuse it as a replay of its
    own messages (``replay`` is final: the wallet would drop the exchange it wrote ahead while the
    bank has spent the coin)."""
    with exchanging(world) as keyset:
        other = BankService(world.keys, load_bank(world.directory / "bank", world.clock.now, connections=4)[1],
                            clock=world.clock)  # a second process: its own store and its own state
        try:
            coins = await withdraw(world, world.user("alice"), keyset, 12)
            for wc in coins:
                pending = prepare(world, wc)
                first, second = await asyncio.gather(send(world, pending.data),
                                                     other.handle("exchange", pending.data))
                assert first == second
                assert answer_of(world, first, pending.data).position == 100
        finally:
            other.store.close()


async def test_exchanges_with_wrong_tokens_spend_at_most_the_hash_budget(world: BankWorld) -> None:
    """Anyone who saw a coin (a vendor it paid) can send exchanges of it with guessed tokens, each
    costing the bank up to ``n`` hashes (~30 ms at 2^16) and naming nobody to refuse. Each bank
    process spends at most a budget of hashes a second on exchanges: past it an exchange is refused
    with ``unavailable`` (not final) before its chain is checked. A request that fails the cheaper
    checks first (the coin's signature) costs the budget nothing."""
    with exchanging(world) as keyset:
        coins = await withdraw(world, world.user("alice"), keyset, 2)
        n = world.keys.keyring.keysets[keyset].n
        context = world.service.pipeline.context
        context.exchange_budget = HashBudget(rate=n, burst=2 * n)  # two coins' chains, one a second
        pending = prepare(world, coins[0])
        guess = sealing.seal(ExchangeProof(tip=coins[0].coin.tip, token=os.urandom(32),
                                           outputs=pending.request.digest, req_id=pending.request.req_id).encode(),
                             world.keys.keyring.sealing_key, exchange_sealing_info(world.bank))
        guessed = with_change(pending, sealed=guess)
        forged = with_change(pending, coin=dataclasses.replace(pending.request.coin, sig=os.urandom(256)))
        before = books(world, coins[0].coin.tip)
        for _ in range(5):
            assert await _refused(world, forged) is ErrorCode.BAD_SIGNATURE  # free: no chain checked
        assert await _refused(world, guessed) is ErrorCode.CHAIN_MISMATCH
        assert await _refused(world, guessed) is ErrorCode.CHAIN_MISMATCH
        with pytest.raises(envelope.Refusal) as refusal:
            answer_of(world, await send(world, guessed), guessed)
        assert refusal.value.code is ErrorCode.UNAVAILABLE and not refusal.value.final
        # The coin's owner waits too, as long as the budget is spent; then it is served.
        assert await _refused(world, pending.data) is ErrorCode.UNAVAILABLE
        assert books(world, coins[0].coin.tip) == before
        world.clock.now += 1
        assert answer_of(world, await send(world, pending.data), pending.data).position == n
