"""SQLite for the bank: short transactions on the caller's thread, commits made durable together.

SQLite has one writer, and a bank transaction is a handful of indexed statements (~70 µs);
what costs is the ``fsync`` that makes a commit durable (~100-200 µs) and, when transactions
run on a worker thread, the hand-over of the GIL to and from it (measured: more than the fsync).
So a transaction runs where it is called, under a lock, with ``synchronous=NORMAL`` (in WAL mode
that means: consistent, not yet durable), and durability comes after it: :meth:`durable` returns
once the WAL file has been ``fdatasync``-ed past that commit. One sync covers every commit
written before it started, so the requests in flight share it (group commit), and it runs on a
thread so the event loop goes on verifying the next requests meanwhile.

The bank releases nothing (no answer, no signature) before :meth:`durable` returns, so what a
client sees is on disk exactly as with ``synchronous=FULL``, which syncs the WAL after each
commit. Checkpoints keep their own ordering in NORMAL mode: the WAL is synced before it is
copied into the database and the database after. They run on a thread of their own every
:data:`CHECKPOINT_EVERY` commits, not inside a commit on the event loop; between them SQLite
writes the WAL again from its start, so it stops growing, and an ``fdatasync`` of blocks already
allocated costs less than half of one that grows the file (measured: ~140 µs against ~350 µs).
If an ``fsync`` fails, nobody knows what is on disk any more: the store refuses everything from
then on and the operator restarts it.

With ``group_commits`` (a bank served by one process) the transactions that run before the next
sync share one SQLite transaction as well: each is a ``SAVEPOINT`` released when it succeeds and
rolled back to when it fails, and the group is committed when a sync needs it. A ``COMMIT`` writes
every page the transactions touched into the WAL, once per group instead of once each (measured:
``BEGIN`` and ``COMMIT`` were an eighth of a request's time in the bank). Every savepoint is a
whole transaction, so a group may be committed between any two of them; the write lock is held
until then (for one batch of requests), which is why several processes on one file do not group.
A group that SQLite rolled back as a whole (it does on a full disk or an I/O error) takes its
released savepoints with it: the store stops as after a failed ``fsync``, and nothing of the
group is ever answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["SqliteEngine", "StoreError"]

T = TypeVar("T")
log = logging.getLogger(__name__)
_BUSY_TIMEOUT_S = 5.0  # another process (an admin command) holding the write lock
CHECKPOINT_EVERY = 256  # commits between checkpoints: a WAL of a few MB, written over and over


class StoreError(RuntimeError):
    """The bank database could not be opened or reached, is closed, or stopped after a failed fsync."""


class SqliteEngine:
    """One connection, one writer lock, and the shared WAL sync.

    ``path`` may be ``:memory:``: a database that lives and dies with the engine, for tests; it
    has nothing to sync nor to checkpoint.
    """

    def __init__(self, path: str, *, group_commits: bool = False) -> None:
        self._path = path
        self._grouping = group_commits
        self._group_open = False  # a SQLite transaction holding released savepoints, not committed
        self._group_dirty = False  # ... and at least one of them wrote something
        self._memory = path == ":memory:"
        try:
            if not self._memory:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                                         timeout=_BUSY_TIMEOUT_S)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")  # durability: see durable()
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._conn.execute("PRAGMA wal_autocheckpoint=0")  # ours run off the event loop
            self._conn.execute("PRAGMA temp_store=MEMORY")  # a savepoint's journal: in memory, not a file
        except (OSError, sqlite3.Error) as exc:
            raise StoreError("cannot open the bank database (sqlite)") from exc
        self._lock = threading.Lock()  # one transaction at a time on the one connection
        self._written = 0  # commits so far
        self._synced = 0  # commits known to be on disk
        self.syncs = 0  # fsyncs so far: with requests in flight, fewer than commits
        self._sync_lock = threading.Lock()
        self._wal_fd: int | None = None
        self._broken = False
        self._closed = False
        self._syncer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bank-wal-sync")
        self._pending: tuple[asyncio.AbstractEventLoop, asyncio.Future[None]] | None = None
        self._checkpointer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bank-checkpoint")
        self._checkpoint_conn: sqlite3.Connection | None = None
        self._checkpointed_at = 0
        self._background: Future[None] | None = None

    @property
    def commits(self) -> int:
        """The commits so far, the group still open counted as the next one."""
        return self._written + int(self._group_dirty)

    def transaction(self, fn: Callable[[Any], T]) -> tuple[T, int]:
        """Run ``fn(conn)`` in one transaction; the result and the commit's number for :meth:`durable`."""
        if self._broken:
            raise StoreError("the bank database stopped after a failed fsync")
        if self._closed:
            raise StoreError("the store is closed")
        if self._grouping:
            return self._grouped(fn)
        with self._lock:
            changes = self._conn.total_changes
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                result = fn(self._conn)
                self._conn.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    self._conn.execute("ROLLBACK")
                raise
            if self._conn.total_changes == changes:
                # Wrote nothing: it needs no sync of its own, but it may have read what an earlier
                # commit wrote, so it waits for that one (usually already on disk).
                return result, self._written
            self._written += 1
            self._maybe_checkpoint()
            return result, self._written

    def _grouped(self, fn: Callable[[Any], T]) -> tuple[T, int]:
        """``fn(conn)`` in the open group, as a savepoint; or, with no group open, as the
        transaction that opens one (nothing else to keep apart from: no savepoint needed)."""
        with self._lock:
            changes = self._conn.total_changes
            first = not self._group_open
            self._conn.execute("BEGIN IMMEDIATE" if first else "SAVEPOINT request")
            self._group_open = True
            try:
                result = fn(self._conn)
                if not first:
                    self._conn.execute("RELEASE request")
            except BaseException:
                if first:
                    self._group_open = False
                    with contextlib.suppress(sqlite3.Error):
                        self._conn.execute("ROLLBACK")
                else:
                    self._undo_savepoint()
                raise
            self._group_dirty |= self._conn.total_changes != changes
            if not self._group_dirty:
                # Nothing written in the group: end it now, or it would hold the write lock
                # until some later sync (a read alone never asks for one).
                self._conn.execute("COMMIT")
                self._group_open = False
            # A transaction that wrote nothing may still have read what the group wrote: it
            # waits for the group's commit.
            return result, self.commits

    def _undo_savepoint(self) -> None:
        if not self._conn.in_transaction:  # SQLite rolled back the whole group (full disk, I/O error)
            self._group_open = False
            if self._group_dirty:
                self._broken = True
                log.error("SQLite rolled back a group of committed requests; the store has stopped")
            return
        try:
            self._conn.execute("ROLLBACK TO request")
            self._conn.execute("RELEASE request")
        except sqlite3.Error:
            self._broken = True
            log.exception("could not roll back to a savepoint; the store has stopped")

    def _commit_group(self) -> None:
        """Commit the open group (under the connection's lock): its changes reach the WAL file."""
        with self._lock:
            if self._broken:
                raise StoreError("the bank database stopped after a failed fsync or commit")
            if not self._group_open:
                return
            try:
                self._conn.execute("COMMIT")
            except sqlite3.Error as exc:
                self._broken = True
                with contextlib.suppress(sqlite3.Error):
                    self._conn.execute("ROLLBACK")
                raise StoreError("the bank's commit failed; the store has stopped") from exc
            finally:
                self._group_open = False
            if self._group_dirty:
                self._group_dirty = False
                self._written += 1
                self._maybe_checkpoint()

    def _maybe_checkpoint(self) -> None:
        """Start a background checkpoint every so many commits; finish it here once it is done.

        A checkpoint that runs while commits go on never catches up with the last frame, and
        SQLite writes the WAL from its start again only after one has: so the thread copies the
        bulk, and the few frames written meanwhile are copied here, between two transactions.
        """
        if self._memory:
            return
        if self._background is not None:
            if self._background.done():
                self._background = None
                self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        elif self._written - self._checkpointed_at >= CHECKPOINT_EVERY:
            self._checkpointed_at = self._written
            self._background = self._checkpointer.submit(self._checkpoint)

    def sync(self, commit: int) -> None:
        """Block until commit number ``commit`` is on disk (for commands and threads)."""
        if commit > self._written:
            self._commit_group()
        with self._sync_lock:
            if self._synced >= commit:
                return
            if self._broken:
                raise StoreError("the bank database stopped after a failed fsync")
            target = self._written  # every commit counted here is already in the WAL file
            if self._memory:
                self._synced = target
                return
            try:
                os.fdatasync(self._wal())
            except OSError as exc:
                self._broken = True
                raise StoreError("fsync of the bank's WAL failed; the store has stopped") from exc
            self._synced = max(self._synced, target)
            self.syncs += 1

    async def durable(self, commit: int) -> None:
        """Wait until commit number ``commit`` is on disk, sharing one sync with every other waiter."""
        loop = asyncio.get_running_loop()
        if commit > self._written:
            self._commit_group()  # here, on the loop: the sync thread only syncs
        while self._synced < commit:
            pending = self._pending
            if pending is None or pending[0] is not loop or pending[1].done():
                future = loop.run_in_executor(self._syncer, self.sync, self._written)
                self._pending = pending = (loop, future)
            await asyncio.shield(pending[1])

    def _checkpoint(self) -> None:
        """Copy the WAL into the database (PASSIVE: never waits for, nor blocks, the writer)."""
        try:
            if self._checkpoint_conn is None:
                self._checkpoint_conn = sqlite3.connect(self._path, isolation_level=None,
                                                        check_same_thread=False, timeout=_BUSY_TIMEOUT_S)
            self._checkpoint_conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error:
            log.warning("WAL checkpoint failed; retrying after the next %d commits", CHECKPOINT_EVERY,
                        exc_info=True)

    def _wal(self) -> int:
        """A descriptor of the WAL file as it is now (SQLite may have replaced it)."""
        wal = self._path + "-wal"
        if self._wal_fd is not None:
            try:
                if os.stat(wal).st_ino == os.fstat(self._wal_fd).st_ino:
                    return self._wal_fd
            except FileNotFoundError:
                pass
            os.close(self._wal_fd)
            self._wal_fd = None
        self._wal_fd = os.open(wal, os.O_RDWR | os.O_CLOEXEC)
        return self._wal_fd

    def close(self) -> None:
        if self._group_open and not self._broken:
            self.sync(self.commits)  # whatever the group holds was answered, or is about to be
        self._closed = True
        self._syncer.shutdown(wait=True)
        self._checkpointer.shutdown(wait=True)
        if self._checkpoint_conn is not None:
            self._checkpoint_conn.close()
        with self._lock:
            self._conn.close()
        if self._wal_fd is not None:
            os.close(self._wal_fd)
            self._wal_fd = None
