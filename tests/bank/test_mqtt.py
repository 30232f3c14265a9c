"""The bank over a real Mosquitto: the client code devices use, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from m2mpay.agents.bank import admin
from m2mpay.agents.bank.server import serve
from m2mpay.agents.mqtt import BankClient, broker_address
from m2mpay.broker.launcher import Mosquitto
from m2mpay.protocol import wire
from m2mpay.protocol.certificates import verify_announcement
from m2mpay.protocol.errors import ErrorCode, RemoteProtocolError
from m2mpay.protocol.messages import BlockAnswer, WithdrawAnswer
from m2mpay.protocol.rules import wallet

from tests.bank_world import BankWorld
from tests.waiting import wait_until_async

pytestmark = [pytest.mark.asyncio, pytest.mark.network]


async def test_keys_announcement_is_retained_and_signed(online: tuple[BankWorld, BankClient]) -> None:
    world, client = online
    announcement = verify_announcement(await client.keys(), world.keys.fingerprint, world.clock.now)
    assert announcement.bank == world.bank and {k.id for k in announcement.keysets} == set(world.keys.keyring.keysets)
    with pytest.raises(RemoteProtocolError):
        verify_announcement(await client.keys(), "00" * 32, world.clock.now)  # another CA


async def test_withdraw_block_settle_checkpoint_lapse_status(online: tuple[BankWorld, BankClient]) -> None:
    world, _ = online
    user, vendor = world.user("alice"), world.vendor("meter")
    coins = await world.withdraw(user, 2)
    wc, session = await world.block(vendor, coins[0])
    wc, pay = wallet.reveal(wc, 5)
    session.pay(pay, world.clock.now)
    assert (await world.settle(vendor, session, keep_open=True)).credited == 6
    wc, pay = wallet.reveal(wc, 3)
    session.pay(pay, world.clock.now)
    assert (await world.settle(vendor, session)).credited == 3
    _, _ = await world.block(vendor, coins[1])
    world.clock.now += 601  # the second session's deadline passes: the sweep credits the blocking token
    await wait_until_async(lambda: admin.balance(world.store, "meter") == 10, timeout=5,
                           what="the sweep credits the lapsed session's blocking token")
    assert world.audit().ok


async def test_same_coin_two_vendors_100_times(online: tuple[BankWorld, BankClient], mosquitto: str) -> None:
    world, client = online
    user = world.user("alice", deposit=1_000_000)
    first, second = world.vendor("first"), world.vendor("second")
    coins = await world.withdraw(user, 50) + await world.withdraw(user, 50)
    async with BankClient(mosquitto, world.keys.bank, f"dev-{uuid.uuid4().hex[:8]}") as other:
        for wc in coins:
            _, _, a = world.session(first, wc)
            _, _, b = world.session(second, wc)
            answers = await asyncio.gather(client.request("block", a), other.request("block", b))
            won = 0
            for request, raw in zip((a, b), answers, strict=True):
                try:
                    world.open(raw, "block", BlockAnswer, request=request)
                    won += 1
                except RemoteProtocolError as exc:
                    assert exc.code is ErrorCode.COIN_BLOCKED
            assert won == 1


async def test_lost_answer_retry_debits_once(online: tuple[BankWorld, BankClient]) -> None:
    """A withdraw whose answer was lost is sent again with the same bytes: one debit."""
    world, client = online
    user = world.user("alice")
    info = world.keys.keyring.keysets[world.keyset]
    pending = wallet.prepare_withdrawal("alice", info, world.keys.keyring.rsa_keys[world.keyset], 3)
    data = user.sign(pending.request, "withdraw")
    host, port = broker_address(client.url)
    lossy = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="lossy", protocol=mqtt.MQTTv5)
    lossy.connect(host, port)
    lossy.loop_start()
    try:  # a request whose answer goes to a topic nobody reads: the answer is lost
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = wire.response_topic(world.bank, "gone")
        props.CorrelationData = os.urandom(8)
        lossy.publish(wire.request_topic(world.bank, "withdraw"), data, qos=1, properties=props).wait_for_publish(5)
    finally:
        lossy.loop_stop()
        lossy.disconnect()
    await wait_until_async(lambda: admin.balance(world.store, "alice") != 10_000, timeout=5,
                           what="the bank has carried out the withdrawal whose answer was lost")
    answer = world.open(await client.request("withdraw", data), "withdraw", WithdrawAnswer, request=data)
    assert isinstance(answer, WithdrawAnswer) and answer.balance == 10_000 - 300
    assert len(answer.blind_sigs) == 3 and admin.balance(world.store, "alice") == 10_000 - 300


async def test_request_without_response_topic_is_dropped_and_bank_keeps_serving(
        online: tuple[BankWorld, BankClient]) -> None:
    world, client = online
    host, port = broker_address(client.url)
    raw = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="raw", protocol=mqtt.MQTTv5)
    raw.connect(host, port)
    raw.loop_start()
    for payload in (b"garbage", b"\xff" * 10, os.urandom(100_000)):
        raw.publish(wire.request_topic(world.bank, "block"), payload, qos=1).wait_for_publish(5)
    raw.loop_stop()
    raw.disconnect()
    # the service still answers, and garbage with a Response Topic gets a signed refusal
    with pytest.raises(RemoteProtocolError) as info:
        world.open(await client.request("block", b"garbage"), "block", BlockAnswer, request=b"garbage")
    assert info.value.code is ErrorCode.BAD_REQUEST
    (coin,) = await world.withdraw(world.user("alice"))
    assert coin.remaining == 100


async def test_settlement_delivered_twice_over_mqtt_credits_once(online: tuple[BankWorld, BankClient]) -> None:
    world, client = online
    user, vendor = world.user("alice"), world.vendor("meter")
    (wc,) = await world.withdraw(user)
    wc, session = await world.block(vendor, wc)
    wc, pay = wallet.reveal(wc, 7)
    session.pay(pay, world.clock.now)
    signed = vendor.sign(session.settle_request(os.urandom(16), keep_open=False), "settle")
    first, second = await asyncio.gather(client.request("settle", signed), client.request("settle", signed))
    assert first == second and admin.balance(world.store, "meter") == 8


async def test_broker_restart_bank_and_device_reconnect(world: BankWorld, tmp_path: Path) -> None:
    """Mosquitto goes away and comes back on the same port: nothing to do but wait."""
    broker = Mosquitto(tmp_path / "mq").start()
    ready = asyncio.Event()
    task = asyncio.create_task(serve(world.keys, world.service, broker.url, ready=ready, sweep_interval=60))
    try:
        await asyncio.wait_for(ready.wait(), 10)
        async with BankClient(broker.url, world.bank, f"dev-{uuid.uuid4().hex[:8]}", timeout=3, retries=5) as client:
            world.send = client.request
            user = world.user("alice")
            await world.withdraw(user)
            await asyncio.to_thread(broker.stop)
            await asyncio.to_thread(broker.start)  # same port, same persistence
            (coin,) = await world.withdraw(user)  # waits for both sides to reconnect, then succeeds
            assert coin.remaining == 100 and admin.balance(world.store, "alice") == 10_000 - 200
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        broker.stop()


async def test_prometheus_metrics(world: BankWorld, mosquitto: str) -> None:
    from m2mpay.broker.launcher import free_port

    port = free_port()
    ready = asyncio.Event()
    task = asyncio.create_task(serve(world.keys, world.service, mosquitto, ready=ready, metrics_port=port))
    try:
        await asyncio.wait_for(ready.wait(), 10)
        async with BankClient(mosquitto, world.bank, f"dev-{uuid.uuid4().hex[:8]}") as client:
            world.send = client.request
            user, vendor = world.user("alice"), world.vendor("meter")
            (wc,) = await world.withdraw(user)
            await world.block(vendor, wc)
            await client.request("block", b"garbage")

        async def scrape(path: str) -> str:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            data = await reader.read()
            writer.close()
            return data.decode()

        text = await scrape("/metrics")
        assert text.startswith("HTTP/1.1 200 OK")
        assert 'm2mpay_bank_requests_total{op="withdraw",result="ok"} 1' in text
        assert 'm2mpay_bank_requests_total{op="block",result="ok"} 1' in text
        assert 'm2mpay_bank_requests_total{op="block",result="bad_request"} 1' in text
        assert "m2mpay_bank_open_blocks 1" in text
        assert 'm2mpay_bank_journal_total{kind="withdraw"} 100' in text
        assert 'm2mpay_bank_request_seconds_count{op="block"} 2' in text
        if world.store.dialect == "postgresql":  # the block took the fast road, in a transaction
            assert "m2mpay_bank_db_requests_total 1" in text and "m2mpay_bank_db_transactions_total 1" in text
        else:
            assert "m2mpay_bank_db_" not in text
        assert (await scrape("/secret")).startswith("HTTP/1.1 404")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
