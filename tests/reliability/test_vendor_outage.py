"""The bank unreachable while a vendor closes: a real bank, Mosquitto, real vendors (``run_vendor``)
and a user paying over CoAP.

Nothing the network does may end a settlement: the vendor keeps sending it (same bytes) until the
bank answers, across a restart of the vendor, and past the deadline ``T`` it asks the coin's
status and settles late while the rules allow. Every token the vendor delivered service for is
credited to it exactly once — and never to the next vendor the same wallet pays.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import aiocoap
import pytest
from aiocoap.numbers.codes import Code
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from m2mpay.agents.bank import admin
from m2mpay.agents.bank.server import serve
from m2mpay.agents.mqtt import BankClient
from m2mpay.agents.user.agent import UserAgent, UserCredentials
from m2mpay.agents.vendor.config import Pricing, SessionPolicy, SettlementPolicy, VendorConfig
from m2mpay.agents.vendor.server import load_credentials, run_vendor
from m2mpay.broker.launcher import free_udp_port
from m2mpay.protocol import cose
from m2mpay.protocol.messages import CertificateBody, FinalReceipt
from m2mpay.protocol.receipts import AAD_RECEIPT
from m2mpay.protocol.rules import wallet
from tests.bank_world import BankWorld
from tests.waiting import wait_until_async

pytestmark = [pytest.mark.asyncio, pytest.mark.network]

SETTLEMENT = SettlementPolicy(answer_timeout=0.5, attempts=2, retry_first=0.2, retry_cap=1.0, urgent_cap=1.0,
                              close_wait=1.0)
WINDOW = SETTLEMENT.answer_timeout * SETTLEMENT.attempts
"""How long one try of the vendor's bank client lasts before it says "no answer"."""
OUTAGE = 6.0
"""The bank is down this long: several retry windows, a close and a vendor restart."""


@dataclass
class Bank:
    """The bank's MQTT service, stopped and started like a process (its database stays)."""

    world: BankWorld
    broker: str
    task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        ready = asyncio.Event()
        self.task = asyncio.create_task(serve(self.world.keys, self.world.service, self.broker, ready=ready))
        await asyncio.wait_for(ready.wait(), 10)

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        self.task = None


@dataclass
class Vendor:
    """``run_vendor`` on a fixed port and data directory, stopped and started like a process."""

    world: BankWorld
    name: str
    broker: str
    data: Path
    port: int = field(default_factory=free_udp_port)
    task: asyncio.Task[None] | None = None

    @property
    def base(self) -> str:
        return f"coap://[::1]:{self.port}"

    async def start(self) -> None:
        config = VendorConfig(pricing=Pricing(service="parking", unit="minute", price=1, meter_interval=0.02),
                              session=SessionPolicy(block_window=600, idle_timeout=600), settlement=SETTLEMENT)
        up = asyncio.Event()
        self.task = asyncio.create_task(run_vendor(
            load_credentials(self.world.directory / f"{self.name}.json"), self.broker, self.port, self.data, config,
            ready=up, clock=self.world.clock, settle_period=0.1))
        await asyncio.wait_for(up.wait(), 10)

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        self.task = None

    def held(self) -> list[tuple[bytes, str, int]]:
        """(session, state, deadline) of every session on the vendor's disk, read as another process would."""
        path = self.data / "vendor.sqlite3"
        try:
            with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
                return [(bytes(r[0]), str(r[1]), int(r[2])) for r in
                        db.execute("SELECT session, state, deadline FROM sessions ORDER BY opened")]
        except sqlite3.OperationalError:  # not created yet
            return []


async def _user(world: BankWorld, broker: str, name: str, coins: int = 1) -> UserAgent:
    world.user(name)
    user = UserAgent(world.directory / f"wallet-{name}", clock=world.clock)
    async with BankClient(broker, world.bank, f"{name}-{uuid.uuid4().hex[:6]}") as bank:
        await user.withdraw(bank, UserCredentials.load(world.directory / f"{name}.json"), coins)
    return user


