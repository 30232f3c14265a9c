"""PostgreSQL for the bank: requests in shared transactions, on connections of the event loop.

A bank request is a locked read, the core's pure rules in Python, then a few writes. Sent one
statement at a time, as the DB-API does, that was nine round trips per request, each on a thread
that must win the GIL back from a busy event loop before it can send the next one. So the
requests that say what they read (:meth:`PgEngine.fetched`) take another road, with no thread
(:mod:`m2mpay.agents.bank.fastroad`): ``m2mpay_rows(tip, signer, req_id, vendor)`` locks the coin
and reads the stored answer and whether the vendor is revoked; the rules run on the event loop
against those rows, collecting their writes; ``m2mpay_book(…)`` applies them (the coin, its
journal rows, the stored answer). Requests that arrive while every connection is busy share a
transaction, up to sixteen of them: two round trips, one ``COMMIT`` and one WAL flush for
them all. The two functions come from migration 4 and are prepared once per connection
(:mod:`m2mpay.agents.bank.pgwire` drives the connections).

A read that was not fetched up front cannot be answered on this road: the request gets
:class:`NotFetched`, changes nothing, and is done again on the general road, one thread per
connection from a pool and any SQL. Withdrawals, admin commands and the audit use that road.

Commits are durable before they return: every connection runs with ``synchronous_commit`` on
(turned on if the server's default is off). PostgreSQL groups the WAL flushes of the commits
that arrive together from several connections, so the requests in flight share fsyncs here too.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from .fastroad import ANSWERS, BOOK, ROWS, FastRoad

if TYPE_CHECKING:  # psycopg is optional: imported only where a PostgreSQL store connects
    from .pgwire import Wire

__all__ = ["Book", "NotFetched", "PgEngine", "is_lock_timeout", "is_race"]

log = logging.getLogger(__name__)
T = TypeVar("T")
RETRIES = 8

_DURABLE = ("SELECT current_setting('synchronous_commit'), CASE WHEN current_setting('synchronous_commit') = 'off'"
            " THEN set_config('synchronous_commit', 'on', false) END")
"""Every connection's first statement: the bank answers only what is on disk, so commits wait
for the WAL flush even where the server's default says they need not (``local`` and the remote
levels are at least that already, and are kept)."""


def _statements() -> dict[bytes, tuple[str, tuple[int, ...]]]:
    """The fast road's three statements, prepared on each of its connections (see agents.bank.pgwire)."""
    from .pgwire import BOOL, BYTEA, BYTEA_ARRAY, INT4, INT8, INT8_ARRAY, TEXT, TEXT_ARRAY

    book = (BOOL, BYTEA, TEXT, INT4, INT8, INT4, BYTEA, TEXT, BYTEA, TEXT, TEXT, INT4, INT8, INT4,
            INT8_ARRAY, TEXT_ARRAY, TEXT_ARRAY, INT8_ARRAY, TEXT_ARRAY, BYTEA_ARRAY,
            TEXT, BYTEA, BYTEA, BYTEA, INT8)
    # The advisory locks are taken in the order of the array, which the fast road sorts.
    return {ANSWERS: ("SELECT count(pg_advisory_xact_lock(k)) FROM unnest($1::int8[]) AS k", (INT8_ARRAY,)),
            ROWS: ("SELECT * FROM m2mpay_rows($1, $2, $3, $4)", (BYTEA, TEXT, BYTEA, TEXT)),
            BOOK: ("SELECT FROM m2mpay_book(" + ", ".join(f"${i + 1}" for i in range(len(book))) + ")", book)}


class NotFetched(Exception):  # a signal between the store's two roads, not an error
    """The transaction needs a row, or makes a change, beyond what was fetched for it."""


@dataclass(frozen=True, slots=True)
class Book:
    """The changes of one transaction on the fast road: what ``m2mpay_book`` applies.

    ``coin`` is the coin row's values in column order, tip first, with ``new`` saying insert or
    update; ``journal`` rows are ``(ts, debit, credit, amount, kind, ref)``; ``answer`` is
    ``(signer, req_id, digest, answer, created)``.
    """

    coin: tuple[Any, ...] | None = None
    new: bool = False
    journal: tuple[tuple[Any, ...], ...] = ()
    answer: tuple[Any, ...] | None = None

    def params(self) -> tuple[Any, ...]:
        coin = self.coin or (None,) * 13
        columns: list[tuple[Any, ...]] = list(zip(*self.journal, strict=True)) if self.journal else [()] * 6
        answer = self.answer or (None,) * 5
        return (None if self.coin is None else self.new, *coin, *(list(c) for c in columns), *answer)


def is_race(exc: BaseException) -> bool:
    """Whether ``exc`` says a concurrent transaction won (retrying will see what it did).

    psycopg is imported here, not at the top: only a PostgreSQL store reaches this, and a SQLite
    bank need not have psycopg installed.
    """
    from psycopg import errors

    return isinstance(exc, errors.UniqueViolation | errors.SerializationFailure | errors.DeadlockDetected)


def is_lock_timeout(exc: BaseException) -> bool:
    """Whether ``exc`` says a lock was not had within the transaction's ``lock_timeout``."""
    from psycopg import errors  # optional, as in is_race

    return isinstance(exc, errors.LockNotAvailable)


