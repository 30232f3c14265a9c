"""A real bank per test: its own bank id, keys on disk, SQLite or PostgreSQL behind it.

The bank's modules are imported when a test asks for a bank, not when the plugin loads, so that
tests of other parts do not depend on them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import pytest_asyncio

if TYPE_CHECKING:
    from m2mpay.agents.mqtt import BankClient
    from tests.bank_world import BankWorld

__all__ = ["SERVED_KEYSETS", "bank_id", "db_url", "online", "served", "world"]

SERVED_KEYSETS = ((100, 100), (1000, 100))
"""The keysets of :func:`served`: token values 1 and 10, so a policy must judge the money of the coin
it pays with."""


@pytest.fixture
def bank_id(request: pytest.FixtureRequest) -> str:
    """This test's bank id (from its node id): its topics on the shared Mosquitto are its own."""
    from tests.bank_world import bank_id_for

    return bank_id_for(request.node.nodeid)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.network)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The bank's database, once on each backend: a SQLite file, or a new PostgreSQL database."""
    if request.param == "sqlite":
        yield str(tmp_path / "bank.sqlite3")
    else:
        yield request.getfixturevalue("pg_database")


@pytest_asyncio.fixture
async def world(tmp_path: Path, db_url: str, bank_id: str) -> AsyncIterator[BankWorld]:
    """A bank with one keyset of 100 one-unit tokens, clock at ``NOW``; audited when the test ends."""
    from m2mpay.agents.bank.keys import init_bank, load_bank
    from m2mpay.agents.bank.service import BankService
    from tests.bank_world import BankWorld, Clock

    clock = Clock()
    init_bank(tmp_path / "bank", bank_id, db_url, clock.now, keysets=((100, 100),))
    keys, store = load_bank(tmp_path / "bank", clock.now, connections=4)
    bank = BankWorld(keys=keys, store=store, service=BankService(keys, store, clock=clock), clock=clock,
                     directory=tmp_path)
    try:
        yield bank
        report = bank.audit()
        assert report.ok, report.problems  # every test ends with the books balanced
    finally:
        store.close()


@pytest_asyncio.fixture
async def served(tmp_path: Path, mosquitto: str, bank_id: str) -> AsyncIterator[BankWorld]:
    """A bank on SQLite (the bank's storage is not what its tests are about) with keysets of token
    value 1 and 10 (:data:`SERVED_KEYSETS`), serving over the test Mosquitto; audited when the test ends."""
    import asyncio
    import contextlib

    from m2mpay.agents.bank.keys import init_bank, load_bank
    from m2mpay.agents.bank.server import serve
    from m2mpay.agents.bank.service import BankService
    from tests.bank_world import BankWorld, Clock

    clock = Clock()
    init_bank(tmp_path / "bank", bank_id, str(tmp_path / "bank.sqlite3"), clock.now, keysets=SERVED_KEYSETS)
    keys, store = load_bank(tmp_path / "bank", clock.now, connections=2)
    bank = BankWorld(keys=keys, store=store, service=BankService(keys, store, clock=clock), clock=clock,
                     directory=tmp_path)
    ready = asyncio.Event()
    task = asyncio.create_task(serve(keys, bank.service, mosquitto, ready=ready), name="test-bank")
    try:
        await asyncio.wait_for(ready.wait(), 10)
        yield bank
        report = bank.audit()
        assert report.ok, report.problems
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        store.close()


@pytest_asyncio.fixture
async def online(world: BankWorld, mosquitto: str) -> AsyncIterator[tuple[BankWorld, BankClient]]:
    """The world's bank served over the test Mosquitto (sweeping every 0.2 s), and a device's
    client to it; ``world.send`` goes through the broker."""
    import asyncio
    import contextlib
    import uuid

    from m2mpay.agents.bank.server import serve
    from m2mpay.agents.mqtt import BankClient

    ready = asyncio.Event()
    task = asyncio.create_task(serve(world.keys, world.service, mosquitto, sweep_interval=0.2,
                                     ready=ready), name="bank-under-test")
    try:
        async with asyncio.timeout(10):
            await ready.wait()
        async with BankClient(mosquitto, world.bank, f"dev-{uuid.uuid4().hex[:8]}", timeout=5) as client:
            world.send = client.request
            yield world, client
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