async def _close(ctx: aiocoap.Context, vendor: Vendor, sid: bytes) -> tuple[FinalReceipt, float]:
    """The user's close (again), as any client sends it; the signed receipt and how long it took."""
    began = time.monotonic()
    async with asyncio.timeout(30):
        response = await ctx.request(aiocoap.Message(code=Code.POST, uri=f"{vendor.base}/sessions/{sid.hex()}/close",
                                                     payload=b"")).response
    assert response.code == Code.CHANGED, (response.code, response.payload)
    cert = load_credentials(vendor.world.directory / f"{vendor.name}.json").cert
    key = Ed25519PublicKey.from_public_bytes(CertificateBody.decode(cose.decode_sign1(cert).payload).key)
    signed = cose.verify_sign1(response.payload, key, AAD_RECEIPT)  # by the vendor's certified key
    return FinalReceipt.decode(signed.payload), time.monotonic() - began


async def _pay_while_the_bank_stops(ctx: aiocoap.Context, user: UserAgent, vendor: Vendor, bank: Bank,
                                    units: int) -> tuple[int, bytes, float, float]:
    """Open with the bank up, stop it as soon as the coin is blocked, pay and close during the outage.

    Returns the tokens the user paid, the session, when the bank went down and how long the
    payment went on after that (the tokens, then a close that waits ``close_wait`` for the bank).
    """
    paying = asyncio.create_task(user.pay(ctx, vendor.base, units))
    await wait_until_async(lambda: bool(vendor.held()) or paying.done(), timeout=10,
                           what="the vendor holds a session, or the payment ended")
    (sid, _, _), = vendor.held()
    await bank.stop()
    down = time.monotonic()
    result = await paying  # paid and closed while the bank is down: the close is answered
    assert result.tokens == units  # 1 a unit, tokens of 1: the blocking token is the first
    return result.tokens, sid, down, time.monotonic() - down


def _vendor_logs(caplog: pytest.LogCaptureFixture) -> tuple[int, list[str]]:
    """Unanswered settlement attempts the vendors logged, and any error or IntegrityError."""
    retries = sum("unanswered" in r.getMessage() for r in caplog.records if r.name == "m2mpay.agents.vendor.agent")
    bad = [r.getMessage() for r in caplog.records
           if (r.levelno >= logging.ERROR and r.name.startswith("m2mpay.agents.vendor"))
           or "IntegrityError" in r.getMessage() or (r.exc_info and "IntegrityError" in repr(r.exc_info[1]))]
    return retries, bad


