"""kill -9 the bank while devices spend, start it again, several times: every request is answered
in the end (devices retry the same bytes), every spend is credited exactly once, the books balance."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from m2mpay.agents.bank import admin
from m2mpay.agents.mqtt import BankClient
from m2mpay.protocol import envelope
from m2mpay.protocol.messages import BlockAnswer, SettleAnswer
from m2mpay.protocol.rules import wallet
from tests.bank_world import BankWorld

pytestmark = pytest.mark.network


def _serve(data: Path, broker: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "m2mpay.agents.cli", "bank", "serve", "--data", str(data),
                             "--broker", broker], stderr=subprocess.DEVNULL)


async def _crash_run(mosquitto: str, tmp_path: Path, spends: int, kills: int, bank_id: str,
                     db: str | None = None) -> dict[str, int]:
    world = BankWorld.create(tmp_path, db, bank=bank_id)
    keys, store, clock = world.keys, world.store, world.clock
    user, vendors = world.user("payer", deposit=100 * spends), [world.vendor(f"v{i}") for i in range(4)]
    bank = [_serve(tmp_path / "bank", mosquitto)]
    answer_key = keys.answer_key.public_key()
    credited = 0
    async with BankClient(mosquitto, world.bank, f"dev-{uuid.uuid4().hex[:6]}", timeout=1.5, retries=40) as client:
        await client.keys(timeout=30)
        world.send = client.request
        coins = []
        while len(coins) < spends:
            coins += await world.withdraw(user, min(50, spends - len(coins)))

        async def spend(i: int, wc: wallet.WalletCoin) -> int:
            vendor = vendors[i % len(vendors)]
            wc, session, signed = world.session(vendor, wc)
            session.blocked(envelope.open_answer(await client.request("block", signed), answer_key, world.bank,  # type: ignore[arg-type]
                                                 "block", BlockAnswer, request=signed))
            wc, pay = wallet.reveal(wc, 3)
            session.pay(pay, clock.now)
            request = vendor.sign(session.settle_request(os.urandom(16), keep_open=False), "settle")
            answer = envelope.open_answer(await client.request("settle", request), answer_key, world.bank, "settle",
                                          SettleAnswer, request=request)
            return answer.credited  # type: ignore[attr-defined, no-any-return]

        kill_times: list[float] = []
        spans: list[tuple[float, float]] = []

        async def killer() -> None:
            for _ in range(kills):
                await asyncio.sleep(0.8)  # the kill schedule: spends run in between
                kill_times.append(time.monotonic())
                bank[-1].send_signal(signal.SIGKILL)
                bank[-1].wait(10)
                await asyncio.sleep(0.2)  # the outage: requests wait on a dead bank this long
                bank.append(_serve(tmp_path / "bank", mosquitto))

        pool = list(enumerate(coins))

        async def lane() -> int:
            total = 0
            while pool and not chaos.done():
                i, wc = pool.pop()
                start = time.monotonic()
                total += await spend(i, wc)
                spans.append((start, time.monotonic()))
                await asyncio.sleep(0.05)  # a device's pace: the load lasts as long as the kills
            return total

        chaos = asyncio.create_task(killer())
        credited = sum(await asyncio.gather(*(lane() for _ in range(8))))
        await chaos
        # Every outage (kill to restart) had requests waiting on it: load, not an idle bank.
        assert all(any(a < k + 0.2 and b > k for a, b in spans) for k in kill_times), "an outage saw no request"
        spent = len(spans)
    for process in bank:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(10)
    report = admin.audit(store)
    store.close()
    assert report.ok, report.problems
    return {"spends": spent, "kills": kills, "credited_answers": credited, "credited_books": report.credited,
            "withdrawn": report.withdrawn, "restarts": len(bank) - 1}


@pytest.mark.asyncio
async def test_bank_killed_three_times_during_spends(mosquitto: str, tmp_path: Path, bank_id: str) -> None:
    result = await _crash_run(mosquitto, tmp_path, spends=1200, kills=3, bank_id=bank_id)
    assert result["restarts"] == 3 and result["spends"] > 0
    # blocking token + 3 per spend, each credited once, and what devices were told is the books
    assert result["credited_answers"] == result["credited_books"] == 4 * result["spends"]


@pytest.mark.heavy
@pytest.mark.asyncio
async def test_bank_killed_twenty_times_during_spends(mosquitto: str, tmp_path: Path, bank_id: str) -> None:
    result = await _crash_run(mosquitto, tmp_path, spends=4000, kills=20, bank_id=bank_id)
    print("bank crashes:", result)
    assert result["restarts"] == 20
    assert result["credited_answers"] == result["credited_books"] == 4 * result["spends"]


@pytest.mark.asyncio
async def test_bank_on_postgresql_killed_three_times_during_spends(mosquitto: str, pg_database: str,
                                                                   tmp_path: Path, bank_id: str) -> None:
    """On PostgreSQL requests share transactions: a kill lands with several in one, some with their
    COMMIT sent and unanswered. Each is answered once the bank is back, and credited once."""
    result = await _crash_run(mosquitto, tmp_path, spends=1200, kills=3, bank_id=bank_id, db=pg_database)
    assert result["restarts"] == 3 and result["spends"] > 0
    assert result["credited_answers"] == result["credited_books"] == 4 * result["spends"]


@pytest.mark.heavy
@pytest.mark.asyncio
async def test_bank_on_postgresql_killed_twenty_times_during_spends(mosquitto: str, pg_database: str,
                                                                    tmp_path: Path, bank_id: str) -> None:
    result = await _crash_run(mosquitto, tmp_path, spends=4000, kills=20, bank_id=bank_id, db=pg_database)
    print("bank crashes, postgresql:", result)
    assert result["restarts"] == 20
    assert result["credited_answers"] == result["credited_books"] == 4 * result["spends"]
