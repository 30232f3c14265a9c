"""One PostgreSQL connection in libpq's pipeline mode, driven from the event loop by hand.

Through psycopg's async API, one transaction of the bank's fast road cost ~260 µs of the
bank's CPU here (a cursor and its adapters per statement, and a trip through the event loop for
each statement queued, even in a pipeline): more than the server spends on it. This way it costs
~90 µs. The fast road needs little of that API: two statements prepared once per connection,
parameters and results of known types. So they go through psycopg's libpq wrapper
(:mod:`psycopg.pq`, its documented low-level layer).

Commands go in *segments*, each ended by a Sync (:meth:`Wire.send`), and are read back in order
(:meth:`Wire.receive`, or :meth:`Wire.receive_each` for each command's own outcome). libpq
writes a segment out as soon as it is ended (``PQpipelineSync`` flushes), so a segment is one
write, and one wake-up of the server: commands sent together belong in one segment. An error
skips the rest of its own segment only; the commands it skipped say so (:class:`Skipped`).
Parameters go as text, except ``bytea`` as binary; results come back
binary and are decoded by their column's type. An error result raises psycopg's class for its
SQLSTATE, so a lost race is a ``UniqueViolation`` on either road. A connection whose results
were left unread (cancelled, or the socket failed) is :attr:`Wire.broken` and is never used again.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from psycopg import errors, pq

__all__ = ["Command", "Skipped", "Wire"]

BYTEA, TEXT, INT4, INT8, BOOL = 17, 25, 23, 20, 16
INT8_ARRAY, TEXT_ARRAY, BYTEA_ARRAY = 1016, 1009, 1001

Command = tuple[bytes, Sequence[Any]]
"""A prepared statement's name and its parameters, or ``(b"BEGIN", ())`` and the like."""

_PLAIN = {b"BEGIN", b"COMMIT", b"ROLLBACK"}


class Skipped(errors.Error):
    """A command not run because an earlier one of its segment failed (libpq's pipeline abort)."""


class Wire:
    """Prepared statements and round trips on one connection in pipeline mode."""

    def __init__(self, pgconn: pq.abc.PGconn, owner: object = None) -> None:
        self._pg = pgconn
        self._owner = owner  # the psycopg connection that opened it, kept from the collector
        self._encoders: dict[bytes, tuple[Callable[[Any], bytes], ...]] = {}
        self._formats: dict[bytes, list[int]] = {}
        self.broken = False
        self._closed = False
        self._segments: deque[int] = deque()  # commands in each segment sent and not yet read
        self._pg.nonblocking = 1
        self._pg.enter_pipeline_mode()
        # The socket stays registered with the loop for the connection's life: registering it
        # for each round trip would cost two more system calls per round trip.
        self._loop = asyncio.get_running_loop()
        self._fd = self._pg.socket
        self._ready: asyncio.Future[None] | None = None
        self._loop.add_reader(self._fd, self._readable)

    def _readable(self) -> None:
        """Take in what arrived (so the level-triggered poll goes quiet) and wake the waiter."""
        try:
            self._pg.consume_input()
        except Exception as exc:  # noqa: BLE001 - the connection failed, however: whoever waits finds out
            self._loop.remove_reader(self._fd)
            self.broken = True
            if self._ready is not None and not self._ready.done():
                self._ready.set_exception(exc)
            return
        if self._ready is not None and not self._ready.done():
            self._ready.set_result(None)

    @property
    def idle(self) -> bool:
        """Usable, every result read, and outside any transaction."""
        return (not self.broken and not self._segments
                and self._pg.transaction_status == pq.TransactionStatus.IDLE)

    async def prepare(self, statements: dict[bytes, tuple[str, tuple[int, ...]]]) -> None:
        """Prepare ``{name: (sql, parameter types)}`` on the server, in one round trip."""
        for name, (sql, types) in statements.items():
            self._pg.send_prepare(name, sql.encode(), param_types=types)
            self._encoders[name] = tuple(_ENCODERS.get(oid, _text) for oid in types)
            self._formats[name] = [1 if oid == BYTEA else 0 for oid in types]
        self._pg.pipeline_sync()
        self._segments.append(len(statements))
        await self.flush()
        await self.receive()

    async def round_trip(self, *commands: Command) -> list[list[tuple[Any, ...]]]:
        """Send ``commands`` and one Sync; the rows of each command, in order."""
        self.send(*commands)
        await self.flush()
        return await self.receive()

    def send(self, *commands: Command) -> None:
        """Queue ``commands`` and one Sync: a segment, which :meth:`receive` reads in its turn.

        Segments are independent: an error skips the rest of its own segment only (inside a
        transaction the transaction is then failed, and a ``COMMIT`` in a later segment ends it
        as a rollback).
        """
        for name, params in commands:
            if name in _PLAIN:
                self._pg.send_query_params(name, None)
            else:
                self._pg.send_query_prepared(name, _encode(params, self._encoders[name]), self._formats[name],
                                             result_format=pq.Format.BINARY)
        self._pg.pipeline_sync()
        self._segments.append(len(commands))

    async def flush(self) -> None:
        """Write whatever of the segments sent libpq could not write at once (a full socket buffer)."""
        try:
            while self._pg.flush() == 1:  # a full socket buffer: rare, these are small
                await self._writable()
        except BaseException:
            self.broken = True
            raise

    async def receive(self) -> list[list[tuple[Any, ...]]]:
        """The rows of each command of the oldest segment not yet read; its first error raised."""
        outcomes = await self.receive_each()
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        return outcomes  # type: ignore[return-value]  # no exception among them: all rows

    async def receive_each(self) -> list[list[tuple[Any, ...]] | BaseException]:
        """Each command's rows, or its error, in the oldest segment not yet read.

        A command after a failed one in its segment is not run: its outcome is :class:`Skipped`.
        Only a failure of the connection itself is raised (and leaves the wire broken).
        """
        expected = self._segments[0]
        outcomes: list[list[tuple[Any, ...]] | BaseException] = []
        current: list[tuple[Any, ...]] | BaseException = []
        try:
            while True:
                while not self._pg.is_busy():
                    result = self._pg.get_result()
                    if result is None:  # the end of one command's results
                        outcomes.append(current)
                        current = []
                        continue
                    status = result.status
                    if status == pq.ExecStatus.PIPELINE_SYNC:
                        self._segments.popleft()
                        if len(outcomes) != expected:
                            raise errors.InternalError(f"{len(outcomes)} results for {expected} commands")
                        return outcomes
                    if status == pq.ExecStatus.FATAL_ERROR:
                        current = _error(result)
                    elif status == pq.ExecStatus.PIPELINE_ABORTED:
                        current = Skipped("not run: an earlier command of its segment failed")
                    elif status == pq.ExecStatus.TUPLES_OK and isinstance(current, list):
                        current.extend(_decode(result))
                self._ready = self._loop.create_future()
                try:
                    await self._ready  # _readable has consumed what arrived
                finally:
                    self._ready = None
        except BaseException:  # cancelled or the connection failed: results are left unread
            self.broken = True
            raise

    async def _writable(self) -> None:
        ready: asyncio.Future[None] = self._loop.create_future()

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        self._loop.add_writer(self._fd, wake)
        try:
            await ready
        finally:
            self._loop.remove_writer(self._fd)

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        if self._closed:
            return
        self._closed = self.broken = True
        if not self._loop.is_closed():
            self._loop.remove_reader(self._fd)
            if self._ready is not None and not self._ready.done():  # whoever reads finds out
                self._ready.set_exception(errors.OperationalError("the connection was closed"))
        self._pg.finish()  # PostgreSQL sees the socket close and ends the session


