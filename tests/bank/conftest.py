"""A real bank (keys on disk, SQLite or PostgreSQL) and the devices that talk to it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from m2mpay.agents.bank.keys import init_bank, load_bank
from m2mpay.agents.bank.service import BankService
from m2mpay.agents.bench.world import BANK, NOW, BankWorld, Clock, Device, Send

__all__ = ["BANK", "NOW", "BankWorld", "Clock", "Device", "Send"]


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield str(tmp_path / "bank.sqlite3")
    else:
        yield request.getfixturevalue("pg_database")


@pytest_asyncio.fixture
async def world(tmp_path: Path, db_url: str) -> AsyncIterator[BankWorld]:
    clock = Clock()
    init_bank(tmp_path / "bank", BANK, db_url, clock.now, keysets=((100, 100),))
    keys, store = load_bank(tmp_path / "bank", clock.now, connections=4)
    bank = BankWorld(keys=keys, store=store, service=BankService(keys, store, clock=clock), clock=clock,
                     directory=tmp_path)
    try:
        yield bank
        report = bank.audit()
        assert report.ok, report.problems  # every test ends with the books balanced
    finally:
        store.close()
