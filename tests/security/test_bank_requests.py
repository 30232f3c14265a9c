"""Findings about the bank's request handling, as a device with bad intent would meet them.

- Critical: one PUBLISH whose Response Topic is a wildcard stopped ``bank serve``.
- Answers went to whatever reply topic a request named, even another device's.
- A retried block was checked against the clock before its stored answer was looked up.
- ``status`` told any vendor any coin's position and other vendors' deadlines.
- Signed refusals were not bound to the request they refuse.
- Metrics labels took the peer-chosen operation name.
- A checkpoint that credits nothing stored one more answer per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
import pytest_asyncio
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from m2mpay.agents.bank import admin
from m2mpay.agents.bank.keys import load_bank, retire_keyset
from m2mpay.agents.bank.metrics import BankMetrics
from m2mpay.agents.bank.postgresql import PgEngine
from m2mpay.agents.bank.server import serve
from m2mpay.agents.bank.service import BankService, Reply
from m2mpay.agents.mqtt import BankClient, broker_address
from m2mpay.protocol import envelope, wire
from m2mpay.protocol.certificates import verify_announcement
from m2mpay.protocol.errors import ErrorCode, RemoteProtocolError
from m2mpay.protocol.messages import BlockAnswer, SettleAnswer, StatusAnswer, StatusRequest, WithdrawAnswer
from m2mpay.protocol.rules import wallet
from tests.bank_world import BankWorld
from tests.waiting import wait_until

pytestmark = pytest.mark.asyncio


@dataclass
class Served:
    world: BankWorld
    client: BankClient
    task: asyncio.Task[None]
    url: str


@pytest_asyncio.fixture
async def served(world: BankWorld, mosquitto: str) -> AsyncIterator[Served]:
    """The world's bank served over the session's Mosquitto; requests go through the broker."""
    ready = asyncio.Event()
    task = asyncio.create_task(serve(world.keys, world.service, mosquitto, sweep_interval=None, ready=ready))
    try:
        async with asyncio.timeout(10):
            await ready.wait()
        async with BankClient(mosquitto, world.bank, f"dev-{uuid.uuid4().hex[:8]}", timeout=2, retries=2) as client:
            world.send = client.request
            yield Served(world, client, task, mosquitto)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@dataclass
class RawDevice:
    """A plain paho client: publishes whatever it likes and records what reaches its topics."""

    url: str
    bank: str
    received: dict[str, list[bytes]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        host, port = broker_address(self.url)
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"raw-{uuid.uuid4().hex[:8]}",
                                  protocol=mqtt.MQTTv5)
        self.client.on_message = lambda _c, _u, m: self.received.setdefault(m.topic, []).append(bytes(m.payload))
        self.subacks: set[int] = set()
        self.client.on_subscribe = lambda _c, _u, mid, _codes, _p: self.subacks.add(mid)
        self.client.connect(host, port)
        self.client.loop_start()

    def subscribe(self, topic: str) -> None:
        """Subscribe to ``topic`` and wait for the broker's SUBACK: from then on it is delivered."""
        mid = self.client.subscribe(topic, qos=1)[1]
        wait_until(lambda: mid in self.subacks, timeout=5, what=f"the broker acknowledges the subscription to {topic}")

    def request(self, op: str, payload: bytes, reply_to: str, correlation: bytes = b"c") -> None:
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ResponseTopic = reply_to
        props.CorrelationData = correlation
        self.client.publish(wire.request_prefix(self.bank) + op, payload, qos=1, properties=props).wait_for_publish(5)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def raw_device(mosquitto: str, bank_id: str) -> Iterator[RawDevice]:
    device = RawDevice(mosquitto, bank_id)
    yield device
    device.close()


async def _eventually(check: Callable[[], bool], seconds: float = 3.0) -> bool:
    """Poll ``check`` until it holds or ``seconds`` pass; whether it held."""
    async with asyncio.timeout(seconds + 1):
        deadline = asyncio.get_running_loop().time() + seconds
        while not check():
            if asyncio.get_running_loop().time() > deadline:
                return False
            await asyncio.sleep(0.02)
    return True


