"""PostgreSQL's fast road shares a transaction among the requests that arrive together: what a
sibling must never see, cause or suffer."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import psycopg
import pytest

from m2mpay.agents.bank.fastroad import FastRoad
from m2mpay.agents.bank.postgresql import PgEngine
from m2mpay.agents.bank.store import Rows, Store, Tx
from m2mpay.protocol.envelope import StoredAnswer
from m2mpay.protocol.rules.bank import BlockStatus, CoinRecord


def _coin(tip: bytes, position: int = 100) -> CoinRecord:
    return CoinRecord(tip=tip, keyset="k1", n=100, token_value=1, position=position, last=tip, status=BlockStatus.OPEN,
                      session=b"s" * 16, vendor="meter", account="alice", start=100, deadline=2_000_000_000,
                      credited=0)


def _store(url: str, connections: int) -> Store:
    store = Store(url, connections=connections)
    if not store.run_sync(lambda tx: tx.all("SELECT id FROM keysets")):
        store.run_sync(lambda tx: tx.execute("INSERT INTO keysets (id, info) VALUES (?, ?)", ("k1", b"\xa0")))
    return store


@contextmanager
def _opened(url: str, connections: int) -> Iterator[Store]:
    store = _store(url, connections)
    try:
        yield store
    finally:
        store.close()


@pytest.fixture
def store_of_one(pg_database: str) -> Iterator[Store]:
    """One connection: whatever waits for it goes in the next group."""
    with _opened(pg_database, 1) as store:
        yield store


def _road(store: Store) -> FastRoad:
    engine = store.engine
    assert isinstance(engine, PgEngine)
    return engine.fast


def _insert(tip: bytes, seen: list[CoinRecord | None] | None = None, position: int = 100) -> Callable[[Tx], None]:
    def fn(tx: Tx) -> None:
        found = tx.coin(tip)
        if seen is not None:
            seen.append(found)
        if found is None:
            tx.put_coin(_coin(tip, position), new=True)
            tx.put_answer("meter", tip[:16], StoredAnswer(b"d" * 32, tip), 1)
    return fn


async def _until_waiting_for_a_lock(watch: psycopg.Connection[tuple[object, ...]], failure: str) -> None:
    """Until a statement of this database waits for a lock (within 10 s, else ``failure``)."""
    deadline = time.monotonic() + 10
    while watch.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                        " AND wait_event_type = 'Lock'").fetchone() == (0,):
        assert time.monotonic() < deadline, failure
        await asyncio.sleep(0.01)


def _count(store: Store, table: str) -> int:
    return int(store.run_sync(lambda tx: tx.all(f"SELECT count(*) FROM {table}"))[0][0])  # noqa: S608 - a literal


@pytest.mark.asyncio
async def test_requests_that_arrive_together_share_transactions_and_all_commit(pg_database: str) -> None:
    with _opened(pg_database, 2) as store:
        road = _road(store)
        tips = [os.urandom(32) for _ in range(40)]
        await asyncio.gather(*(store.run(_insert(tip), rows=Rows(coin=tip, answer=("meter", tip[:16])))
                               for tip in tips))
        assert _count(store, "coins") == 40 and _count(store, "answers") == 40
        assert road.requests == 40  # none decided twice
        assert road.groups <= 12  # 40 requests, 2 connections


@pytest.mark.asyncio
async def test_requests_for_one_coin_never_share_a_group_so_none_is_lost(pg_database: str) -> None:
    """Were two requests for one coin in one group, both would read the coin as it was before
    the group, and one of two debits would vanish."""
    with _opened(pg_database, 3) as store:
        tip = os.urandom(32)
        store.run_sync(lambda tx: tx.put_coin(_coin(tip, position=100), new=True))

        def step(tx: Tx) -> None:
            coin = tx.coin(tip)
            assert coin is not None
            tx.put_coin(dataclasses.replace(coin, position=coin.position - 1), new=False)

        others = [os.urandom(32) for _ in range(30)]
        work = [store.run(step, rows=Rows(coin=tip)) for _ in range(30)]
        work += [store.run(_insert(other), rows=Rows(coin=other, answer=("meter", other[:16]))) for other in others]
        random.Random(7).shuffle(work)
        await asyncio.gather(*work)
        coin = store.run_sync(lambda tx: tx.coin(tip))
        assert coin is not None and coin.position == 70
        assert _road(store).groups < _road(store).requests


@pytest.mark.asyncio
async def test_requests_for_one_stored_answer_never_share_a_group(pg_database: str) -> None:
    """Two requests with one request id and two coins: the second must find the first's answer."""
    with _opened(pg_database, 2) as store:
        seen: list[StoredAnswer | None] = []

        def claim(tip: bytes) -> Callable[[Tx], None]:
            def fn(tx: Tx) -> None:
                tx.coin(tip)
                answer = tx.answer("meter", b"k" * 16)
                seen.append(answer)
                if answer is None:
                    tx.put_coin(_coin(tip), new=True)
                    tx.put_answer("meter", b"k" * 16, StoredAnswer(b"d" * 32, tip), 1)
            return fn

        tips = [os.urandom(32) for _ in range(12)]
        await asyncio.gather(*(store.run(claim(tip), rows=Rows(coin=tip, answer=("meter", b"k" * 16)))
                               for tip in tips))
        assert seen.count(None) == 1 and len(seen) == 12  # no loser had to be retried
        assert _count(store, "coins") == 1