class PgEngine:
    """Connections to one PostgreSQL database: ``connections`` on the event loop for the fast
    road, and up to ``connections`` threads, each with its own, for the general one."""

    def __init__(self, url: str, connections: int) -> None:
        self._url = url
        self._threads = ThreadPoolExecutor(max_workers=connections, thread_name_prefix="bank-db")
        self._local = threading.local()
        self._sync_conns: list[Any] = []
        self._guard = threading.Lock()
        self._closed = False
        self.fast = FastRoad(url, connections, _connect_async)
        """The fast road's connections: requests grouped into transactions on the event loop."""

    # --- the general road: any SQL, a thread per connection -------------------------------
    def _sync_connection(self) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is not None and not conn.broken:
            return conn
        if conn is not None:  # the server ended the session (a restart): this thread opens another
            with self._guard:
                self._sync_conns.remove(conn)
            conn.close()
        try:
            import psycopg  # optional: only PostgreSQL deployments need it

            conn = psycopg.connect(self._url, autocommit=True)
            _durable(conn.execute(_DURABLE).fetchone())
        except Exception as exc:
            from .sqlite import StoreError

            raise StoreError("cannot open the bank database (postgresql)") from exc
        self._local.conn = conn
        with self._guard:
            self._sync_conns.append(conn)
        return conn

    def transaction(self, fn: Callable[[Any], T]) -> T:
        """Run ``fn(conn)`` in one transaction on this thread, again when it lost a race.

        A connection the server closed while it was idle is replaced before anything is sent on
        it; one that fails during the transaction fails the transaction (nothing is known of it).
        """
        for attempt in range(RETRIES):
            conn = self._sync_connection()
            try:
                conn.execute("BEGIN")
            except Exception:
                if not conn.broken:
                    raise
                conn = self._sync_connection()  # it had died while idle: nothing was done
                conn.execute("BEGIN")
            try:
                result = fn(conn)
                conn.execute("COMMIT")
                return result
            except BaseException as exc:
                if conn.broken:
                    raise
                conn.execute("ROLLBACK")
                if not is_race(exc) or attempt == RETRIES - 1:
                    raise
                log.debug("transaction lost a race (%s), retrying", type(exc).__name__)
                time.sleep(0.001 * (attempt + 1))
        raise AssertionError("unreachable")

    def _pool(self) -> ThreadPoolExecutor:
        if self._closed:
            from .sqlite import StoreError

            raise StoreError("the store is closed")
        return self._threads

    def run_sync(self, fn: Callable[[Any], T]) -> T:
        return self._pool().submit(self.transaction, fn).result()

    async def run(self, fn: Callable[[Any], T]) -> T:
        return await asyncio.wrap_future(self._pool().submit(self.transaction, fn))

    # --- the fast road: requests grouped into transactions, on the event loop -------------
    async def fetched(self, fetch: Fetch, decide: Callable[[tuple[Any, ...]], tuple[T, Book | None]]) -> T:
        """``decide(row)`` on the row of ``m2mpay_rows(*fetch)``, then its :class:`Book`, committed.

        With a coin to lock (``fetch[0]``) this is part of one transaction of two round trips,
        shared with other requests (:mod:`~m2mpay.agents.bank.fastroad`); without, ``decide``
        must not change anything. Raises :class:`NotFetched` (nothing done) when ``decide``
        needs the general road.
        """
        result: T = await self.fast.fetched(fetch, decide)  # it refuses once the store is closed
        return result

    @property
    def round_trips(self) -> int:
        """Round trips on the fast road so far."""
        return self.fast.round_trips

    def close(self) -> None:
        """Close every connection and stop the threads."""
        if self._closed:
            return
        self._closed = True

        def close_all() -> None:
            with self._guard:
                for conn in self._sync_conns:
                    conn.close()
                self._sync_conns.clear()

        self.fast.close()
        self._threads.submit(close_all).result()
        self._threads.shutdown(wait=True)


Fetch = tuple[bytes | None, str | None, bytes | None, str | None]
"""``m2mpay_rows``' parameters: the coin to lock, the stored answer's key, the vendor."""


async def _connect_async(url: str) -> Wire:
    """A connection for the fast road: opened by psycopg, then driven by :class:`Wire`."""
    try:
        import psycopg

        from .pgwire import Wire

        conn = await psycopg.AsyncConnection.connect(url, autocommit=True)
        cursor = await conn.execute(_DURABLE)
        _durable(await cursor.fetchone())
        wire = Wire(conn.pgconn, owner=conn)
        await wire.prepare(_statements())
        return wire
    except Exception as exc:
        from .sqlite import StoreError

        raise StoreError("cannot open the bank database (postgresql)") from exc


_warned = False


def _durable(setting: Sequence[Any] | None) -> None:
    """Say once per process that the server's default would have made commits asynchronous."""
    global _warned  # noqa: PLW0603 - one warning per process, not one per connection
    if setting is not None and setting[0] == "off" and not _warned:
        _warned = True
        log.warning("the database has synchronous_commit = off; the bank's connections turn it on")
