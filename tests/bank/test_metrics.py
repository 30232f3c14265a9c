"""The journal totals of ``/metrics``: added up scrape by scrape, never by summing the whole journal."""

from __future__ import annotations

import asyncio

import pytest

from m2mpay.agents.bank.metrics import JournalTotals
from m2mpay.agents.bank.store import Store, Tx


def _rows(store: Store, *moves: tuple[int, str]) -> None:
    def write(tx: Tx) -> None:
        for amount, kind in moves:
            tx.transfer("outstanding", "world", amount, kind, None, 1)

    store.run_sync(write)


@pytest.mark.asyncio
async def test_each_read_counts_only_the_rows_written_since_the_last(db_url: str) -> None:
    store = Store(db_url, connections=2)
    try:
        totals = JournalTotals()
        assert await totals.read(store) == {}
        _rows(store, (3, "credit:settle"), (5, "withdraw"), (2, "credit:settle"))
        assert await totals.read(store) == {"credit:settle": 5, "withdraw": 5}
        first = totals.upto
        _rows(store, (7, "credit:lapse"), (1, "credit:settle"))
        assert await totals.read(store) == {"credit:settle": 6, "withdraw": 5, "credit:lapse": 7}
        assert totals.upto == first + 2
        # What was counted is not read again: a row changed behind the counter's back (the audit's
        # business, never the bank's) leaves the totals as they were.
        store.run_sync(lambda tx: tx.execute("UPDATE journal SET amount = 100 WHERE id = ?", (first,)))
        assert await totals.read(store) == {"credit:settle": 6, "withdraw": 5, "credit:lapse": 7}
    finally:
        store.close()


@pytest.mark.asyncio
async def test_a_row_of_a_transaction_still_running_is_counted_once_it_commits(pg_database: str) -> None:
    import psycopg

    store = Store(pg_database, connections=2)
    try:
        totals = JournalTotals()
        with psycopg.connect(pg_database, autocommit=True) as other:
            other.execute("BEGIN")
            other.execute("INSERT INTO journal (ts, debit, credit, amount, kind) VALUES (1, 'outstanding', 'world',"
                          " 4, 'withdraw')")  # takes the lower id, commits last
            _rows(store, (9, "credit:settle"))
            # The read waits for the open transaction (its lock timeout is 200 ms), then reports
            # what was final before: nothing is skipped for good.
            assert await totals.read(store) == {}
            other.execute("COMMIT")
        assert await asyncio.wait_for(totals.read(store), 5) == {"withdraw": 4, "credit:settle": 9}
    finally:
        store.close()