@pytest.mark.asyncio
async def test_a_failing_request_fails_alone_and_its_siblings_commit(store_of_one: Store) -> None:
    """A change the database refuses (a position beyond its column) fails its own request; the
    others of its transaction, rolled back with it, and the next transaction's, sent behind it
    and so never run, are done again and committed."""
    tips = [os.urandom(32) for _ in range(24)]  # 16 to a transaction: a second one sent behind
    bad = tips[5]
    work = [store_of_one.run(_insert(tip, position=2**31 if tip == bad else 100),
                             rows=Rows(coin=tip, answer=("meter", tip[:16]))) for tip in tips]
    outcomes = await asyncio.gather(*work, return_exceptions=True)
    assert isinstance(outcomes[5], psycopg.errors.NumericValueOutOfRange)
    assert all(o is None for i, o in enumerate(outcomes) if i != 5)
    assert _count(store_of_one, "coins") == 23 and store_of_one.run_sync(lambda tx: tx.coin(bad)) is None
    road = _road(store_of_one)
    assert road.requests > 24  # the siblings were decided again
    assert not road._busy_tips and not road._queue
    # The connection is whole: the next transaction on it commits.
    tip = os.urandom(32)
    await store_of_one.run(_insert(tip), rows=Rows(coin=tip, answer=("meter", tip[:16])))
    assert _count(store_of_one, "coins") == 24


@pytest.mark.asyncio
async def test_a_request_stuck_on_a_lock_holds_no_other_back(pg_database: str) -> None:
    """Another transaction holds a coin: the request for it waits, and one that arrives behind it
    for another coin is not kept waiting for the stuck transaction's connection."""
    with _opened(pg_database, 2) as store:
        held, free = os.urandom(32), os.urandom(32)
        store.run_sync(lambda tx: tx.put_coin(_coin(held), new=True))
        with psycopg.connect(pg_database, autocommit=True) as holder:
            holder.execute("BEGIN")
            holder.execute("SELECT 1 FROM coins WHERE tip = %s FOR UPDATE", (held,))
            stuck = asyncio.ensure_future(store.run(_insert(held), rows=Rows(coin=held)))
            await asyncio.sleep(0.1)
            await asyncio.wait_for(store.run(_insert(free), rows=Rows(coin=free)), 5)
            assert not stuck.done()
            holder.execute("COMMIT")
        await asyncio.wait_for(stuck, 5)
        assert _count(store, "coins") == 2


