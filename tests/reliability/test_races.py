"""The same coin at two vendors at the same moment, through two bank worker processes on one
PostgreSQL: exactly one block each time, and the books balance."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from m2mpay.agents.bank import admin
from m2mpay.agents.bench.world import BANK, BankWorld
from m2mpay.agents.mqtt import BankClient
from m2mpay.protocol import envelope
from m2mpay.protocol.errors import ErrorCode
from m2mpay.protocol.messages import BlockAnswer

pytestmark = pytest.mark.network


def _workers(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


async def _race(mosquitto: str, db_url: str, tmp_path: Path, trials: int) -> tuple[int, int]:
    """(trials where exactly one vendor got the block, trials in all)."""
    world = BankWorld.create(tmp_path, db_url)
    keys, store = world.keys, world.store
    user = world.user("payer", deposit=100 * trials)
    vendors = [world.vendor("north"), world.vendor("south")]
    bank = subprocess.Popen([sys.executable, "-m", "m2mpay.agents.cli", "bank", "serve", "--data", str(tmp_path / "bank"),
                             "--broker", mosquitto, "--workers", "2"], stderr=subprocess.DEVNULL)
    clients = [BankClient(mosquitto, BANK, f"{v.name}-{uuid.uuid4().hex[:6]}", timeout=10) for v in vendors]
    try:
        for client in clients:
            await client.__aenter__()
        await clients[0].keys(timeout=30)
        deadline = time.monotonic() + 20
        while len(_workers(bank.pid)) < 1:
            assert time.monotonic() < deadline, "the second worker never started"
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)  # both subscribed
        world.send = clients[0].request
        coins = []
        for _ in range(0, trials, 50):
            coins += await world.withdraw(user, min(50, trials - len(coins)))
        exactly_one = 0
        for wc in coins:
            requests = [world.session(vendor, wc)[2] for vendor in vendors]
            raws = await asyncio.gather(*(c.request("block", r) for c, r in zip(clients, requests, strict=True)))
            outcomes = []
            for request, raw in zip(requests, raws, strict=True):
                try:
                    outcomes.append(envelope.open_answer(raw, keys.answer_key.public_key(), BANK, "block",
                                                         BlockAnswer, request=request))
                except Exception as exc:  # the loser's signed refusal
                    outcomes.append(exc)
            won = [o for o in outcomes if isinstance(o, BlockAnswer)]
            lost = [o for o in outcomes if not isinstance(o, BlockAnswer)]
            if len(won) == 1 and getattr(lost[0], "code", None) is ErrorCode.COIN_BLOCKED:
                exactly_one += 1
        report = admin.audit(store)
        assert report.ok, report.problems
        return exactly_one, len(coins)
    finally:
        for client in clients:
            await client.__aexit__(None, None, None)
        bank.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            bank.wait(15)
        store.close()


@pytest.mark.asyncio
async def test_same_coin_two_vendors_two_workers(mosquitto: str, pg_database: str, tmp_path: Path) -> None:
    exactly_one, trials = await _race(mosquitto, pg_database, tmp_path, 40)
    assert exactly_one == trials == 40


@pytest.mark.heavy
@pytest.mark.asyncio
async def test_same_coin_two_vendors_two_workers_1000_times(mosquitto: str, pg_database: str,
                                                            tmp_path: Path) -> None:
    exactly_one, trials = await _race(mosquitto, pg_database, tmp_path, 1000)
    assert exactly_one == trials == 1000
