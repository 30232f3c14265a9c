"""The wallet against vendors that misbehave: every token counted, every payment bounded.

Each test is named after the finding it pins down; the vendors are the real vendor with one
behaviour changed (:mod:`tests.user.hostile`), on real CoAP sockets, with a real bank behind them.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import aiocoap
import pytest

from m2mpay.agents.bank import admin
from m2mpay.agents.policy.config import PolicyConfig
from m2mpay.agents.user.agent import PolicyRefusal, UserAgent
from m2mpay.agents.user.outcome import Stop
from m2mpay.protocol.errors import ProtocolError
from m2mpay.protocol.rules import wallet

from tests.bank_world import BankWorld
from .hostile import Misbehaviour, hostile_vendor
from .withdrawals import withdraw_coins

pytestmark = [pytest.mark.asyncio, pytest.mark.network]


async def test_tokens_without_receipt_counted_against_budget(served: BankWorld, mosquitto: str,
                                                             ctx: aiocoap.Context, tmp_path: Path) -> None:
    """A vendor keeps every token and answers 4.00: the wallet counts what left, and the budget holds."""
    user = UserAgent(tmp_path / "wallet", PolicyConfig.from_dict({"budget": {"per_hour": 20}}),
                     clock=served.clock)
    try:
        await withdraw_coins(served, mosquitto, user, "alice", 12)
        async with hostile_vendor(served, mosquitto, "grabber", Misbehaviour.KEEPS_TOKENS) as vendor:
            refusals = []
            for _ in range(15):
                try:
                    await user.pay(ctx, vendor.url, 5)
                except PolicyRefusal as refusal:
                    refusals.append(refusal.decision.reason)
                    break
                except ProtocolError:
                    continue
            left = sum(wc.remaining for wc, _ in user.store.coins())
            gone = 12 * 100 - left  # what left the wallet, by the coins' positions
            recorded = sum(spend.amount for spend in user.spending())
            kept = vendor.kept()
            assert (kept, recorded) == (gone, gone), f"vendor kept {kept}, wallet recorded {recorded}, gone {gone}"
            assert kept <= 20 and refusals == ["hourly_budget"], (kept, refusals)
    finally:
        user.close()


async def test_vendor_asking_nothing_is_closed_by_deadline(served: BankWorld, mosquitto: str,
                                                           ctx: aiocoap.Context, tmp_path: Path) -> None:
    """``Due(tokens=0)`` forever: the payment ends at its policy's deadline (or idle limit) and closes."""
    user = UserAgent(tmp_path / "wallet", PolicyConfig.from_dict({"session": {"max_duration": 2}}),
                     clock=served.clock)
    try:
        await withdraw_coins(served, mosquitto, user, "alice", 1)
        async with hostile_vendor(served, mosquitto, "staller", Misbehaviour.ASKS_NOTHING) as vendor:
            started = time.monotonic()
            result = await user.pay(ctx, vendor.url, 5)
            took = time.monotonic() - started
            assert result.stop is Stop.DEADLINE and (result.delivered, result.tokens) == (1, 1), result
            assert 1.5 < took < 10, took
            ((wc, _),) = user.store.coins()
            assert wc.status is wallet.CoinStatus.READY and result.credited == 1  # closed, not stuck in session
            user.close()

            user = UserAgent(tmp_path / "wallet", PolicyConfig.from_dict(
                {"session": {"max_duration": 60, "max_idle": 1}}), clock=served.clock)
            started = time.monotonic()
            result = await user.pay(ctx, vendor.url, 5)
            assert result.stop is Stop.VENDOR_IDLE and time.monotonic() - started < 10, result
            ((wc, _),) = user.store.coins()
            assert wc.status is wallet.CoinStatus.READY and wc.position == 98
    finally:
        user.close()


