"""The bank's database behind one small interface: SQLite (embedded default) or PostgreSQL.

Every change happens in :meth:`Store.run`, which calls a function with a :class:`Tx` inside one
database transaction and retries it when a concurrent transaction won a race (a unique key or a
serialization failure). A coin row is locked while it is checked and changed: ``SELECT … FOR
UPDATE`` on PostgreSQL; on SQLite ``BEGIN IMMEDIATE`` takes the database's single write lock.

SQLite (see :mod:`m2mpay.agents.bank.sqlite`) runs each transaction on the calling thread and makes
it durable with a WAL sync shared by the requests in flight; no answer leaves before its commit is
on disk. PostgreSQL (see :mod:`m2mpay.agents.bank.postgresql`) runs a request that names the rows it
reads (:class:`Rows`) in two round trips on the event loop, and anything else on a pool of
threads with a connection each; the server groups the commits that arrive together.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from m2mpay.protocol.envelope import StoredAnswer
from m2mpay.protocol.rules.bank import CoinRecord

from .ledger import Rows
from .postgresql import Book, NotFetched, PgEngine
from .schema import DIALECTS, MIGRATIONS, SYSTEM_ACCOUNTS, statements
from .sqlite import SqliteEngine, StoreError
from .tx import Tx, _Fetched

__all__ = ["Rows", "Store", "StoreError", "Tx"]

T = TypeVar("T")


class _BufferedTx(Tx):
    """A transaction on PostgreSQL's fast road: it reads only the rows fetched for it and collects
    its changes into one :class:`~m2mpay.agents.bank.postgresql.Book`; anything else is
    :class:`~m2mpay.agents.bank.postgresql.NotFetched`, and the transaction goes the general road."""

    def __init__(self, fetched: _Fetched, *, writable: bool) -> None:
        super().__init__(None, "postgresql", fetched)  # never runs SQL: the dialect is moot
        self._writable = writable
        self._coin: tuple[Any, ...] | None = None
        self._new = False
        self._journal: list[tuple[Any, ...]] = []
        self._answer: tuple[Any, ...] | None = None

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        raise NotFetched(sql[:60])

    def _check_writable(self) -> None:
        if not self._writable:
            raise NotFetched("a change outside a transaction")

    def put_coin(self, record: CoinRecord, *, new: bool) -> None:
        self._check_writable()
        if self._coin is not None and self._coin[0] != record.tip:
            raise NotFetched("a second coin")
        if self._coin is None:
            self._new = new
        self._coin = (record.tip, record.keyset, record.n, record.token_value, record.position, record.last,
                      record.status.value, record.session, record.vendor, record.account, record.start,
                      record.deadline, record.credited)

    def transfer(self, debit: str, credit: str, amount: int, kind: str, ref: bytes | None, now: int,
                 *, running: tuple[str, ...] = ()) -> None:
        if amount <= 0:
            return
        self._check_writable()
        if debit in running or credit in running:
            raise NotFetched("a running balance")
        self._journal.append((now, debit, credit, amount, kind, ref))

    def put_answer(self, signer: str, req_id: bytes, stored: StoredAnswer, now: int) -> None:
        self._check_writable()
        if self._answer is not None:
            raise NotFetched("a second answer")
        self._answer = (signer, req_id, stored.digest, stored.answer, now)

    def book(self) -> Book | None:
        if self._coin is None and not self._journal and self._answer is None:
            return None
        return Book(coin=self._coin, new=self._new, journal=tuple(self._journal), answer=self._answer)


class _SqliteRoad:
    """Transactions on SQLite: on the caller's thread, made durable by a shared WAL sync."""

    def __init__(self, engine: SqliteEngine) -> None:
        self.engine = engine

    def run_sync(self, fn: Callable[[Tx], T]) -> T:
        result, commit = self.engine.transaction(lambda conn: fn(Tx(conn, "sqlite")))
        self.engine.sync(commit)
        return result

    async def run(self, fn: Callable[[Tx], T], *, defer_sync: bool, rows: Rows | None) -> T:
        # Each statement costs a few µs in the process: fetching the rows ahead saves nothing
        # measurable here, so SQLite runs ``fn`` as it is (``rows`` is for PostgreSQL).
        result, commit = self.engine.transaction(lambda conn: fn(Tx(conn, "sqlite")))
        if not defer_sync:
            await self.engine.durable(commit)
        return result

    def run_now(self, fn: Callable[[Tx], T]) -> T:
        result, _commit = self.engine.transaction(lambda conn: fn(Tx(conn, "sqlite")))
        return result

    def flush(self) -> None:
        self.engine.sync(self.engine.commits)

    @property
    def commits(self) -> int:
        return self.engine.commits

    async def durable(self, mark: int) -> None:
        await self.engine.durable(mark)

    def close(self) -> None:
        self.engine.close()