async def test_bank_outage_across_a_close_and_a_vendor_restart(world: BankWorld, mosquitto: str, tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    bank = Bank(world, mosquitto)
    await bank.start()
    world.vendor("meter")
    vendor = Vendor(world, "meter", mosquitto, tmp_path / "meter")
    await vendor.start()
    user = await _user(world, mosquitto, "alice")
    value = world.keys.keyring.keysets[world.keyset].token_value
    ctx = await aiocoap.Context.create_client_context()
    try:
        tokens, sid, down, paying = await _pay_while_the_bank_stops(ctx, user, vendor, bank, 10)
        first, again_wait = await _close(ctx, vendor, sid)  # the user asks again: the same, still pending
        assert first.pending and first.index == 100 - tokens and first.credited == 0
        assert vendor.held()[0][1] == "closing"

        await vendor.stop()  # restarted during the outage: the settlement is on its disk
        await vendor.start()
        again, _ = await _close(ctx, vendor, sid)  # no second outbox entry, no IntegrityError
        assert again == first  # the same receipt (the test's clock stands still: the same time too)
        (kept,) = user.receipts()  # the wallet kept the pending receipt of its own close
        assert kept.receipt.pending and kept.receipt.tokens == tokens and kept.receipt.session == sid
        await asyncio.sleep(max(0.0, OUTAGE - (time.monotonic() - down)))  # the outage lasts OUTAGE seconds
        assert time.monotonic() - down > 3 * WINDOW and admin.balance(world.store, "meter") == 0

        await bank.start()  # back well before T
        up = time.monotonic()
        await wait_until_async(lambda: admin.balance(world.store, "meter") == tokens * value, timeout=20,
                               what="the vendor is credited for every token")
        settle_time = time.monotonic() - up
        final, _ = await _close(ctx, vendor, sid)
        assert final.pending is None and final.credited == tokens * value and final.index == first.index
        assert vendor.held()[0][1] == "closed"
        assert await user.settle_pending(ctx) == 1  # the wallet asks again: the final receipt frees its coin
        (kept,) = user.receipts()
        assert kept.receipt.pending is None and kept.receipt.credited == tokens * value
        ((wc, _),) = user.store.coins()
        assert wc.status is wallet.CoinStatus.READY and wc.position == final.index
        assert await user.settle_pending(ctx) == 0
    finally:
        await ctx.shutdown()
        user.close()
        await vendor.stop()
        await bank.stop()
    retries, bad = _vendor_logs(caplog)
    assert retries >= 2 and not bad, bad
    report = world.audit()
    assert report.ok and report.credited == tokens * value  # credited once, nothing else moved
    print(f"\noutage: {tokens} token(s) delivered, {admin.balance(world.store, 'meter') // value} credited; "
          f"{retries} unanswered attempt(s); paid and closed {paying:.2f} s after the bank stopped "
          f"(close_wait {SETTLEMENT.close_wait:.0f} s), a retried close answered in {again_wait:.2f} s; "
          f"settled {settle_time:.2f} s after the bank came back (outage {OUTAGE:.0f} s, window {WINDOW:.1f} s)")


async def test_chain_attack_the_late_settlement_lands_before_the_next_vendor(
        world: BankWorld, mosquitto: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The bank stopped while the user closes at vendor A, back only after A's deadline; then the
    same wallet pays at vendor B. A's settlement is late, accepted since nobody blocked the coin
    since; B's block starts where A's tokens end. Before, A gave its settlement up, the block
    lapsed at the position the bank had seen, and B's block was credited A's tokens as a gap."""
    caplog.set_level(logging.INFO)
    bank = Bank(world, mosquitto)
    await bank.start()
    world.vendor("meter")
    world.vendor("kiosk")
    a = Vendor(world, "meter", mosquitto, tmp_path / "meter")
    b = Vendor(world, "kiosk", mosquitto, tmp_path / "kiosk")
    await a.start()
    await b.start()
    user = await _user(world, mosquitto, "alice")
    value = world.keys.keyring.keysets[world.keyset].token_value
    ctx = await aiocoap.Context.create_client_context()
    try:
        at_a, _, _, _ = await _pay_while_the_bank_stops(ctx, user, a, bank, 10)
        (_, _, deadline), = a.held()
        world.clock.now = deadline + 1  # T passes while the bank is down: the block lapses unsettled
        await bank.start()
        up = time.monotonic()
        await wait_until_async(lambda: admin.balance(world.store, "meter") == at_a * value, timeout=20,
                               what="the vendor is credited for what it held (late, by status first)")
        late = time.monotonic() - up
        assert any("settling late" in r.getMessage() for r in caplog.records)
        at_b = await user.pay(ctx, b.base, 5)
        assert at_b.tokens == at_b.credited == 5  # B's block began where A's tokens end: no gap
        assert admin.balance(world.store, "meter") == at_a * value  # A: its blocking token and the 10
        assert admin.balance(world.store, "kiosk") == at_b.tokens * value  # B: its own, nothing of A's
    finally:
        await ctx.shutdown()
        user.close()
        await a.stop()
        await b.stop()
        await bank.stop()
    _, bad = _vendor_logs(caplog)
    assert not bad, bad
    report = world.audit()
    assert report.ok and report.credited == (at_a + at_b.tokens) * value
    print(f"\nchain: A delivered {at_a} token(s), credited {at_a} (late, {late:.2f} s after the bank came back); "
          f"B delivered {at_b.tokens}, credited {at_b.credited}")