async def test_unresponsive_vendor_does_not_end_user_run(served: BankWorld, mosquitto: str, tmp_path: Path) -> None:
    """A vendor that never answers a token: each payment ends at its deadline, logged; the loop goes on."""
    from m2mpay.agents.user.run import RunConfig, run_user

    served.user("alice")
    async with hostile_vendor(served, mosquitto, "mute", Misbehaviour.SILENT_PAY) as vendor:
        config = RunConfig(wallet=tmp_path / "auto", credentials=tmp_path / "alice.json", broker=mosquitto,
                           vendors=(vendor.url,), units=3, rounds=2, interval=0.1,
                           policy=PolicyConfig.from_dict({"refill": {"below": 50, "coins": 1, "daily_cap": 1000},
                                                          "session": {"max_duration": 2}}))
        started = time.monotonic()
        payments = await asyncio.wait_for(run_user(config, clock=served.clock), 30)
        assert time.monotonic() - started < 20
    assert [p.stop for p in payments] == [Stop.DEADLINE, Stop.DEADLINE], payments
    assert all(p.delivered == 1 and p.credited is not None for p in payments)  # the blocking token's unit
    log = [json.loads(line) for line in (tmp_path / "auto" / "decisions.jsonl").read_text().splitlines()]
    assert [e["reason"] for e in log if e["action"] == "close"] == ["deadline", "deadline"]


async def test_policy_counts_money_of_the_coin_used(served: BankWorld, mosquitto: str, ctx: aiocoap.Context,
                                                    tmp_path: Path) -> None:
    """The vendor accepts keysets whose tokens are worth 1 and 10; the wallet pays with a 10: it counts 10s."""
    policy = PolicyConfig.from_dict({"price": {"max_per_unit": 10}, "budget": {"per_session": 30}})
    # 10 a unit: a unit is one token of 10
    user = UserAgent(tmp_path / "wallet", policy, clock=served.clock)
    try:
        (coin,) = await withdraw_coins(served, mosquitto, user, "alice", 1, value=1000)
        assert coin.token_value == 10
        async with hostile_vendor(served, mosquitto, "meter", Misbehaviour.NONE, price=10) as vendor:
            with pytest.raises(PolicyRefusal) as refused:
                await user.pay(ctx, vendor.url, 11)  # 11 tokens of 10: 110 > 30 a session
            assert refused.value.decision.reason == "session_cap"
            assert admin.balance(served.store, "meter") == 0 and vendor.kept() == 0
            result = await user.pay(ctx, vendor.url, 3)  # 3 tokens of 10
            assert (result.tokens, result.spent, result.credited) == (3, 30, 30)
        assert admin.balance(served.store, "meter") == 30
        assert sum(spend.amount for spend in user.spending()) == 30
        log = [json.loads(line) for line in (tmp_path / "wallet" / "decisions.jsonl").read_text().splitlines()]
        assert any(e["reason"] == "session_cap" and e["total"] == 110 for e in log)
    finally:
        user.close()


async def test_default_policy_when_none_given(served: BankWorld, mosquitto: str, ctx: aiocoap.Context,
                                              tmp_path: Path) -> None:
    """No policy given: the conservative default applies (50 a unit is above its ceiling of 10)."""
    user = UserAgent(tmp_path / "wallet", clock=served.clock)
    try:
        await withdraw_coins(served, mosquitto, user, "alice", 1)
        async with hostile_vendor(served, mosquitto, "pricey", Misbehaviour.NONE, price=50) as vendor:
            with pytest.raises(PolicyRefusal) as refused:
                await user.pay(ctx, vendor.url, 1)
            assert refused.value.decision.reason == "price_too_high"
            assert vendor.kept() == 0
        ((wc, _),) = user.store.coins()
        assert wc.position == 100
    finally:
        user.close()


async def test_torn_spending_history_does_not_stop_payments(served: BankWorld, mosquitto: str,
                                                            ctx: aiocoap.Context, tmp_path: Path) -> None:
    """A wallet whose old ``spending.jsonl`` ends in a torn line still pays, and its history still counts."""
    directory = tmp_path / "wallet"
    directory.mkdir()
    (directory / "spending.jsonl").write_text(
        json.dumps({"ts": served.clock.now - 60, "vendor": "meter", "category": "parking", "amount": 191})
        + '\n{"ts": 18000')
    user = UserAgent(directory, PolicyConfig.from_dict({"budget": {"per_hour": 200}}), clock=served.clock)
    try:
        await withdraw_coins(served, mosquitto, user, "alice", 1)
        async with hostile_vendor(served, mosquitto, "meter", Misbehaviour.NONE) as vendor:
            first = await user.pay(ctx, vendor.url, 5)  # 191 + 5 <= 200
            assert first.stop is Stop.COMPLETE and first.tokens == 5
            with pytest.raises(PolicyRefusal) as refused:
                await user.pay(ctx, vendor.url, 5)  # 196 + 5 > 200: the imported history counts
            assert refused.value.decision.reason == "hourly_budget"
        assert sum(spend.amount for spend in user.spending()) == 196
    finally:
        user.close()
