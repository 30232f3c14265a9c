"""PostgreSQL's fast road: the requests that name their rows, several to one transaction.

A request here is a locked read, the core's pure rules in Python, then a few writes (see
:mod:`m2mpay.agents.bank.postgresql`). One transaction per request cost the server ~0.33 ms of
CPU here for its four statements, two round trips and its own WAL flush. So the requests that
reach the road in one turn of the event loop, or wait while every connection is busy, are
*grouped*: one connection takes up to :data:`GROUP` of them into one transaction, in two round
trips for them all:

1. ``BEGIN``, the locks of the group's stored answers, and each request's
   ``m2mpay_rows(tip, signer, req_id, vendor)``, pipelined;
2. each request's rules, on the event loop, against its rows; writes are only collected;
3. each request's ``m2mpay_book(…)`` and the ``COMMIT``, with the next group's first half behind
   them: one round trip.

While one connection is busy, another is put to work only once :data:`SPREAD` requests wait, or
once the busy one's group has run for :data:`STALLED` (20 ms: it may be waiting for a lock another
transaction holds): fewer, bigger groups cost less than many small ones. In the bank's benchmark (32 requests in
flight, one process) transactions then hold ~5 requests on 4 connections, and the server spends
0.12–0.20 ms per request. Each phase of a group is one segment of the pipeline, so one write and
one wake-up of the server for the whole group. A request is answered only once the ``COMMIT`` of
its group is read: durable.

What a group must not do, and how it is kept from it:

- *See a sibling's change*: the rules of each request read the rows as they were before the group.
  So a group never holds two requests for one coin or for one stored answer, and a request whose
  coin or answer is in a group in flight waits for that group to end (:meth:`FastRoad._take`).
- *Deadlock*: a group first takes a transaction's advisory lock for each of its stored answers
  (``signer``, ``req_id``), in one order, then locks its coins, and inserts its coins, in the
  order of their tips; so two groups on two connections, or in two bank processes, never wait for
  each other in a cycle. Without the answers' locks a signer reusing two request ids across four
  coins, sent to two processes at once, made two groups insert the same two answers in opposite
  orders: a deadlock PostgreSQL breaks only after ``deadlock_timeout``, with both groups' coins
  locked meanwhile.
- *Fail for another's fault*: each statement is a segment of its own, so the failing request is
  known. It gets its error (or is retried, if it lost a race); the others of its group whose
  changes were rolled back with it are decided again in a later group, at no cost to their retries.

A group of reads that change nothing (the stored-answer lookup before a block's checks) takes no
lock and is one round trip, with no ``BEGIN``; such a read in a group that locks a coin has its
answer's lock taken with the others. A request whose rules need a row that
was not fetched gets :class:`~m2mpay.agents.bank.postgresql.NotFetched` and goes the general road.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .pgwire import Command, Wire
    from .postgresql import Book, Fetch

__all__ = ["ANSWERS", "BOOK", "GROUP", "ROWS", "FastRoad"]

log = logging.getLogger(__name__)

GROUP = 16
"""Requests in one transaction at most. In the bank's benchmark 16 answered ~15 % more than 8,
and 32 no more than 16; more would make each request wait for more rules than its own."""
SPREAD = 4
"""Requests waiting before another connection is put to work while one is busy: fewer
connections, each with bigger groups, cost the server less per request than many with one; a
few waiting are taken by the busy connection's next write."""
STALLED = 0.02
"""Seconds after which a busy connection's group no longer holds requests back (it may be waiting
for a lock that another transaction holds): they go to another connection."""
RETRIES = 8

ANSWERS = b"m2mpay_answers"
ROWS = b"m2mpay_rows"
BOOK = b"m2mpay_book"
"""The names of the statements prepared on each connection: the answers' advisory locks, and
migration 4's two functions."""


@dataclass(eq=False, slots=True)
class _Item:
    """One request: what it reads, its rules, and where its outcome goes."""

    fetch: Fetch
    decide: Callable[[tuple[Any, ...]], tuple[Any, Book | None]]
    future: asyncio.Future[Any]
    attempt: int = 0

    @property
    def answer_key(self) -> tuple[str, bytes | None] | None:
        return None if self.fetch[1] is None else (self.fetch[1], self.fetch[2])


@dataclass(slots=True)
class _Decided:
    """A request's outcome in its group: a result and its changes, or an error."""

    item: _Item
    result: Any = None
    book: Book | None = None
    error: BaseException | None = None
    again: bool = False
    """Rolled back with a sibling that failed: to be decided again, at no cost to its retries."""


