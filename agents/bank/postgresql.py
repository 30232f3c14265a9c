"""PostgreSQL for the bank: a request in two round trips, on connections of the event loop.

A bank request is a locked read, the core's pure rules in Python, then a few writes. Sent one
statement at a time, as the DB-API does, that was nine round trips per request, each on a thread
that must win the GIL back from a busy event loop before it can send the next one. So the
requests that say what they read (:meth:`PgEngine.fetched`) take another road, with no thread:

1. ``BEGIN`` and ``m2mpay_rows(tip, signer, req_id, vendor)``, pipelined: one round trip that
   locks the coin, then reads the stored answer and whether the vendor is revoked;
2. the rules, on the event loop, against those rows; writes are only collected;
3. ``m2mpay_book(…)`` (the coin, its journal rows, the stored answer) and ``COMMIT``, pipelined:
   one round trip. A read that changes nothing (the stored-answer lookup before a block's
   checks) is step 1 without ``BEGIN``, and nothing more.

Under load a request often finds every connection busy. It then waits with its first half ready,
and the request that ends on a connection sends that half in the same write as its own
``COMMIT``: a busy connection costs about one round trip per transaction, and the hand-over
costs no extra wake-up. The two functions come from migration 4 and are prepared once per
connection (:mod:`m2mpay.agents.bank.pgwire` drives the connections).

A read that was not fetched up front cannot be answered on this road: the function says so
(:class:`NotFetched`), the transaction is rolled back, and the request is done again on the
general road, one thread per connection from a pool and any SQL, as before. Withdrawals, admin
commands and the audit use that road.

Commits are durable before they return: every connection runs with ``synchronous_commit`` on
(turned on if the server's default is off). PostgreSQL groups the WAL flushes of the commits
that arrive together from several connections, so the requests in flight share fsyncs here too.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:  # psycopg is optional: imported only where a PostgreSQL store connects
    from .pgwire import Command, Wire

__all__ = ["Book", "NotFetched", "PgEngine", "is_lock_timeout", "is_race"]

log = logging.getLogger(__name__)
T = TypeVar("T")
RETRIES = 8

_DURABLE = ("SELECT current_setting('synchronous_commit'), CASE WHEN current_setting('synchronous_commit') = 'off'"
            " THEN set_config('synchronous_commit', 'on', false) END")
"""Every connection's first statement: the bank answers only what is on disk, so commits wait
for the WAL flush even where the server's default says they need not (``local`` and the remote
levels are at least that already, and are kept)."""

# The fast road's two statements, prepared on each of its connections (see agents.bank.pgwire).
_ROWS = b"m2mpay_rows"
_BOOK = b"m2mpay_book"


def _statements() -> dict[bytes, tuple[str, tuple[int, ...]]]:
    from .pgwire import BOOL, BYTEA, BYTEA_ARRAY, INT4, INT8, INT8_ARRAY, TEXT, TEXT_ARRAY

    book = (BOOL, BYTEA, TEXT, INT4, INT8, INT4, BYTEA, TEXT, BYTEA, TEXT, TEXT, INT4, INT8, INT4,
            INT8_ARRAY, TEXT_ARRAY, TEXT_ARRAY, INT8_ARRAY, TEXT_ARRAY, BYTEA_ARRAY,
            TEXT, BYTEA, BYTEA, BYTEA, INT8)
    return {_ROWS: ("SELECT * FROM m2mpay_rows($1, $2, $3, $4)", (BYTEA, TEXT, BYTEA, TEXT)),
            _BOOK: ("SELECT FROM m2mpay_book(" + ", ".join(f"${i + 1}" for i in range(len(book))) + ")", book)}


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
        self._size = connections
        self._threads = ThreadPoolExecutor(max_workers=connections, thread_name_prefix="bank-db")
        self._local = threading.local()
        self._sync_conns: list[Any] = []
        self._guard = threading.Lock()
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._idle: list[Wire] = []
        self._opened = 0
        self._waiters: deque[_Waiter] = deque()
        self._background: set[asyncio.Future[None]] = set()
        self.round_trips = 0
        """Writes on the fast road so far, each answered in one round trip (a first half sent
        with another request's end is not counted again)."""

    # --- the general road: any SQL, a thread per connection -------------------------------
    def _sync_connection(self) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
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
        """Run ``fn(conn)`` in one transaction on this thread, again when it lost a race."""
        conn = self._sync_connection()
        for attempt in range(RETRIES):
            conn.execute("BEGIN")
            try:
                result = fn(conn)
                conn.execute("COMMIT")
                return result
            except BaseException as exc:
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

    # --- the fast road: two round trips, on the event loop ---------------------------------
    async def fetched(self, fetch: Fetch, decide: Callable[[tuple[Any, ...]], tuple[T, Book | None]]) -> T:
        """``decide(row)`` on the row of ``m2mpay_rows(*fetch)``, then its :class:`Book`, committed.

        With a coin to lock (``fetch[0]``) this is one transaction of two round trips; without,
        the read is one statement on its own and ``decide`` must not change anything. Raises
        :class:`NotFetched` (nothing done) when ``decide`` needs the general road.
        """
        self._pool()
        for attempt in range(RETRIES):
            wire = await self._take(fetch)
            try:
                return await self._transaction(wire, fetch, decide)
            except BaseException as exc:
                if not is_race(exc) or attempt == RETRIES - 1:
                    raise
                log.debug("transaction lost a race (%s), retrying", type(exc).__name__)
                await asyncio.sleep(0.001 * (attempt + 1))
        raise AssertionError("unreachable")

    async def _transaction(self, wire: Wire, fetch: Fetch,
                           decide: Callable[[tuple[Any, ...]], tuple[T, Book | None]]) -> T:
        """The rest of one request on ``wire``, whose first half is sent: read, decide, end."""
        locking = fetch[0] is not None
        try:
            rows = (await wire.receive())[-1]
            result, book = decide(rows[0])
            if book is not None and not locking:
                raise NotFetched("a change without a transaction")
        except BaseException:
            if locking:  # a refusal, or an error: nothing is kept
                await self._end(wire, ((b"ROLLBACK", ()),))
            else:
                await self._end(wire)
            raise
        if not locking:
            await self._end(wire)
        elif book is None:
            await self._end(wire, ((b"COMMIT", ()),))
        else:
            # Two segments: if the book fails, the COMMIT after it ends the failed transaction
            # (as a rollback), and whatever comes next on this connection starts clean.
            await self._end(wire, ((_BOOK, book.params()),), ((b"COMMIT", ()),))
        return result  # the COMMIT's answer is in: durable

    async def _end(self, wire: Wire, *segments: tuple[Command, ...]) -> None:
        """Send the last segments of a request and read them; the connection then passes on.

        When a request waits for a connection, its first half goes in the same write, so a
        connection under load costs one round trip per transaction, not two. The first error
        of these segments is raised once the connection has passed on.
        """
        if wire.broken:
            self._drop(wire)
            return
        for segment in segments:
            wire.send(*segment)
        waiter = self._next_waiter() if segments else None
        if waiter is not None:
            wire.send(*_start(waiter.fetch))
        failure: BaseException | None = None
        try:
            if segments:
                await wire.flush()
                self.round_trips += 1
            for _ in segments:
                try:
                    await wire.receive()
                except Exception as exc:
                    if wire.broken:
                        raise
                    failure = failure or exc
        except BaseException:
            self._drop(wire, waiter)
            raise
        if waiter is None:
            self._release(wire)
        elif not waiter.future.done():
            waiter.future.set_result((wire, True))
        else:
            self._abandon(wire)  # the waiter was cancelled after its first half went out
        if failure is not None:
            raise failure

    async def _take(self, fetch: Fetch) -> Wire:
        """A connection with this request's first half sent, by this request or by the one before."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # connections wait on one loop's reader callbacks
            self._forget_async()
            self._loop = loop
        while True:
            wire: Wire | None = None
            while self._idle and wire is None:
                wire = self._idle.pop()
                if not wire.idle:  # the server went away while it waited here
                    self._drop(wire)
                    wire = None
            if wire is None and self._opened < self._size:
                self._opened += 1
                try:
                    wire = await _connect_async(self._url)
                except BaseException:
                    self._opened -= 1
                    if (other := self._next_waiter()) is not None:
                        other.future.set_result(None)  # the room this one had: another may try
                    raise
            if wire is None:
                waiter = _Waiter(fetch, loop.create_future())
                self._waiters.append(waiter)
                try:
                    handed = await waiter.future
                except asyncio.CancelledError:
                    late = waiter.future.result() if waiter.future.done() and not waiter.future.cancelled() else None
                    if late is not None:  # handed over just as this request was cancelled
                        if late[1]:
                            self._abandon(late[0])
                        else:
                            self._release(late[0])
                    raise
                if handed is None:
                    continue  # a connection was dropped: there is room to open one
                wire, started = handed
                if started:
                    return wire
            wire.send(*_start(fetch))
            try:
                await wire.flush()
            except BaseException:
                self._drop(wire)
                raise
            self.round_trips += 1
            return wire

    def _next_waiter(self) -> _Waiter | None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.future.done():
                return waiter
        return None

    def _release(self, wire: Wire) -> None:
        """An idle connection to the next request waiting (which then sends its own first half),
        or to the pool; anything else is closed."""
        if not wire.idle:  # broken, or a transaction left open: never reused
            self._drop(wire)
            return
        waiter = self._next_waiter()
        if waiter is not None:
            waiter.future.set_result((wire, False))
        else:
            self._idle.append(wire)

    def _drop(self, wire: Wire, waiter: _Waiter | None = None) -> None:
        """Close ``wire``; a request that waited for it (or any waiting) opens one instead."""
        if not wire.closed:
            self._opened -= 1
            wire.close()
        waiter = waiter if waiter is not None and not waiter.future.done() else self._next_waiter()
        if waiter is not None:
            waiter.future.set_result(None)

    def _abandon(self, wire: Wire) -> None:
        """Finish, in the background, a first half whose request is gone, then pass ``wire`` on."""
        async def drain() -> None:
            try:
                if await _in_transaction(wire):
                    await self._end(wire, ((b"ROLLBACK", ()),))
                else:
                    await self._end(wire)
            except Exception:  # nobody waits on this: the connection is dropped
                log.debug("an abandoned request's connection was dropped", exc_info=True)
                self._drop(wire)

        task = asyncio.ensure_future(drain())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _forget_async(self) -> None:
        for wire in self._idle:
            wire.close()  # the count is reset below
        self._idle.clear()
        self._opened = 0
        self._waiters.clear()

    def close(self) -> None:
        """Close every connection and stop the threads."""
        if self._closed:
            return
        self._closed = True
        self._forget_async()

        def close_all() -> None:
            with self._guard:
                for conn in self._sync_conns:
                    conn.close()
                self._sync_conns.clear()

        self._threads.submit(close_all).result()
        self._threads.shutdown(wait=True)


Fetch = tuple[bytes | None, str | None, bytes | None, str | None]
"""``m2mpay_rows``' parameters: the coin to lock, the stored answer's key, the vendor."""


@dataclass(eq=False)
class _Waiter:
    """A request waiting for a connection: what its first half sends, and where the connection
    goes: ``(wire, True)`` with that half already sent, ``(wire, False)`` idle, ``None`` to open one."""

    fetch: Fetch
    future: asyncio.Future[tuple[Wire, bool] | None]


def _start(fetch: Fetch) -> tuple[Command, ...]:
    """A request's first half: ``BEGIN`` and the locked read, or the read alone."""
    return ((_ROWS, fetch),) if fetch[0] is None else ((b"BEGIN", ()), (_ROWS, fetch))


async def _in_transaction(wire: Wire) -> bool:
    """Read the results of a first half nobody waits for; whether it left a transaction open."""
    try:
        await wire.receive()
    except Exception:
        if wire.broken:
            raise
    return not wire.idle


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
