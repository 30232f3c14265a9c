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

from m2mpay.agents.bank import admin
from m2mpay.agents.bank.server import serve
from m2mpay.agents.mqtt import BankClient
from m2mpay.agents.policy.config import PolicyConfig
from m2mpay.agents.user.agent import PolicyRefusal, UserAgent, UserCredentials
from m2mpay.agents.vendor.config import Pricing, SessionPolicy, VendorConfig
from m2mpay.agents.vendor.server import load_credentials, run_vendor
from m2mpay.broker.launcher import free_udp_port
from m2mpay.protocol import cbor, envelope, sealing, wire
from m2mpay.protocol.certificates import cert_hash
from m2mpay.protocol.errors import ErrorCode
from m2mpay.protocol.messages import Offer, OpenSession, SessionOpened
from m2mpay.protocol.rules import wallet

from tests.bank_world import BankWorld

pytestmark = [pytest.mark.asyncio, pytest.mark.network]


@pytest_asyncio.fixture
async def town(world: BankWorld, mosquitto: str, tmp_path: Path) -> AsyncIterator[dict[str, str]]:
    """A bank and two vendors (parking at 1 a unit, charging at 3; tokens of 1), serving."""
    tasks = []
    ready = asyncio.Event()
    tasks.append(asyncio.create_task(serve(world.keys, world.service, mosquitto, ready=ready)))
    await asyncio.wait_for(ready.wait(), 10)
    urls = {}
    for name, category, price in (("parking", "parking", 1), ("charger", "ev", 3)):
        world.vendor(name, category)
        port, up = free_udp_port(), asyncio.Event()
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
        async with BankClient(town["broker"], world.bank, f"alice-{uuid.uuid4().hex[:6]}") as bank:
            (coin,) = await user.withdraw(bank, credentials, 1)
        assert coin.remaining == 100 and admin.balance(world.store, "alice") == 10_000 - 100

        first = await user.pay(ctx, town["parking"], 30)  # 1 a unit: 30 tokens, the blocking one the first
        assert (first.vendor, first.tokens, first.credited) == ("parking", 30, 30)
        second = await user.pay(ctx, town["charger"], 20)  # 3 a unit
        assert (second.vendor, second.tokens, second.credited) == ("charger", 60, 60)
        (wc,) = [w for w, _ in user.store.coins()]
        assert wc.position == 100 - 30 - 60  # the remainder of one coin carried to vendor B
        assert admin.balance(world.store, "parking") == 30 and admin.balance(world.store, "charger") == 60
        with pytest.raises(PolicyRefusal) as capped:
            await user.pay(ctx, town["charger"], 30)  # 90 is over the cap of 80 per session
        assert capped.value.decision.reason == "session_cap"
        assert "seed" not in json.dumps(user.public_coins())
        user.close()  # one process (here: one agent) holds a wallet at a time

        strict = UserAgent(tmp_path / "wallet", PolicyConfig.from_dict({"price": {"max_per_unit": 2}}),
                           clock=world.clock)
        before = [w for w, _ in strict.store.coins()]
        with pytest.raises(PolicyRefusal) as refused:
            await strict.pay(ctx, town["charger"], 1)  # 3 per unit is above 2
        assert refused.value.decision.reason == "price_too_high"
        assert [w for w, _ in strict.store.coins()] == before  # wallet unchanged
        strict.close()
        no_ev = UserAgent(tmp_path / "wallet", PolicyConfig.from_dict({"categories": {"deny": ["ev"]}}),
                          clock=world.clock)
        with pytest.raises(PolicyRefusal) as denied:
            await no_ev.pay(ctx, town["charger"], 1)
        assert denied.value.decision.reason == "category_denied"
        assert [w for w, _ in no_ev.store.coins()] == before
        no_ev.close()
        log = [json.loads(line) for line in (tmp_path / "wallet" / "decisions.jsonl").read_text().splitlines()]
        assert [e["reason"] for e in log[-2:]] == ["price_too_high", "category_denied"]
        assert any(entry["reason"] == "session_cap" for entry in log)
    finally:
        await ctx.shutdown()
        user.close()
    assert world.audit().ok


async def _offer(ctx: aiocoap.Context, base: str) -> Offer:
    response = await ctx.request(aiocoap.Message(code=aiocoap.GET, uri=wire.uri(base, wire.OFFER_PATH))).response
    return Offer.decode(response.payload)


async def _open(ctx: aiocoap.Context, base: str, body: bytes) -> tuple[str, dict[str, object]]:
    message = aiocoap.Message(code=aiocoap.POST, uri=wire.uri(base, wire.SESSIONS_PATH), payload=body)
    message.opt.content_format = wire.CONTENT_FORMAT_CBOR
    response = await ctx.request(message).response
    return str(response.code), cbor.decode(response.payload)