@pytest.mark.network
@pytest.mark.parametrize("reply_to", ["{resp}+", "{resp}#", "{resp}a/b", "{resp}", "{resp}x\u0000y",
                                      f"{{resp}}{'a' * 40}", "{other}alice"])
async def test_wildcard_reply_topic_does_not_stop_bank(served: Served, raw_device: RawDevice, reply_to: str) -> None:
    """One PUBLISH with a wildcard (or otherwise unusable) Response Topic is dropped; the bank serves on."""
    reply_to = reply_to.format(resp=wire.response_prefix(served.world.bank), other=wire.response_prefix("other-bank"))
    user = served.world.user("alice")
    pending = wallet.prepare_withdrawal("alice", served.world.keys.keyring.keysets[served.world.keyset],
                                        served.world.keys.keyring.rsa_keys[served.world.keyset], 1)
    for payload in (user.sign(pending.request, "withdraw"), b"garbage"):
        # paho may refuse to send some of these (ValueError), and Mosquitto drops the connection of
        # a client that sends a NUL in a topic (the next publish then fails: RuntimeError)
        with contextlib.suppress(ValueError, RuntimeError):
            raw_device.request("withdraw", payload, reply_to)
    (coin,) = await served.world.withdraw(user)  # a genuine request after them is answered
    assert coin.remaining == 100
    assert not served.task.done()


@pytest.mark.network
async def test_answer_goes_only_to_signer_reply_topic(served: Served, raw_device: RawDevice) -> None:
    """A request signed by alice that names bob's topic gets no answer there."""
    world = served.world
    user = world.user("alice")
    raw_device.subscribe(wire.response_prefix(world.bank) + "#")
    pending = wallet.prepare_withdrawal("alice", world.keys.keyring.keysets[world.keyset],
                                        world.keys.keyring.rsa_keys[world.keyset], 1)
    signed = user.sign(pending.request, "withdraw")
    to_bob, to_alice = wire.response_topic(world.bank, "bob"), wire.response_topic(world.bank, "alice")
    raw_device.request("withdraw", signed, to_bob)
    raw_device.request("withdraw", signed, to_alice, correlation=b"mine")
    assert await _eventually(lambda: to_alice in raw_device.received)
    # Proving that nothing comes takes waiting: long enough for an answer to bob, sent first, to arrive.
    await asyncio.sleep(0.3)
    assert to_bob not in raw_device.received
    (answer,) = raw_device.received[to_alice]
    assert world.open(answer, "withdraw", WithdrawAnswer, request=signed).req_id == pending.request.req_id


@pytest.mark.network
async def test_requests_at_every_qos_and_with_a_pile_of_properties_are_answered(served: Served,
                                                                                raw_device: RawDevice) -> None:
    """The bank's own MQTT client reads what a device may legally send: QoS 0, 1 and 2 (the
    subscription delivers at most 1), hundreds of user properties, a content type, an expiry,
    an empty Correlation Data. Each signed request is answered on its signer's topic."""
    world = served.world
    user = world.user("alice")
    to_alice = wire.response_topic(world.bank, "alice")
    raw_device.subscribe(to_alice)
    info, public = world.keys.keyring.keysets[world.keyset], world.keys.keyring.rsa_keys[world.keyset]
    sent = []
    for qos in (0, 1, 2):
        pending = wallet.prepare_withdrawal("alice", info, public, 1)
        signed = user.sign(pending.request, "withdraw")
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ResponseTopic, props.CorrelationData = to_alice, b"" if qos == 2 else bytes([qos])
        props.UserProperty = [(f"k{i}", "v" * 50) for i in range(300)]
        props.ContentType, props.MessageExpiryInterval, props.PayloadFormatIndicator = "application/cbor", 30, 0
        raw_device.client.publish(wire.request_prefix(world.bank) + "withdraw", signed, qos=qos,
                                  properties=props).wait_for_publish(5)
        sent.append(signed)
    assert await _eventually(lambda: len(raw_device.received.get(to_alice, [])) == 3, seconds=5)
    answers = raw_device.received[to_alice]
    for signed in sent:  # each answer opens against its own request, whatever order they came in
        assert any(_opens(world, answer, signed) for answer in answers)
    assert not served.task.done()


