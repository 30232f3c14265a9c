"""The store on both databases: migrations, and PostgreSQL's two-round-trip road and its fallback."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from m2mpay.agents.bank import store as store_module
from m2mpay.agents.bank.exchange_rows import put_withdrawn, signed_keysets
from m2mpay.agents.bank.postgresql import PgEngine
from m2mpay.agents.bank.schema import MIGRATIONS, statements
from m2mpay.agents.bank.store import Rows, Store, Tx
from m2mpay.protocol.envelope import StoredAnswer
from m2mpay.protocol.errors import ErrorCode, RemoteProtocolError
from m2mpay.protocol.rules.bank import BlockStatus, CoinRecord


def _coin(tip: bytes, position: int = 100) -> CoinRecord:
    return CoinRecord(tip=tip, keyset="k1", n=100, token_value=1, position=position, last=tip, status=BlockStatus.OPEN,
                      session=b"s" * 16, vendor="meter", account="alice", start=100, deadline=2_000_000_000,
                      credited=0)


def _keyset(tx: Tx) -> None:
    tx.execute("INSERT INTO keysets (id, info) VALUES (?, ?)", ("k1", b"\xa0"))


def test_statements_keep_function_bodies_whole() -> None:
    assert statements("A; B $$ x; y $$; C;") == ["A", "B $$ x; y $$", "C"]


@pytest.mark.parametrize("upgrade", [True, False], ids=["upgraded", "fresh"])
def test_migrations_on_both_databases(db_url: str, upgrade: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if upgrade:  # a bank created before the last migration, opened by this version
        with monkeypatch.context() as old:
            old.setattr(store_module, "MIGRATIONS", MIGRATIONS[:-1])
            Store(db_url).close()
    store = Store(db_url)
    try:
        versions = store.run_sync(lambda tx: [r[0] for r in tx.all("SELECT version FROM schema_version ORDER BY 1")])
        assert versions == [v for v, _ in MIGRATIONS]
        assert versions == list(range(1, len(MIGRATIONS) + 1))  # numbered, none skipped
        store.run_sync(_keyset)
        tip = os.urandom(32)

        def book(tx: Tx) -> CoinRecord | None:
            assert tx.coin(tip) is None and tx.answer("meter", b"r" * 16) is None and not tx.vendor_revoked("meter")
            tx.put_coin(_coin(tip), new=True)
            tx.transfer("outstanding", "meter", 3, "credit:settle", tip, 1)
            tx.transfer("outstanding", "meter", 2, "credit:lapse", tip, 1)
            tx.put_answer("meter", b"r" * 16, StoredAnswer(b"d" * 32, b"answer"), 1)
            return tx.coin(tip)

        asyncio.run(store.run(book, rows=Rows(coin=tip, answer=("meter", b"r" * 16), vendor="meter")))
        assert store.run_sync(lambda tx: tx.coin(tip)) == _coin(tip)
        assert store.run_sync(lambda tx: tx.answer("meter", b"r" * 16)) == StoredAnswer(b"d" * 32, b"answer")
        journal = store.run_sync(lambda tx: tx.all("SELECT amount, kind, ref FROM journal ORDER BY id"))
        assert [(r[0], r[1], bytes(r[2])) for r in journal] == [(3, "credit:settle", tip), (2, "credit:lapse", tip)]
        # Migration 7: a withdrawal's blinded messages, found by the lookup restores and replays use.
        signed = [b"m" * 256, b"n" * 256]
        store.run_sync(lambda tx: put_withdrawn(tx, account="alice", req_id=b"q" * 16, keyset="k1", blinded=signed))
        asked = [*signed, b"o" * 256]
        assert store.run_sync(lambda tx: signed_keysets(tx, asked)) == {(m, "k1") for m in signed}
    finally:
        store.close()


@pytest.fixture
def pg_store(pg_database: str) -> Iterator[Store]:
    store = Store(pg_database, connections=4)
    store.run_sync(_keyset)
    try:
        yield store
    finally:
        store.close()


@pytest.mark.asyncio
async def test_a_spend_is_two_round_trips_and_a_read_one(pg_store: Store) -> None:
    tip = os.urandom(32)
    engine = pg_store.engine
    assert isinstance(engine, PgEngine)

    def block(tx: Tx) -> None:
        assert tx.coin(tip) is None and tx.answer("meter", b"b" * 16) is None and not tx.vendor_revoked("meter")
        tx.put_coin(_coin(tip), new=True)
        tx.put_answer("meter", b"b" * 16, StoredAnswer(b"d" * 32, b"blocked"), 1)

    await pg_store.run(block, rows=Rows(coin=tip, answer=("meter", b"b" * 16), vendor="meter"))  # connects
    before = engine.round_trips
    assert await pg_store.run(lambda tx: tx.answer("meter", b"b" * 16), rows=Rows(answer=("meter", b"b" * 16))) \
        == StoredAnswer(b"d" * 32, b"blocked")
    assert engine.round_trips - before == 1
    before = engine.round_trips

    def settle(tx: Tx) -> None:
        tx.put_coin(_coin(tip, position=90), new=False)
        tx.transfer("outstanding", "meter", 10, "credit:settle", tip, 1)
        tx.put_answer("meter", b"s" * 16, StoredAnswer(b"d" * 32, b"settled"), 1)

    await pg_store.run(settle, rows=Rows(coin=tip, answer=("meter", b"s" * 16), vendor="meter"))
    assert engine.round_trips - before == 2
    assert pg_store.run_sync(lambda tx: tx.coin(tip)) == _coin(tip, position=90)


@pytest.mark.asyncio
async def test_a_twin_waits_for_the_lock_then_reads_the_answer_committed_meanwhile(pg_store: Store,
                                                                                   pg_database: str) -> None:
    """The coin is locked before the stored answer is read, and that read sees what the holder
    of the lock committed while this one waited (a new snapshot after the wait)."""
    tip = os.urandom(32)
    pg_store.run_sync(lambda tx: tx.put_coin(_coin(tip), new=True))
    with psycopg.connect(pg_database, autocommit=True) as other, psycopg.connect(pg_database, autocommit=True) as watch:
        other.execute("BEGIN")
        other.execute("SELECT 1 FROM coins WHERE tip = %s FOR UPDATE", (tip,))
        other.execute("INSERT INTO answers (signer, req_id, digest, answer, created) VALUES (%s, %s, %s, %s, 1)",
                      ("meter", b"t" * 16, b"d" * 32, b"first"))

        def twin(tx: Tx) -> StoredAnswer | None:
            tx.coin(tip)
            return tx.answer("meter", b"t" * 16)

        task = asyncio.create_task(pg_store.run(twin, rows=Rows(coin=tip, answer=("meter", b"t" * 16))))
        deadline = time.monotonic() + 10
        while watch.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                            " AND wait_event_type = 'Lock'").fetchone()[0] == 0:  # type: ignore[index]
            assert time.monotonic() < deadline, "the twin never waited for the lock"
            await asyncio.sleep(0.01)
        assert not task.done()
        other.execute("COMMIT")
        assert await asyncio.wait_for(task, 10) == StoredAnswer(b"d" * 32, b"first")


@pytest.mark.asyncio
async def test_what_was_not_fetched_goes_the_general_road(pg_store: Store) -> None:
    tip = os.urandom(32)
    engine = pg_store.engine
    assert isinstance(engine, PgEngine)

    def needs_more(tx: Tx) -> int:
        tx.coin(tip)  # fetched, locked
        tx.put_coin(_coin(tip), new=True)
        account = tx.account("outstanding", lock=True)  # not fetched: done again on a thread
        assert account is not None
        return account[2]

    assert await pg_store.run(needs_more, rows=Rows(coin=tip)) == 0
    assert pg_store.run_sync(lambda tx: tx.coin(tip)) == _coin(tip)  # once, by the general road
    # A change without a coin to lock has no transaction on the fast road: the general one.
    await pg_store.run(lambda tx: tx.put_answer("meter", b"x" * 16, StoredAnswer(b"d" * 32, b"a"), 1),
                       rows=Rows(answer=("meter", b"x" * 16)))
    assert pg_store.run_sync(lambda tx: tx.answer("meter", b"x" * 16)) is not None


@pytest.mark.asyncio
async def test_a_refusal_changes_nothing_and_the_connection_serves_the_next(pg_store: Store) -> None:
    tip = os.urandom(32)

    def refuse(tx: Tx) -> None:
        tx.put_coin(_coin(tip), new=True)
        raise RemoteProtocolError("no", ErrorCode.COIN_BLOCKED)

    for _ in range(6):  # more than the pool's connections: each is reused after its refusal
        with pytest.raises(RemoteProtocolError):
            await pg_store.run(refuse, rows=Rows(coin=tip))
    assert pg_store.run_sync(lambda tx: tx.coin(tip)) is None
    await pg_store.run(lambda tx: tx.put_coin(_coin(tip), new=True), rows=Rows(coin=tip))
    assert pg_store.run_sync(lambda tx: tx.coin(tip)) == _coin(tip)


@pytest.mark.asyncio
async def test_a_lost_race_is_retried_and_sees_the_winner(pg_store: Store) -> None:
    """Two transactions insert the same new coin at once: one wins, the other is done again and
    then finds the coin (the unique key is the arbiter, as on the general road)."""
    tip = os.urandom(32)
    seen: list[CoinRecord | None] = []

    def insert(tx: Tx) -> None:
        found = tx.coin(tip)
        seen.append(found)
        if found is None:
            tx.put_coin(_coin(tip), new=True)

    await asyncio.gather(*(pg_store.run(insert, rows=Rows(coin=tip)) for _ in range(4)))
    assert seen.count(None) >= 1 and seen[-1] == _coin(tip)
    assert pg_store.run_sync(lambda tx: tx.all("SELECT count(*) FROM coins"))[0][0] == 1


def test_commits_are_synchronous_even_where_the_server_default_is_off(pg_database: str, tmp_path: Path) -> None:
    name = pg_database.rsplit("/", 1)[1]
    with psycopg.connect(pg_database, autocommit=True) as admin:
        admin.execute(f'ALTER DATABASE "{name}" SET synchronous_commit = off')
    store = Store(pg_database)
    try:
        assert store.run_sync(lambda tx: tx.one("SHOW synchronous_commit")) == ("on",)
    finally:
        store.close()


@pytest.mark.asyncio
async def test_wire_parameters_and_results_survive_quotes_backslashes_and_nulls(pg_database: str) -> None:
    from m2mpay.agents.bank.pgwire import BYTEA, BYTEA_ARRAY, INT8, INT8_ARRAY, TEXT, TEXT_ARRAY, Wire

    conn = await psycopg.AsyncConnection.connect(pg_database, autocommit=True)
    wire = Wire(conn.pgconn, owner=conn)
    try:
        sql = ("SELECT $1 = ARRAY['a\"b', 'c\\d', NULL, '{x,y}'], $2 = ARRAY['\\x00ff22'::bytea, NULL],"
               " $3 = ARRAY[1, -2, 9007199254740993]::bigint[], $4, $5, $6")
        await wire.prepare({b"t": (sql, (TEXT_ARRAY, BYTEA_ARRAY, INT8_ARRAY, BYTEA, TEXT, INT8))})
        texts = ['a"b', "c\\d", None, "{x,y}"]
        (rows,) = await wire.round_trip((b"t", (texts, [b"\x00\xff\x22", None], [1, -2, 2**53 + 1], b"\x00'\\",
                                                "é'\"", -(2**62))))
        assert rows == [(True, True, True, b"\x00'\\", "é'\"", -(2**62))]
        with pytest.raises(psycopg.errors.DivisionByZero):
            await wire.prepare({b"z": ("SELECT 1 / $1", (INT8,))})
            await wire.round_trip((b"z", (0,)))
        assert wire.idle  # an error outside a transaction leaves the connection usable
        assert (await wire.round_trip((b"z", (2,)))) == [[(0,)]]
    finally:
        wire.close()


@pytest.mark.asyncio
async def test_cancelled_requests_leave_the_pool_whole(pg_database: str) -> None:
    """Requests cancelled while they wait for a connection, or after their group's first half
    was sent, neither leak a connection nor leave a coin busy or a lock behind."""
    store = Store(pg_database, connections=2)
    engine = store.engine
    assert isinstance(engine, PgEngine)
    try:
        store.run_sync(_keyset)
        tips = [os.urandom(32) for _ in range(60)]

        def insert(tip: bytes) -> Callable[[Tx], None]:
            def fn(tx: Tx) -> None:
                if tx.coin(tip) is None:
                    tx.put_coin(_coin(tip), new=True)
            return fn

        tasks = [asyncio.create_task(store.run(insert(tip), rows=Rows(coin=tip))) for tip in tips]
        for round_ in range(6):
            await asyncio.sleep(0.002 * round_)
            for task in tasks[round_::7]:
                task.cancel()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(o is None or isinstance(o, asyncio.CancelledError) for o in outcomes)
        road = engine.fast
        for _ in range(50):  # groups whose requests were cancelled finish in the background
            if not road._tasks:
                break
            await asyncio.sleep(0.02)
        assert not road._tasks and not road._queue and not road._busy_tips and road._opened <= 2
        # Every coin can be locked again at once: nothing was left holding a lock.
        done = sum(1 for o in outcomes if o is None)
        for tip in tips:
            await asyncio.wait_for(store.run(insert(tip), rows=Rows(coin=tip)), 5)
        count = store.run_sync(lambda tx: tx.all("SELECT count(*) FROM coins"))[0][0]
        assert count == len(tips) and done > 0
    finally:
        store.close()


def test_races_are_recognised_by_class_not_by_name() -> None:
    """Only psycopg's own classes for the three SQLSTATEs of a lost race are retried: an
    exception that merely carries one of their names is not."""
    from psycopg import errors

    from m2mpay.agents.bank.postgresql import is_race

    assert [is_race(errors.lookup(state)("x")) for state in ("23505", "40001", "40P01", "23503", "57014")] == [
        True, True, True, False, False]
    impostor = type("UniqueViolation", (Exception,), {})
    assert is_race(impostor("x")) is False