def _authorize(world: BankWorld, wc: wallet.WalletCoin, offer: Offer) -> bytes:
    _, auth = wallet.authorize(wc, deadline=offer.deadline, nonce=offer.nonce, cert_hash=cert_hash(offer.cert),
                               now=world.clock.now)  # the cheat keeps the *old* state: the same token twice
    sealed = sealing.seal(auth.encode(), world.keys.keyring.sealing_key, sealing.info_for_bank(world.bank))
    return OpenSession(coin=wc.coin, sealed=sealed, deadline=offer.deadline, nonce=offer.nonce).encode()


async def test_malicious_user_is_stopped_by_the_bank(world: BankWorld, town: dict[str, str]) -> None:
    (wc,) = await world.withdraw(world.user("mallory"))
    ctx = await aiocoap.Context.create_client_context()
    try:
        offers = [await _offer(ctx, town["parking"]), await _offer(ctx, town["charger"])]
        bodies = [_authorize(world, wc, offer) for offer in offers]
        answers = await asyncio.gather(_open(ctx, town["parking"], bodies[0]), _open(ctx, town["charger"], bodies[1]))
        codes = sorted(code for code, _ in answers)
        assert codes[0].startswith("2.01") and codes[1].startswith("4.09"), answers  # one block, one refusal
        (refusal,) = (body for code, body in answers if code.startswith("4.09"))
        assert refusal["code"] == "coin_blocked"  # the other vendor holds the block
        # later, once the first session is over: an old authorization is worth nothing
        winner = town["parking"] if answers[0][0].startswith("2.01") else town["charger"]
        session = SessionOpened.decode(cbor.encode(next(b for c, b in answers if c.startswith("2.01"))))
        close = aiocoap.Message(code=aiocoap.POST, uri=wire.uri(winner, wire.session_path(session.session, wire.CLOSE)))
        assert str((await ctx.request(close).response).code).startswith("2.04")
        code, body = await _open(ctx, town["charger"], _authorize(world, wc, await _offer(ctx, town["charger"])))
        assert code.startswith("4.09") and body["code"] == "replay"
    finally:
        await ctx.shutdown()
    assert world.audit().ok


async def test_autonomous_agent_refills_and_takes_the_cheapest_allowed_offer(
        world: BankWorld, town: dict[str, str], tmp_path: Path) -> None:
    from m2mpay.agents.user.run import RunConfig, run_user

    config = RunConfig(wallet=tmp_path / "auto", credentials=tmp_path / "alice.json", broker=town["broker"],
                       vendors=(town["charger"], town["parking"], "coap://[::1]:9"), units=5, rounds=2, interval=0.1,
                       policy=PolicyConfig.from_dict({"refill": {"below": 50, "coins": 1, "daily_cap": 1000},
                                                      "categories": {"deny": ["ev"]}}))
    payments = await run_user(config, clock=world.clock)
    assert [p.vendor for p in payments] == ["parking", "parking"]  # ev denied; parking is also the cheapest
    assert [p.credited for p in payments] == [5, 5]  # 5 units at 1: 5 tokens of 1
    log = [json.loads(line) for line in (tmp_path / "auto" / "decisions.jsonl").read_text().splitlines()]
    refills = [entry for entry in log if entry["action"] == "refill"]
    assert refills[0]["reason"] == "refill" and refills[1]["reason"] == "enough_value"
    assert admin.balance(world.store, "alice") == 10_000 - 100


async def test_refused_withdrawal_is_final_and_does_not_block_the_wallet(world: BankWorld, mosquitto: str,
                                                                         tmp_path: Path) -> None:
    """The bank keeps its refusals: a wallet that resent a refused withdrawal would be refused forever."""
    ready = asyncio.Event()
    task = asyncio.create_task(serve(world.keys, world.service, mosquitto, ready=ready))
    try:
        await asyncio.wait_for(ready.wait(), 10)
        world.user("bob", deposit=50)
        user = UserAgent(tmp_path / "wallet", PolicyConfig.from_dict({}), clock=world.clock)
        credentials = UserCredentials.load(tmp_path / "bob.json")
        async with BankClient(mosquitto, world.bank, f"bob-{uuid.uuid4().hex[:6]}") as bank:
            with pytest.raises(envelope.Refusal) as refused:
                await user.withdraw(bank, credentials, 1)  # a coin is worth 100
            assert refused.value.code is ErrorCode.INSUFFICIENT_FUNDS
            assert user.store.pending_withdrawals() == []  # forgotten, secrets and all
            admin.deposit(world.store, "bob", 100, world.clock.now)
            (coin,) = await user.withdraw(bank, credentials, 1)
        assert coin.remaining == 100 and admin.balance(world.store, "bob") == 50
        user.close()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