class _PgRoad:
    """Transactions on PostgreSQL: the fast road when the rows are named, else the general one.

    Commits are durable when they return, so there is nothing to flush nor to wait for.
    """

    def __init__(self, engine: PgEngine) -> None:
        self.engine = engine

    def run_sync(self, fn: Callable[[Tx], T]) -> T:
        return self.engine.run_sync(lambda conn: fn(Tx(conn, "postgresql")))

    async def run(self, fn: Callable[[Tx], T], *, defer_sync: bool, rows: Rows | None) -> T:
        if rows is not None:

            def decide(row: tuple[Any, ...]) -> tuple[T, Book | None]:
                tx = _BufferedTx(_Fetched.from_row(rows, row), writable=rows.coin is not None)
                return fn(tx), tx.book()

            try:
                return await self.engine.fetched(rows.fetch(), decide)
            except NotFetched:
                pass  # nothing was changed: the general road below does it all
        return await self.engine.run(lambda conn: fn(Tx(conn, "postgresql")))

    def flush(self) -> None:
        pass

    @property
    def commits(self) -> int:
        return 0

    async def durable(self, mark: int) -> None:
        pass

    def close(self) -> None:
        self.engine.close()


class Store:
    """A bank database. ``url`` is a SQLite file path (or ``sqlite:///path``, or ``:memory:`` for
    tests) or ``postgresql://…``. ``group_commits``: on SQLite, the transactions between two syncs
    share one commit (for the one process that serves a SQLite bank: see
    :mod:`~m2mpay.agents.bank.sqlite`)."""

    def __init__(self, url: str, *, connections: int = 1, group_commits: bool = False) -> None:
        self.url = url
        self.dialect = "postgresql" if url.startswith(("postgresql://", "postgres://")) else "sqlite"
        self._road: _SqliteRoad | _PgRoad = (_PgRoad(PgEngine(url, connections)) if self.dialect == "postgresql"
                                             else _SqliteRoad(SqliteEngine(url.removeprefix("sqlite:///"),
                                                                       group_commits=group_commits)))
        self.run_sync(_migrate)

    @property
    def engine(self) -> SqliteEngine | PgEngine:
        """The engine underneath (for measurements: commits, syncs, round trips)."""
        return self._road.engine

    def run_sync(self, fn: Callable[[Tx], T]) -> T:
        """Run ``fn`` in one transaction and wait until it is durable (for commands, not the event loop)."""
        return self._road.run_sync(fn)

    @property
    def runs_inline(self) -> bool:
        """Whether :meth:`run_now` works here: SQLite runs a transaction on the caller's thread."""
        return isinstance(self._road, _SqliteRoad)

    def run_now(self, fn: Callable[[Tx], T]) -> T:
        """:meth:`run` with ``defer_sync``, without an event loop's turn: on SQLite only
        (:attr:`runs_inline`), where nothing in a transaction waits. Call :meth:`flush` (or await
        :meth:`durable`) before anything it returned leaves the process."""
        if not isinstance(self._road, _SqliteRoad):
            raise TypeError("run_now is for SQLite: PostgreSQL waits for its server")
        return self._road.run_now(fn)

    async def run(self, fn: Callable[[Tx], T], *, defer_sync: bool = False, rows: Rows | None = None) -> T:
        """Run ``fn`` in one transaction; return once it is durable.

        With ``defer_sync`` it returns as soon as the transaction has committed, and the
        caller must call :meth:`flush` before anything it returned leaves the process: the
        bank's server handles the requests that arrived together and then makes all their
        commits durable with one ``fdatasync``, on its own thread, without any hand-over.

        ``rows`` says what ``fn`` reads first (and locks). On PostgreSQL ``fn`` then runs on the
        event loop between two round trips; when it reads or changes anything else it is run
        again from the start on the general road, so it must change nothing but the database.
        """
        return await self._road.run(fn, defer_sync=defer_sync, rows=rows)

    def flush(self) -> None:
        """Make every commit so far durable (SQLite: one ``fdatasync`` if any is pending)."""
        self._road.flush()

    @property
    def commits(self) -> int:
        """A mark for :meth:`durable`: the commits so far."""
        return self._road.commits

    async def durable(self, mark: int) -> None:
        """Wait, on the sync thread, until the commits up to ``mark`` are on disk (shared by all waiters)."""
        await self._road.durable(mark)

    def close(self) -> None:
        """Close every connection and stop the threads."""
        self._road.close()


def _migrate(tx: Tx) -> None:
    """Apply the migrations this database has not seen, in order."""
    tx.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    row = tx.one("SELECT MAX(version) FROM schema_version")
    current = 0 if row is None or row[0] is None else int(row[0])
    dialect = tx.dialect
    for version, script in MIGRATIONS:
        if version <= current:
            continue
        text = script.format(**DIALECTS[dialect]) if isinstance(script, str) else script[dialect]
        for statement in statements(text):
            tx.execute(statement)
        tx.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
    for name in SYSTEM_ACCOUNTS:
        if tx.account(name) is None:
            tx.create_account(name, "system", None, int(time.time()))