class FastRoad:
    """Up to ``connections`` connections of one event loop, each serving groups of requests."""

    def __init__(self, url: str, connections: int, connect: Callable[[str], Awaitable[Wire]],
                 *, group: int = GROUP) -> None:
        self._url = url
        self._size = connections
        self._connect = connect
        self._group = group
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: deque[_Item] = deque()
        self._busy_tips: set[bytes] = set()
        self._busy_answers: set[tuple[str, bytes | None]] = set()
        self._idle: list[Wire] = []
        self._wires: set[Wire] = set()
        self._opened = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self._scheduled = False
        self._started: dict[Wire, float] = {}  # when each busy connection sent its group's first half
        self._recheck: asyncio.TimerHandle | None = None
        self.round_trips = 0
        """Writes so far, each answered in one round trip (a group's first half sent with the
        end of the group before it is not counted again)."""
        self.groups = 0
        """Transactions (or groups of reads) so far: with :attr:`requests`, the grouping achieved."""
        self.requests = 0
        """Requests decided so far (again after a sibling's failure)."""

    async def fetched(self, fetch: Fetch, decide: Callable[[tuple[Any, ...]], tuple[Any, Book | None]]) -> Any:
        """``decide(row)`` on the row of ``m2mpay_rows(*fetch)``, its :class:`Book` committed."""
        from .sqlite import StoreError

        if self._closed:
            raise StoreError("the store is closed")
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # connections wait on one loop's reader callbacks
            self._forget()
            self._loop = loop
        item = _Item(fetch, decide, loop.create_future())
        self._queue.append(item)
        if not self._scheduled:  # the requests that reach here in this turn of the loop go together
            self._scheduled = True
            loop.call_soon(self._dispatch_soon)
        return await item.future  # a cancelled request is skipped, or its outcome dropped

    # --- handing requests to connections ---------------------------------------------------
    def _dispatch_soon(self) -> None:
        self._scheduled = False
        self._dispatch()

    def _dispatch(self) -> None:
        """Give waiting requests to idle connections, opening more up to the limit."""
        while self._queue and not self._closed:
            if len(self._queue) < SPREAD and self._moving():
                return  # a busy connection takes these with its next write: bigger groups, fewer commits
            wire: Wire | None = None
            while self._idle and wire is None:
                wire = self._idle.pop()
                if not wire.idle:  # the server went away while it waited
                    self._discard(wire)
                    wire = None
            if wire is None and self._opened >= self._size:
                return
            group = self._take()
            if not group:
                if wire is not None:
                    self._idle.append(wire)
                return
            if wire is None:
                self._opened += 1
            self._spawn(self._serve(wire, group))

    def _moving(self) -> bool:
        """Whether a busy connection started its group within :data:`STALLED` (then it will take
        what waits soon); if so, look again once that is no longer true."""
        if self._loop is None:
            return False
        now = self._loop.time()
        recent = [t for t in self._started.values() if now - t < STALLED]
        if not recent:
            return False
        if self._recheck is None:
            self._recheck = self._loop.call_at(max(recent) + STALLED, self._look_again)
        return True

    def _look_again(self) -> None:
        self._recheck = None
        self._dispatch()

    def _take(self) -> list[_Item]:
        """Up to :data:`GROUP` waiting requests that may share a transaction, in the order of their tips."""
        group: list[_Item] = []
        skipped: list[_Item] = []
        while self._queue and len(group) < self._group:
            item = self._queue.popleft()
            if item.future.done():  # cancelled while it waited
                continue
            tip, key = item.fetch[0], item.answer_key
            if (tip is not None and tip in self._busy_tips) or (key is not None and key in self._busy_answers):
                skipped.append(item)  # after the group that holds its coin or its answer
                continue
            if tip is not None:
                self._busy_tips.add(tip)
            if key is not None:
                self._busy_answers.add(key)
            group.append(item)
        self._queue.extendleft(reversed(skipped))
        group.sort(key=lambda i: i.fetch[0] or b"")  # every group locks in one order: no cycle
        return group

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- one connection's work -------------------------------------------------------------
    async def _serve(self, wire: Wire | None, group: list[_Item]) -> None:
        """Open a connection if need be, then run groups on it while requests wait.

        When the connection fails, a request whose ``COMMIT`` had not been sent is done again on
        another (nothing of it can have been kept: a server restart costs it nothing but time);
        one whose ``COMMIT`` had been sent gets the error, for nobody knows what the server did.
        """
        held = list(group)  # the requests on this connection: the group, and the next one once sent
        committing: list[_Item] = []  # those whose COMMIT was sent and not yet answered
        try:
            if wire is None:
                wire = await self._connect(self._url)
                self._wires.add(wire)
            self._start(wire, group)
            await wire.flush()
            self.round_trips += 1
            while group:
                group = await self._run(wire, group, held, committing)
                held[:] = group
        except BaseException as exc:
            if wire is None:
                self._opened -= 1
            else:
                self._discard(wire)
            if isinstance(exc, Exception) and wire is not None and not self._closed:
                self._free(held)
                lost = [i for i in held if i in committing]  # items compare by identity
                for item in held:
                    if item not in lost:
                        if item.attempt < RETRIES - 1:
                            item.attempt += 1
                            self._queue.appendleft(item)
                        else:
                            lost.append(item)
                self._fail(lost, exc)
                log.debug("a connection failed (%s); %d requests go again", type(exc).__name__,
                          len(held) - len(lost))
            else:
                self._fail(held, exc)
            if not isinstance(exc, Exception):
                raise
        else:
            if wire.idle:
                self._idle.append(wire)
            else:
                self._discard(wire)
        finally:
            if wire is not None:
                self._started.pop(wire, None)
            self._dispatch()

    async def _run(self, wire: Wire, group: list[_Item], held: list[_Item], committing: list[_Item]) -> list[_Item]:
        """Read a started group's rows, decide, book and commit; the next group, started, or none."""
        from .pgwire import Skipped  # psycopg is optional: only a PostgreSQL store gets here

        locking = _locking(group)
        outcomes = await wire.receive_each()
        for _ in range(_opening(group)):
            if isinstance(begun := outcomes.pop(0), BaseException):
                raise begun  # the connection is at fault, not a request: the group goes to another
        rows = [o[0] if isinstance(o, list) else o for o in outcomes]
        failed = next((r for r in rows if isinstance(r, BaseException) and not isinstance(r, Skipped)), None)
        if failed is not None and locking:  # the transaction is failed: none of it can be kept
            wire.send((b"ROLLBACK", ()))
            await wire.flush()
            self.round_trips += 1
            await wire.receive()
            self._end(group, [_Decided(i, error=r) if r is failed else _Decided(i, again=True)
                              for i, r in zip(group, rows, strict=True)])
            return []
        # A read skipped after a sibling's failed one (reads alone have no transaction) goes again.
        decided = [_Decided(item, again=True) if isinstance(row, Skipped) else _decide(item, row)
                   for item, row in zip(group, rows, strict=True)]
        books = [(d, d.book) for d in decided if d.book is not None]
        if books:
            wire.send(*((BOOK, book.params()) for _, book in books))
        if locking:  # a segment of its own: it ends the transaction even when a book failed
            wire.send((b"COMMIT", ()))
        nxt = self._take() if not self._closed else []
        held.extend(nxt)
        if nxt:
            self._start(wire, nxt)
        committing[:] = [d.item for d, _ in books]
        if locking or nxt:
            await wire.flush()
            self.round_trips += 1
        if books:
            booked = await wire.receive_each()
            failure = next((o for o in booked if isinstance(o, BaseException)), None)
            if failure is not None:  # the first; the rest were not run, and all is rolled back
                for (d, _), outcome in zip(books, booked, strict=True):
                    d.again = outcome is not failure
                    if outcome is failure:
                        d.error, d.book = failure, None
        if locking:
            await wire.receive()  # COMMIT: durable (a ROLLBACK, if a book failed)
        committing.clear()
        self._end(group, decided)
        return nxt

    def _start(self, wire: Wire, group: Sequence[_Item]) -> None:
        """A group's first half, one segment: ``BEGIN`` and its answers' locks if it locks a coin,
        then each request's read.

        libpq writes a segment as soon as it is ended, so each segment is one write, and one
        wake-up of the server: a group's reads, and its books, go in one each."""
        opening = _opening(group)  # the count _run reads back before the rows
        begin: list[Command] = [(b"BEGIN", ())] if opening else []
        if opening == 2:
            begin.append((ANSWERS, (_answer_locks(group),)))
        wire.send(*begin, *((ROWS, item.fetch) for item in group))
        self._started[wire] = asyncio.get_running_loop().time()

    def _end(self, group: list[_Item], decided: list[_Decided]) -> None:
        """Free the group's coins and answers; give each request its outcome, or another try.

        A request that lost a race is tried again shortly (the winner will have committed), up
        to :data:`RETRIES` times; one rolled back for a sibling's failure is queued again first.
        """
        from .postgresql import is_race

        self.groups += 1
        self.requests += len(group)
        self._free(group)
        again: list[_Item] = []
        for d in decided:
            item = d.item
            if item.future.done():
                continue
            if d.again:
                again.append(item)
            elif d.error is not None and is_race(d.error) and item.attempt < RETRIES - 1:
                self._retry(item, d.error)
            elif d.error is not None:
                item.future.set_exception(d.error)
            else:
                item.future.set_result(d.result)
        self._queue.extendleft(reversed(again))

    def _free(self, items: Sequence[_Item]) -> None:
        for item in items:
            if item.fetch[0] is not None:
                self._busy_tips.discard(item.fetch[0])
            if (key := item.answer_key) is not None:
                self._busy_answers.discard(key)

    def _retry(self, item: _Item, error: BaseException) -> None:
        """Queue ``item`` again shortly: the transaction that won its race will have committed."""
        item.attempt += 1
        log.debug("a request lost a race (%s), retrying (%d)", type(error).__name__, item.attempt)
        assert self._loop is not None  # noqa: S101 - set before any request is queued

        def requeue() -> None:
            if not item.future.done():
                self._queue.appendleft(item)
                self._dispatch()

        self._loop.call_later(0.001 * item.attempt, requeue)

    def _fail(self, items: Sequence[_Item], exc: BaseException) -> None:
        from .sqlite import StoreError

        self._free(items)
        for item in items:
            if not item.future.done():
                closed = self._closed or not isinstance(exc, Exception)
                item.future.set_exception(StoreError("the store is closed") if closed else exc)

    def _discard(self, wire: Wire) -> None:
        if not wire.closed:
            self._opened -= 1
            wire.close()
        self._wires.discard(wire)

    def _forget(self) -> None:
        """Drop what belonged to another event loop (tests run several, one after another)."""
        for wire in list(self._wires):
            wire.close()
        self._wires.clear()
        self._idle.clear()
        self._opened = 0
        self._scheduled = False
        self._started.clear()
        self._recheck = None  # its loop is gone
        self._queue.clear()
        self._busy_tips.clear()
        self._busy_answers.clear()

    def close(self) -> None:
        """Close every connection; requests still waiting get an error."""
        from .sqlite import StoreError

        if self._closed:
            return
        self._closed = True
        if self._recheck is not None:
            self._recheck.cancel()
            self._recheck = None
        for item in self._queue:
            if not item.future.done() and not item.future.get_loop().is_closed():
                item.future.set_exception(StoreError("the store is closed"))
        self._queue.clear()
        for wire in list(self._wires):
            wire.close()  # a group in flight on it fails and its requests get the error
        self._wires.clear()
        self._idle.clear()