@pytest.mark.asyncio
async def test_a_race_lost_in_a_group_is_retried_and_its_siblings_commit(store_of_one: Store,
                                                                          pg_database: str) -> None:
    """Another connection inserts one of the group's new coins and commits while the group waits
    on it: that request is done again and finds the coin; the others are committed once."""
    tips = [os.urandom(32) for _ in range(6)]
    contested = tips[3]
    seen: list[CoinRecord | None] = []
    await store_of_one.run(_insert(os.urandom(32)), rows=Rows(coin=os.urandom(32)))  # connects
    with psycopg.connect(pg_database, autocommit=True) as other, psycopg.connect(pg_database, autocommit=True) as watch:
        other.execute("BEGIN")
        other.execute("INSERT INTO coins (tip, keyset, n, token_value, position, last, status, session, vendor,"
                      " account, start, deadline, credited) SELECT %s, keyset, n, token_value, 42, last, status,"
                      " session, vendor, account, start, deadline, credited FROM coins LIMIT 1", (contested,))
        work = [asyncio.ensure_future(store_of_one.run(_insert(tip, seen if tip == contested else None),
                                                       rows=Rows(coin=tip, answer=("meter", tip[:16]))))
                for tip in tips]
        await _until_waiting_for_a_lock(watch, "the group never waited for the other's insert")
        other.execute("COMMIT")
        assert await asyncio.wait_for(asyncio.gather(*work), 10) == [None] * 6
    assert seen[0] is None and seen[-1] is not None and seen[-1].position == 42
    assert _count(store_of_one, "coins") == 7 and _count(store_of_one, "answers") == 6  # the winner's has none


@pytest.mark.asyncio
async def test_two_bank_processes_on_shared_coins_never_deadlock(pg_database: str,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """Groups lock their coins in the order of their tips: two engines (as two bank processes)
    stepping the same eight coins in random orders never wait for each other in a cycle, which
    PostgreSQL would break only after its deadlock_timeout (a second)."""
    caplog.set_level(logging.DEBUG, logger="m2mpay.agents.bank.fastroad")
    first, second = _store(pg_database, 3), _store(pg_database, 3)
    try:
        tips = [os.urandom(32) for _ in range(8)]
        for tip in tips:
            first.run_sync(lambda tx, t=tip: tx.put_coin(_coin(t, position=1000), new=True))  # type: ignore[misc]

        def step(tip: bytes) -> Callable[[Tx], None]:
            def fn(tx: Tx) -> None:
                coin = tx.coin(tip)
                assert coin is not None
                tx.put_coin(dataclasses.replace(coin, position=coin.position - 1), new=False)
            return fn

        chooser = random.Random(11)
        work = [(first, second)[i % 2].run(step(tip), rows=Rows(coin=tip))
                for i, tip in enumerate(chooser.choice(tips) for _ in range(400))]
        started = time.monotonic()
        await asyncio.wait_for(asyncio.gather(*work), 60)
        elapsed = time.monotonic() - started
        positions = first.run_sync(lambda tx: [tx.coin(tip) for tip in tips])
        assert sum(1000 - c.position for c in positions if c is not None) == 400
        assert "DeadlockDetected" not in caplog.text, f"deadlocks in {elapsed:.1f} s"
    finally:
        first.close()
        second.close()


@pytest.mark.asyncio
async def test_connections_killed_mid_group_lose_nothing_and_the_road_recovers(pg_database: str) -> None:
    """The server ends the sessions (a restart) while a group waits for a lock: the requests
    whose COMMIT had not gone out are done again on new connections; any other gets an error;
    nothing stays busy, and whatever was answered is in the database."""
    with _opened(pg_database, 2) as store:
        road = _road(store)
        held = os.urandom(32)
        store.run_sync(lambda tx: tx.put_coin(_coin(held), new=True))
        tips = [os.urandom(32) for _ in range(40)] + [held]
        with psycopg.connect(pg_database, autocommit=True) as holder, \
                psycopg.connect(pg_database, autocommit=True) as admin:
            holder.execute("BEGIN")
            holder.execute("SELECT 1 FROM coins WHERE tip = %s FOR UPDATE", (held,))
            work = [asyncio.ensure_future(store.run(_insert(tip), rows=Rows(coin=tip, answer=("meter", tip[:16]))))
                    for tip in tips]
            await _until_waiting_for_a_lock(admin, "no group waited for the held coin")
            killed = admin.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                                   " WHERE datname = current_database() AND backend_type = 'client backend'"
                                   " AND pid NOT IN (pg_backend_pid(), %s)", (holder.info.backend_pid,)).fetchone()
            assert killed is not None and killed[0] >= 1
            await asyncio.sleep(0.1)  # the group that waited is queued again, and waits again
            assert not work[-1].done()
            holder.execute("COMMIT")
            outcomes = await asyncio.wait_for(asyncio.gather(*work, return_exceptions=True), 30)
        assert outcomes[-1] is None  # done again on a new connection once the coin was free
        assert all(o is None or isinstance(o, Exception) for o in outcomes)
        assert not road._busy_tips and not road._busy_answers and not road._queue
        for tip, outcome in zip(tips, outcomes, strict=True):
            if outcome is None:  # answered: in the database
                assert store.run_sync(lambda tx, t=tip: tx.coin(t)) is not None  # type: ignore[misc]
        await asyncio.gather(*(store.run(_insert(tip), rows=Rows(coin=tip, answer=("meter", tip[:16])))
                               for tip in tips))
        assert _count(store, "coins") == 41


