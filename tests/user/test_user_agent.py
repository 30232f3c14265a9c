"""The user agent against a real bank, Mosquitto and two vendors: withdraw, pay, carry the rest on."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiocoap
import pytest
import pytest_asyncio

from agents.bank import admin
from agents.bank.server import serve
from agents.mqtt import BankClient
from agents.policy.config import PolicyConfig
from agents.user.agent import PolicyRefusal, UserAgent, UserCredentials
from agents.vendor.config import Pricing, SessionPolicy, VendorConfig
from agents.vendor.server import load_credentials, run_vendor

from ..bank.conftest import BANK, BankWorld
from ..vendor.test_coap_payment import _free_udp_port

pytestmark = [pytest.mark.asyncio, pytest.mark.network]


@pytest_asyncio.fixture
async def town(world: BankWorld, mosquitto: str, tmp_path: Path) -> AsyncIterator[dict[str, str]]:
    """A bank and two vendors (parking at 1 token per unit, charging at 3), serving."""
    tasks = []
    ready = asyncio.Event()
    tasks.append(asyncio.create_task(serve(world.keys, world.service, mosquitto, ready=ready)))
    await asyncio.wait_for(ready.wait(), 10)
    urls = {}
    for name, category, price in (("parking", "parking", 1), ("charger", "ev", 3)):
        world.vendor(name, category)
        port, up = _free_udp_port(), asyncio.Event()
        config = VendorConfig(pricing=Pricing(service=name, unit="unit", price=price, meter_interval=0.02),
                              session=SessionPolicy(block_window=600, idle_timeout=600))
        tasks.append(asyncio.create_task(run_vendor(load_credentials(tmp_path / f"{name}.json"), mosquitto, port,
                                                    tmp_path / name, config, ready=up, clock=world.clock)))
        await asyncio.wait_for(up.wait(), 10)
        urls[name] = f"coap://[::1]:{port}"
    world.user("alice")
    urls["broker"] = mosquitto
    try:
        yield urls
    finally:
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def test_withdraw_pay_carry_remainder_and_refuse_by_policy(world: BankWorld, town: dict[str, str],
                                                                 tmp_path: Path) -> None:
    policy = PolicyConfig.from_dict({"price": {"max_per_unit": 5}, "budget": {"per_session": 80}})
    user = UserAgent(tmp_path / "wallet", policy, clock=world.clock)
    credentials = UserCredentials.load(tmp_path / "alice.json")
    ctx = await aiocoap.Context.create_client_context()
    try:
        async with BankClient(town["broker"], BANK, f"alice-{uuid.uuid4().hex[:6]}") as bank:
            (coin,) = await user.withdraw(bank, credentials, 1)
        assert coin.remaining == 100 and admin.balance(world.store, "alice") == 10_000 - 100

        first = await user.pay(ctx, town["parking"], 30)  # 1 token per unit: 30 + the blocking token
        assert (first.vendor, first.tokens, first.credited) == ("parking", 31, 31)
        second = await user.pay(ctx, town["charger"], 20)  # 3 tokens per unit
        assert (second.vendor, second.tokens, second.credited) == ("charger", 61, 61)
        (wc,) = [w for w, _ in user.store.coins()]
        assert wc.position == 100 - 31 - 61  # the remainder of one coin carried to vendor B
        assert admin.balance(world.store, "parking") == 31 and admin.balance(world.store, "charger") == 61
        with pytest.raises(PolicyRefusal) as capped:
            await user.pay(ctx, town["charger"], 30)  # 90 is over the cap of 80 per session
        assert capped.value.decision.reason == "session_cap"

        strict = UserAgent(tmp_path / "wallet", PolicyConfig.from_dict({"price": {"max_per_unit": 2}}),
                           clock=world.clock)
        before = [w for w, _ in strict.store.coins()]
        with pytest.raises(PolicyRefusal) as refused:
            await strict.pay(ctx, town["charger"], 1)  # 3 per unit is above 2
        assert refused.value.decision.reason == "price_too_high"
        assert [w for w, _ in strict.store.coins()] == before  # wallet unchanged
        strict.close()
        log = [json.loads(line) for line in (tmp_path / "wallet" / "decisions.jsonl").read_text().splitlines()]
        assert log[-1]["reason"] == "price_too_high" and not log[-1]["allowed"]
        assert any(entry["reason"] == "session_cap" for entry in log)
        assert "seed" not in json.dumps(user.public_coins())
    finally:
        await ctx.shutdown()
        user.close()
    assert world.audit().ok
