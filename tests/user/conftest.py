"""User tests reuse the bank world (a real bank on SQLite and PostgreSQL).

The findings' tests run on SQLite only (the bank's storage is not what they are about) with two
keysets whose tokens are worth different amounts (1 and 10), and a bank serving over Mosquitto.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest_asyncio

from m2mpay.agents.bank.keys import init_bank, load_bank
from m2mpay.agents.bank.server import serve
from m2mpay.agents.bank.service import BankService
from tests.bank.conftest import db_url, world  # noqa: F401  (fixtures)

from ..bank.conftest import BANK, NOW, BankWorld, Clock

__all__ = ["BANK", "NOW", "BankWorld", "Clock"]

KEYSETS = ((100, 100), (1000, 100))
"""Token values 1 and 10: a policy must judge the money of the coin it pays with."""


@pytest_asyncio.fixture
async def served(tmp_path: Path, mosquitto: str) -> AsyncIterator[BankWorld]:
    """A bank on SQLite with keysets of token value 1 and 10, serving over the test Mosquitto."""
    clock = Clock()
    init_bank(tmp_path / "bank", BANK, str(tmp_path / "bank.sqlite3"), clock.now, keysets=KEYSETS)
    keys, store = load_bank(tmp_path / "bank", clock.now, connections=2)
    world = BankWorld(keys=keys, store=store, service=BankService(keys, store, clock=clock), clock=clock,
                      directory=tmp_path)
    ready = asyncio.Event()
    task = asyncio.create_task(serve(keys, world.service, mosquitto, ready=ready), name="test-bank")
    try:
        await asyncio.wait_for(ready.wait(), 10)
        yield world
        report = world.audit()
        assert report.ok, report.problems
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        store.close()