@pytest.mark.asyncio
async def test_a_server_restart_between_requests_costs_no_request_an_error(pg_database: str) -> None:
    with _opened(pg_database, 2) as store:
        tips = [os.urandom(32) for _ in range(8)]
        await asyncio.gather(*(store.run(_insert(tip), rows=Rows(coin=tip)) for tip in tips[:4]))
        with psycopg.connect(pg_database, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database()"
                          " AND backend_type = 'client backend' AND pid <> pg_backend_pid()")
        await asyncio.sleep(0.05)
        await asyncio.gather(*(store.run(_insert(tip), rows=Rows(coin=tip)) for tip in tips[4:]))  # fast road
        assert _count(store, "coins") == 8  # and the general road's thread reconnected too


@pytest.mark.asyncio
async def test_a_signer_reusing_request_ids_across_coins_and_processes_causes_no_deadlock(
        pg_database: str, caplog: pytest.LogCaptureFixture) -> None:
    """A device with a valid certificate sends, to two bank processes at once, two requests under
    each of two request ids, for four coins, so that each process's group would insert the two
    stored answers in the opposite order (its coins' order). PostgreSQL would break each such
    cycle only after its deadlock_timeout, with the coins of both groups locked meanwhile: a
    stall a second long for every pair the device sends. Groups take their answers' locks
    first, in one order, so the second group waits for the first and then finds its answers."""
    caplog.set_level(logging.DEBUG, logger="m2mpay.agents.bank.fastroad")
    first, second = _store(pg_database, 1), _store(pg_database, 1)
    stored: list[StoredAnswer | None] = []
    ROUNDS = 60  # noqa: N806 - a constant of this test

    def claim(tip: bytes, req_id: bytes) -> Callable[[Tx], None]:
        def fn(tx: Tx) -> None:
            tx.coin(tip)
            answer = tx.answer("mallory", req_id)
            stored.append(answer)
            if answer is None:
                tx.put_coin(_coin(tip), new=True)
                tx.put_answer("mallory", req_id, StoredAnswer(b"d" * 32, tip), 1)
        return fn

    try:
        started = time.monotonic()
        for _ in range(ROUNDS):
            k1, k2 = os.urandom(16), os.urandom(16)
            low, high = (lambda: b"\x01" + os.urandom(31)), (lambda: b"\x02" + os.urandom(31))
            pairs = [(first, low(), k1), (first, high(), k2), (second, low(), k2), (second, high(), k1)]
            await asyncio.wait_for(asyncio.gather(*(
                store.run(claim(tip, key), rows=Rows(coin=tip, answer=("mallory", key)))
                for store, tip, key in pairs)), 30)
        elapsed = time.monotonic() - started
        assert "DeadlockDetected" not in caplog.text, f"deadlocks in {elapsed:.1f} s"
        # Each second group waited for the first's commit and found its answers: none was decided
        # twice (a lost race, retried), none inserted an answer.
        assert len(stored) == 4 * ROUNDS and stored.count(None) == 2 * ROUNDS
        assert _count(first, "answers") == 2 * ROUNDS  # one per request id
    finally:
        first.close()
        second.close()
