"""The lapse sweep works off a backlog batch after batch, not one batch per interval."""

from __future__ import annotations

import os

from m2mpay.agents.bank.ledger import drive_sync
from m2mpay.agents.bank.operations import sweep
from m2mpay.agents.bank.store import Store, Tx
from m2mpay.protocol.rules.bank import BlockStatus, CoinRecord

NOW = 1_900_000_000


def _open_blocks(store: Store, count: int, deadline: int) -> list[bytes]:
    tips = [os.urandom(32) for _ in range(count)]

    def write(tx: Tx) -> None:
        tx.execute("INSERT INTO keysets (id, info) VALUES (?, ?)", ("k1", b"\xa0"))
        for tip in tips:
            tx.put_coin(CoinRecord(tip=tip, keyset="k1", n=100, token_value=1, position=97, last=tip,
                                   status=BlockStatus.OPEN, session=b"s" * 16, vendor="meter", account="meter",
                                   start=100, deadline=deadline), new=True)

    store.run_sync(write)
    return tips


def test_a_full_batch_is_followed_by_the_next_up_to_the_limit(db_url: str) -> None:
    store = Store(db_url, connections=2)
    try:
        _open_blocks(store, 7, NOW - 1)
        run = lambda step: store.run_sync(step.fn)  # noqa: E731
        assert drive_sync(sweep(NOW, batch=3, batches=2), run) == 6  # two full batches, then the limit
        assert drive_sync(sweep(NOW, batch=3, batches=2), run) == 1
        assert drive_sync(sweep(NOW, batch=3, batches=2), run) == 0
        assert store.run_sync(lambda tx: tx.open_blocks()) == 0
        credited = store.run_sync(lambda tx: tx.all("SELECT kind, SUM(amount) FROM journal GROUP BY kind"))
        assert [(str(k), int(v)) for k, v in credited] == [("credit:lapse", 21)]  # 3 tokens seen on each
    finally:
        store.close()


def test_blocks_not_yet_due_are_left_open(db_url: str) -> None:
    store = Store(db_url, connections=2)
    try:
        _open_blocks(store, 4, NOW)
        assert drive_sync(sweep(NOW - 1, batch=3), lambda step: store.run_sync(step.fn)) == 0
        assert store.run_sync(lambda tx: tx.open_blocks()) == 4
    finally:
        store.close()
