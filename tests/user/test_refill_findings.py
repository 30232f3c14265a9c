"""The daily refill cap: kept on disk with the withdrawals' times, and reset at the device's midnight."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import pytest

from m2mpay.agents.bank import admin
from m2mpay.agents.policy.config import PolicyConfig
from m2mpay.agents.user.run import RunConfig, run_user

from tests.bank_world import NOW, BankWorld

pytestmark = [pytest.mark.asyncio, pytest.mark.network]

ALWAYS = {"refill": {"below": 10_000, "coins": 1, "daily_cap": 100}}
"""Refill whenever possible, one coin of 100 at a time, at most 100 a day."""


def _config(world: BankWorld, mosquitto: str, tmp_path: Path, rounds: int, interval: float = 0.1) -> RunConfig:
    return RunConfig(wallet=tmp_path / "auto", credentials=tmp_path / "alice.json", broker=mosquitto, vendors=(),
                     rounds=rounds, interval=interval, policy=PolicyConfig.from_dict(ALWAYS))


async def test_daily_refill_cap_survives_restarts(served: BankWorld, mosquitto: str, tmp_path: Path) -> None:
    """Three restarts within minutes withdrew 300 against a cap of 100: now the cap holds across them."""
    served.user("alice")
    for _ in range(3):
        await run_user(_config(served, mosquitto, tmp_path, rounds=1), clock=served.clock)
        served.clock.now += 60
    assert admin.balance(served.store, "alice") == 10_000 - 100
    log = [json.loads(line) for line in (tmp_path / "auto" / "decisions.jsonl").read_text().splitlines()]
    assert [e["reason"] for e in log if e["action"] == "refill"] == ["refill", "refill_cap", "refill_cap"]


async def test_refill_cap_resets_at_midnight(served: BankWorld, mosquitto: str, tmp_path: Path) -> None:
    """One long-running process: refilled at 23:58:30, capped at 23:59:30, refilled again at 00:00:30."""
    served.user("alice")
    after = datetime.datetime.fromtimestamp(NOW + 3600)  # the device's local time
    midnight = after.replace(hour=0, minute=0, second=0, microsecond=0) + datetime.timedelta(days=1)
    served.clock.now = int(midnight.timestamp()) - 90

    async def sleep(seconds: float) -> None:  # simulated time: the round interval passes at once
        served.clock.now += int(seconds)

    await run_user(_config(served, mosquitto, tmp_path, rounds=3, interval=60), clock=served.clock, sleep=sleep)
    assert admin.balance(served.store, "alice") == 10_000 - 200
    log = [json.loads(line) for line in (tmp_path / "auto" / "decisions.jsonl").read_text().splitlines()]
    assert [e["reason"] for e in log if e["action"] == "refill"] == ["refill", "refill_cap", "refill"]
