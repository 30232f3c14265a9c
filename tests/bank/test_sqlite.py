"""SQLite's shared WAL sync: every commit durable before it is returned, fewer fsyncs than commits."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from m2mpay.agents.bank.sqlite import SqliteEngine
from m2mpay.agents.bank.store import Store, StoreError, Tx


def _insert(name: str):  # type: ignore[no-untyped-def]
    def fn(tx: Tx) -> str:
        tx.create_account(name, "user", None, 0)
        return name
    return fn


@pytest.mark.asyncio
async def test_requests_in_flight_share_fsyncs_and_all_commit(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "bank.sqlite3"))
    engine = store.engine
    assert isinstance(engine, SqliteEngine)
    before_commits, before_syncs = engine.commits, engine.syncs
    names = [f"user-{i}" for i in range(64)]
    results = await asyncio.gather(*(store.run(_insert(n)) for n in names))
    assert results == names
    commits, syncs = engine.commits - before_commits, engine.syncs - before_syncs
    assert commits == 64
    assert 1 <= syncs < commits  # waiters share a sync
    store.close()
    # What run() returned is in the file, read by another connection.
    conn = sqlite3.connect(tmp_path / "bank.sqlite3")
    assert conn.execute("SELECT COUNT(*) FROM accounts WHERE kind = 'user'").fetchone()[0] == 64


@pytest.mark.asyncio
async def test_a_failing_transaction_changes_nothing_and_others_commit(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "bank.sqlite3"))

    def half_then_fail(tx: Tx) -> None:
        tx.create_account("ghost", "user", None, 0)
        raise ValueError("refused after a write")

    outcomes = await asyncio.gather(store.run(_insert("a")), store.run(half_then_fail), store.run(_insert("b")),
                                    return_exceptions=True)
    assert outcomes[0] == "a" and outcomes[2] == "b" and isinstance(outcomes[1], ValueError)
    assert store.run_sync(lambda tx: tx.account("ghost")) is None
    assert store.run_sync(lambda tx: tx.account("b")) is not None
    store.close()


def test_sync_survives_a_replaced_wal(tmp_path: Path) -> None:
    """SQLite deletes the WAL when the last connection closes; the sync reopens the new one."""
    path = tmp_path / "bank.sqlite3"
    store = Store(str(path))
    store.run_sync(_insert("before"))
    other = sqlite3.connect(path)
    other.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    other.close()
    store.run_sync(_insert("after"))
    assert store.run_sync(lambda tx: tx.account("after")) is not None
    store.close()


def test_a_closed_store_refuses(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "bank.sqlite3"))
    store.close()
    with pytest.raises(StoreError):
        store.run_sync(_insert("late"))
