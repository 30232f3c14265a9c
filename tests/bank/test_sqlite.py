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
@pytest.mark.parametrize("group_commits", [False, True], ids=["alone", "grouped"])
async def test_a_failing_transaction_changes_nothing_and_others_commit(tmp_path: Path, group_commits: bool) -> None:
    store = Store(str(tmp_path / "bank.sqlite3"), group_commits=group_commits)

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


def _count(path: Path) -> int:
    """The user accounts another connection (another process) sees."""
    other = sqlite3.connect(path)
    try:
        return int(other.execute("SELECT COUNT(*) FROM accounts WHERE kind = 'user'").fetchone()[0])
    finally:
        other.close()


@pytest.mark.asyncio
async def test_grouped_transactions_share_one_commit_made_when_a_sync_needs_it(tmp_path: Path) -> None:
    path = tmp_path / "bank.sqlite3"
    store = Store(str(path), group_commits=True)
    engine = store.engine
    assert isinstance(engine, SqliteEngine)
    before = engine.commits
    results = [await store.run(_insert(f"user-{i}"), defer_sync=True) for i in range(16)]
    assert results == [f"user-{i}" for i in range(16)]
    assert engine.commits == before + 1  # one group, still open: nobody else sees it
    assert _count(path) == 0
    # A transaction that only reads what the group wrote gets the group's mark, not an older one
    mark = store.commits
    assert store.run_sync(lambda tx: tx.account("user-3")) is not None
    assert await store.run(lambda tx: tx.account("user-3"), defer_sync=True) is not None
    assert store.commits == mark
    await store.durable(mark)
    assert _count(path) == 16
    await store.run(_insert("later"))  # without defer_sync: committed and synced before it returns
    assert _count(path) == 17
    store.close()


def test_a_group_sqlite_rolled_back_as_a_whole_stops_the_store(tmp_path: Path) -> None:
    """SQLite ends the whole transaction on some errors (a full disk, an I/O error): the requests
    whose savepoints it held were answered from changes that are gone, so nothing may leave."""
    path = tmp_path / "bank.sqlite3"
    store = Store(str(path), group_commits=True)
    engine = store.engine
    assert isinstance(engine, SqliteEngine)

    def lost(tx: Tx) -> None:
        tx.execute("ROLLBACK")  # what SQLite itself does on SQLITE_FULL or SQLITE_IOERR
        raise sqlite3.OperationalError("database or disk is full")

    async def scene() -> None:
        await store.run(_insert("answered"), defer_sync=True)
        mark = store.commits
        with pytest.raises(sqlite3.OperationalError):
            await store.run(lost, defer_sync=True)
        with pytest.raises(StoreError):
            await store.durable(mark)
        with pytest.raises(StoreError):
            await store.run(_insert("next"), defer_sync=True)

    asyncio.run(scene())
    store.close()
    assert _count(path) == 0


def test_a_group_that_only_read_does_not_keep_the_write_lock(tmp_path: Path) -> None:
    path = tmp_path / "bank.sqlite3"
    store = Store(str(path), group_commits=True)
    asyncio.run(store.run(lambda tx: tx.account("nobody"), defer_sync=True))
    other = sqlite3.connect(path, timeout=0.1)  # another process writing: not locked out
    other.execute("BEGIN IMMEDIATE")
    other.execute("ROLLBACK")
    other.close()
    store.close()


def test_a_group_open_at_close_is_committed(tmp_path: Path) -> None:
    path = tmp_path / "bank.sqlite3"
    store = Store(str(path), group_commits=True)
    asyncio.run(store.run(_insert("kept"), defer_sync=True))
    store.close()
    assert _count(path) == 1