def _error(result: pq.abc.PGresult) -> BaseException:
    sqlstate = (result.error_field(pq.DiagnosticField.SQLSTATE) or b"XX000").decode()
    message = (result.error_field(pq.DiagnosticField.MESSAGE_PRIMARY) or b"").decode("utf-8", "replace")
    try:
        kind = errors.lookup(sqlstate)
    except KeyError:
        kind = errors.DatabaseError
    return kind(message)


def _text(value: Any) -> bytes:
    return str(value).encode()


def _array(element: Callable[[Any], str]) -> Callable[[Any], bytes]:
    def encode(values: Any) -> bytes:
        return ("{" + ",".join("NULL" if v is None else element(v) for v in values) + "}").encode()
    return encode


def _quoted(text: str) -> str:
    """An array element, quoted, with ``"`` and ``\\`` escaped."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


_ENCODERS: dict[int, Callable[[Any], bytes]] = {
    BYTEA: bytes,
    BOOL: lambda v: b"t" if v else b"f",
    TEXT_ARRAY: _array(lambda v: _quoted(str(v))),
    INT8_ARRAY: _array(lambda v: str(int(v))),
    BYTEA_ARRAY: _array(lambda v: _quoted("\\x" + bytes(v).hex())),
}
"""Parameters as libpq takes them: ``bytea`` in binary, everything else in its text form."""


def _encode(params: Sequence[Any], encoders: tuple[Callable[[Any], bytes], ...]) -> list[bytes | None]:
    if len(params) != len(encoders):
        raise errors.ProgrammingError(f"{len(params)} parameters for {len(encoders)}")
    return [None if v is None else encode(v) for v, encode in zip(params, encoders, strict=True)]


def _decode(result: pq.abc.PGresult) -> list[tuple[Any, ...]]:
    kinds = [result.ftype(i) for i in range(result.nfields)]
    rows = []
    for r in range(result.ntuples):
        row: list[Any] = []
        for c, oid in enumerate(kinds):
            raw = result.get_value(r, c)
            if raw is None:
                row.append(None)
            elif oid == BYTEA:
                row.append(bytes(raw))
            elif oid in (INT4, INT8):
                row.append(int.from_bytes(raw, "big", signed=True))
            elif oid == BOOL:
                row.append(raw != b"\x00")
            elif oid == TEXT:
                row.append(bytes(raw).decode())
            else:
                raise errors.NotSupportedError(f"no decoder for type {oid}")
        rows.append(tuple(row))
    return rows