def _opens(world: BankWorld, answer: bytes, request: bytes) -> bool:
    try:
        world.open(answer, "withdraw", WithdrawAnswer, request=request)
    except RemoteProtocolError:
        return False
    return True


@pytest.mark.network
async def test_no_single_request_ends_serve_loop(served: Served, raw_device: RawDevice,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever answering one request raises costs that request only."""
    genuine, genuine_now = BankService.reply, BankService.reply_now
    raised: list[str] = []

    def boom(op: str, data: bytes) -> None:
        if data == b"boom":
            raised.append(op)
            raise RuntimeError("a bug reached by one request")

    async def faulty(self: BankService, op: str, data: bytes, *, defer_sync: bool = False) -> Reply:
        boom(op, data)
        return await genuine(self, op, data, defer_sync=defer_sync)

    def faulty_now(self: BankService, op: str, data: bytes) -> Reply:  # SQLite answers without a task
        boom(op, data)
        return genuine_now(self, op, data)

    monkeypatch.setattr(BankService, "reply", faulty)
    monkeypatch.setattr(BankService, "reply_now", faulty_now)
    raw_device.request("status", b"boom", wire.response_topic(served.world.bank, served.client.client_id))
    (coin,) = await served.world.withdraw(served.world.user("alice"))
    assert coin.remaining == 100 and not served.task.done()
    assert raised == ["status"]  # the bug was reached, and the bank served on


async def test_retried_block_gets_stored_answer_after_window(world: BankWorld) -> None:
    """A retry after the deadline window moved on still gets the block's first answer."""
    user, vendor = world.user("alice"), world.vendor("meter")
    (wc,) = await world.withdraw(user)
    wc, _, signed = world.session(vendor, wc)
    first = await world.send("block", signed)
    assert isinstance(world.open(first, "block", BlockAnswer, request=signed), BlockAnswer)
    world.clock.now += 595  # 5 s before T: a new block with this deadline would be refused (window)
    again = await world.send("block", signed)
    assert again == first


async def test_a_retried_block_gets_its_first_answer_even_once_refused(world: BankWorld) -> None:
    """A retry that passes the checks finds its answer where the block is booked; one the checks
    now refuse (a year on: certificate and deadline both) finds it before the refusal leaves.
    Neither books anything again."""
    user, vendor = world.user("alice"), world.vendor("meter")
    (wc,) = await world.withdraw(user)
    wc, _, signed = world.session(vendor, wc)
    first = await world.send("block", signed)
    assert isinstance(world.open(first, "block", BlockAnswer, request=signed), BlockAnswer)
    books = admin.audit(world.store)
    assert await world.send("block", signed) == first
    assert admin.audit(world.store) == books
    world.clock.now += 366 * 86400
    assert await world.send("block", signed) == first
    assert admin.audit(world.store) == books and books.ok


async def test_a_new_block_is_one_transaction(world: BankWorld) -> None:
    """The stored-answer lookup rides in the booking transaction: a block costs one, not two."""
    user, vendor = world.user("alice"), world.vendor("meter")
    coins = await world.withdraw(user, 2)
    await world.block(vendor, coins[0])  # the vendor's key is read once, then kept
    engine = world.store.engine
    if isinstance(engine, PgEngine):  # one transaction on the fast road: two round trips
        before = engine.round_trips
        await world.block(vendor, coins[1])
        assert engine.round_trips - before == 2
        return
    begun: list[str] = []
    engine._conn.set_trace_callback(lambda sql: begun.append(sql) if sql.startswith("BEGIN") else None)
    try:
        await world.block(vendor, coins[1])
    finally:
        engine._conn.set_trace_callback(None)
    assert begun == ["BEGIN IMMEDIATE"]


async def test_status_only_for_coins_the_vendor_blocked(world: BankWorld) -> None:
    """Another vendor learns nothing about a coin: the answer is that of a coin never seen."""
    user, meter, other = world.user("alice"), world.vendor("meter"), world.vendor("charger")
    (wc,) = await world.withdraw(user)
    wc, _ = await world.block(meter, wc)

    async def status(vendor_name: str) -> StatusAnswer:
        vendor = meter if vendor_name == "meter" else other
        ask = vendor.sign(StatusRequest(tip=wc.coin.tip, req_id=os.urandom(16)), "status")
        return world.open(await world.send("status", ask), "status", StatusAnswer, request=ask)

    mine, theirs = await status("meter"), await status("charger")
    assert mine.known and mine.position == 99 and mine.blocked_until is not None
    assert (theirs.known, theirs.position, theirs.blocked_until, theirs.session, theirs.spent) == (
        False, None, None, None, False)


async def test_signed_refusal_bound_to_its_request(world: BankWorld) -> None:
    """The bank's refusal of one request does not verify as the answer to another."""
    user = world.user("alice", deposit=50)
    info, public = world.keys.keyring.keysets[world.keyset], world.keys.keyring.rsa_keys[world.keyset]
    first = user.sign(wallet.prepare_withdrawal("alice", info, public, 1).request, "withdraw")
    second = user.sign(wallet.prepare_withdrawal("alice", info, public, 1).request, "withdraw")
    refusal = await world.send("withdraw", first)
    with pytest.raises(RemoteProtocolError) as own:
        world.open(refusal, "withdraw", WithdrawAnswer, request=first)
    assert own.value.code is ErrorCode.INSUFFICIENT_FUNDS
    with pytest.raises(RemoteProtocolError) as foreign:
        world.open(refusal, "withdraw", WithdrawAnswer, request=second)
    assert foreign.value.code is ErrorCode.BAD_SIGNATURE


async def test_metrics_label_only_known_ops(world: BankWorld) -> None:
    """2,000 made-up operation names add one label set, not 2,000."""
    world.service.metrics = metrics = BankMetrics()
    for i in range(2_000):
        await world.service.handle(f"op{i}", b"x")
    await world.service.handle("block", b"x")
    assert {op for op, _ in metrics.requests} == {"other", "block"}
    assert metrics.requests[("other", "unknown_op")] == 2_000


async def test_noop_checkpoint_refused(world: BankWorld) -> None:
    """A checkpoint with nothing new to credit is refused and stores nothing."""
    user, vendor = world.user("alice"), world.vendor("meter")
    (wc,) = await world.withdraw(user)
    wc, session = await world.block(vendor, wc)
    wc, pay = wallet.reveal(wc, 2)
    session.pay(pay, world.clock.now)
    assert (await world.settle(vendor, session, keep_open=True)).credited == 3
    stored = world.store.run_sync(lambda tx: tx.one("SELECT COUNT(*) FROM answers"))
    for _ in range(5):
        request = vendor.sign(session.settle_request(os.urandom(16), keep_open=True), "settle")
        with pytest.raises(RemoteProtocolError) as info:
            world.open(await world.send("settle", request), "settle", SettleAnswer, request=request)
        assert info.value.code is ErrorCode.NO_PROGRESS
    assert world.store.run_sync(lambda tx: tx.one("SELECT COUNT(*) FROM answers")) == stored
    assert (await world.settle(vendor, session)).credited == 0  # the final settlement still closes it


@pytest.mark.network
async def test_revocation_reaches_devices_without_restart(world: BankWorld, mosquitto: str) -> None:
    """A vendor revoked while the bank runs is listed in the retained announcement within a sweep."""
    world.vendor("meter")
    ready = asyncio.Event()
    task = asyncio.create_task(serve(world.keys, world.service, mosquitto, sweep_interval=0.2, ready=ready))
    try:
        async with asyncio.timeout(10):
            await ready.wait()
        admin.revoke_vendor(world.store, "meter", world.clock.now)
        async with asyncio.timeout(5):
            while True:
                async with BankClient(mosquitto, world.bank, f"dev-{uuid.uuid4().hex[:8]}") as client:
                    announcement = verify_announcement(await client.keys(), world.keys.fingerprint, world.clock.now)
                if announcement.revoked == ("meter",):
                    break
                await asyncio.sleep(0.1)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_withdrawal_paid_before_its_keyset_retired_is_still_signed(world: BankWorld, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A debit whose signing failed is finished by the retry even after the keyset's retirement and
    a restart, and the wallet's rule keeps such a withdrawal (an ``internal`` refusal is not final)."""
    user = world.user("alice")
    keyset = world.keyset
    info, public = world.keys.keyring.keysets[keyset], world.keys.keyring.rsa_keys[keyset]
    pending = wallet.prepare_withdrawal("alice", info, public, 2)
    signed = user.sign(pending.request, "withdraw")

    genuine = world.keys.signers[keyset]

    class Broken:
        """The keyset's signer, failing where the RSA work is done."""

        size, public_key = genuine.size, genuine.public_key

        def sign(self, _blinded: bytes) -> bytes:
            raise RuntimeError("a fault in the signer")

    monkeypatch.setitem(world.keys.signers, keyset, Broken())
    with pytest.raises(envelope.Refusal) as first:
        world.open(await world.send("withdraw", signed), "withdraw", WithdrawAnswer, request=signed)
    assert first.value.code is ErrorCode.INTERNAL and not first.value.final
    assert admin.balance(world.store, "alice") == 10_000 - 200  # the debit is made
    monkeypatch.undo()
    retire_keyset(world.store, keyset, world.clock.now)
    keys, store = load_bank(tmp_path / "bank", world.clock.now)
    try:
        assert keys.keyring.phases[keyset].phase == "spend-only"  # no new withdrawal from it
        service = BankService(keys, store, clock=world.clock)
        answer = world.open(await service.handle("withdraw", signed), "withdraw", WithdrawAnswer, request=signed)
        assert len(wallet.complete_withdrawal(pending, answer, info, public)) == 2
    finally:
        store.close()


async def test_names_shared_by_users_and_vendors_refused(world: BankWorld) -> None:
    """A user named like a vendor would share its reply topic and its stored answers."""
    world.vendor("meter")
    world.user("alice")
    with pytest.raises(ValueError, match="taken"):
        world.user("meter")
    with pytest.raises(ValueError, match="taken"):
        world.user("v-meter")  # the vendor's account
    with pytest.raises(ValueError, match="taken"):
        world.vendor("alice")


async def test_bank_login_names_refused_for_accounts_and_vendors(world: BankWorld) -> None:
    """A device named ``bank-2`` would hold the broker login of a bank worker, which reads every
    request: such names are the bank's own."""
    for name in ("bank", "bank-2", "bank-02"):
        with pytest.raises(ValueError, match="reserved for the bank's own broker logins"):
            world.user(name)
        with pytest.raises(ValueError, match="reserved for the bank's own broker logins"):
            world.vendor(name)
    world.user("bank-of-alice")  # only the worker names are reserved
    assert world.audit().ok


async def test_deposit_only_into_user_accounts(world: BankWorld) -> None:
    """A deposit into a vendor's account would leave books no audit can pass."""
    world.vendor("meter")
    for name in ("v-meter", "outstanding", "world"):
        with pytest.raises(KeyError):
            admin.deposit(world.store, name, 100, world.clock.now)
    assert world.audit().ok
