"""``m2mpay doctor`` against a real broker and bank: each check passes, or says what failed."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest

from m2mpay.agents.bank.server import serve
from m2mpay.agents.doctor import run_doctor
from m2mpay.broker.launcher import free_port

from tests.bank_world import BankWorld
from tests.commands import m2mpay

pytestmark = pytest.mark.network


@pytest.mark.asyncio
async def test_doctor_all_ok_with_a_serving_bank(world: BankWorld, mosquitto: str, tmp_path: Path) -> None:
    world.user("alice")
    ready = asyncio.Event()
    task = asyncio.create_task(serve(world.keys, world.service, mosquitto, ready=ready))
    try:
        await asyncio.wait_for(ready.wait(), 10)
        report = await run_doctor(tmp_path / "alice.json", mosquitto, None, world.clock.now)
        assert report.ok, report.lines
        assert [line.split()[1] for line in report.lines] == [
            "credentials:", "broker:", "announcement:", "announcement", "keysets:", "clock:"]
        behind = await run_doctor(tmp_path / "alice.json", mosquitto, None, world.clock.now - 3600)
        assert not behind.ok and "set this device's time" in behind.lines[-1]
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.mark.asyncio
async def test_doctor_names_what_failed(world: BankWorld, tmp_path: Path) -> None:
    world.user("alice")
    nowhere = f"mqtt://127.0.0.1:{free_port()}"
    report = await run_doctor(tmp_path / "alice.json", nowhere, None, world.clock.now, timeout=1.0)
    assert not report.ok and report.lines[-1].startswith("FAIL  broker:")
    missing = await run_doctor(tmp_path / "nobody.json", nowhere, None, world.clock.now)
    assert missing.lines == [f"FAIL  credentials: {tmp_path / 'nobody.json'} cannot be read as credentials "
                             f"([Errno 2] No such file or directory: '{tmp_path / 'nobody.json'}')"]


def test_doctor_command_exit_status(tmp_path: Path) -> None:
    result = m2mpay("doctor", "--credentials", tmp_path / "none.json", "--broker", "mqtt://127.0.0.1:1", check=False)
    assert result.returncode == 5 and result.stdout.startswith("FAIL  credentials:")