def _locking(group: Sequence[_Item]) -> bool:
    return any(item.fetch[0] is not None for item in group)


def _answer_locks(group: Sequence[_Item]) -> list[int]:
    """The advisory lock of each stored answer the group reads (and so may insert), sorted:
    every group takes them in one order. Keys are 64 bits of a hash, in the one-key form (blinded
    messages' locks take the two-key form, a space of their own): two answers sharing one only
    wait for each other."""
    keys = {int.from_bytes(hashlib.blake2b(key[0].encode() + b"\0" + (key[1] or b""), digest_size=8).digest(),
                           "big", signed=True)
            for item in group if (key := item.answer_key) is not None}
    return sorted(keys)


def _opening(group: Sequence[_Item]) -> int:
    """The commands of a group's first segment before its reads: ``BEGIN`` if it locks a coin, and
    then the answers' locks if it reads a stored answer (:meth:`FastRoad._start` sends them,
    :meth:`FastRoad._run` reads them back by this count)."""
    if not _locking(group):
        return 0
    return 2 if any(item.answer_key is not None for item in group) else 1


def _decide(item: _Item, row: tuple[Any, ...] | BaseException) -> _Decided:
    from .postgresql import NotFetched

    if isinstance(row, BaseException):
        return _Decided(item, error=row)
    if item.future.done():  # cancelled while its rows were read: it changes nothing
        return _Decided(item)
    try:
        result, book = item.decide(row)
        if book is not None and item.fetch[0] is None:
            raise NotFetched("a change without a locked coin")
    except Exception as exc:  # noqa: BLE001 - a refusal by the rules, or NotFetched: the request's own outcome
        return _Decided(item, error=exc)
    return _Decided(item, result=result, book=book)

