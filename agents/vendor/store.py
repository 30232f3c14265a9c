"""The vendor's durable memory: sessions, the last token of each, and a settlement outbox.

A token is on disk before its receipt leaves the device, so a crash never loses a token the user
was told we hold: it goes to the token log (:mod:`m2mpay.agents.vendor.tokenlog`, one ``fdatasync``
of a preallocated file), which is folded into the session rows (SQLite, WAL,
``synchronous=FULL``) when it fills, before sessions are read, and when the store opens. A
settlement is written to the outbox as the exact signed bytes before it is sent, in the same
transaction that marks its session ``closing``; after a restart every ``queued`` entry is sent
again with the same ``req_id``, which the bank answers from its store — a settlement is never
lost and never credited twice. An entry leaves the queue only with the bank's signed answer
(``answered``), a refusal for good (``refused``), or when the session's final settlement covers
it (``superseded``); the outbox's primary key is its ``req_id``, and nothing inserts one twice.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..files import create_private
from .tokenlog import TokenLog, TokenRecord

__all__ = ["OutboxEntry", "StoredSession", "VendorStore"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    session BLOB PRIMARY KEY,
    tip BLOB NOT NULL,
    token_value INTEGER NOT NULL,
    start INTEGER NOT NULL,
    position INTEGER NOT NULL,
    last BLOB NOT NULL,
    deadline INTEGER NOT NULL,
    state TEXT NOT NULL,
    opened INTEGER NOT NULL,
    last_paid INTEGER NOT NULL,
    credited INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS outbox (
    req_id BLOB PRIMARY KEY,
    session BLOB NOT NULL REFERENCES sessions(session),
    keep_open INTEGER NOT NULL,
    request BLOB NOT NULL,
    created INTEGER NOT NULL,
    answer BLOB,
    state TEXT NOT NULL DEFAULT 'queued'
);
"""

_VERSION = 1
# Earlier versions marked a settlement the bank never answered as answered with no bytes, and
# never sent it again. Those of sessions still open are queued again: a repeat is answered from
# the bank's store, so this credits nothing twice.
_TO_V1 = """
ALTER TABLE outbox ADD COLUMN state TEXT NOT NULL DEFAULT 'queued';
UPDATE outbox SET state = 'answered' WHERE answer IS NOT NULL AND answer != x'';
UPDATE outbox SET state = 'queued', answer = NULL
    WHERE answer = x'' AND session IN (SELECT session FROM sessions WHERE state = 'open');
UPDATE outbox SET state = 'refused' WHERE answer = x'';
"""


@dataclass(frozen=True, slots=True)
class StoredSession:
    """A session as the vendor last committed it."""

    session: bytes
    tip: bytes
    token_value: int
    start: int
    position: int
    last: bytes
    deadline: int
    state: str
    opened: int
    last_paid: int
    credited: int

    @property
    def paid(self) -> int:
        """Tokens held for this session, the blocking token included."""
        return self.start - self.position


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    """A signed settlement waiting for (or having got) the bank's answer."""

    req_id: bytes
    session: bytes
    keep_open: bool
    request: bytes
    answer: bytes | None
    state: str = "queued"


class VendorStore:
    """SQLite in WAL mode with durable commits; one writer (the vendor process)."""

    def __init__(self, path: Path) -> None:
        create_private(path)  # 0600 before SQLite makes it (its journal files take its mode)
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._migrate()
        self._log = TokenLog(path.with_name(path.name + ".tokens"))
        self._positions: dict[bytes, int] = {}  # latest position per session, log included
        self._unfolded: dict[bytes, TokenRecord] = {}  # latest record per session since the last fold
        self._apply(list(self._log.records()))  # whatever a crash left in the log

    def _migrate(self) -> None:
        """Create the tables, or bring an older file up to :data:`_VERSION`, in one transaction."""
        (version,) = self._db.execute("PRAGMA user_version").fetchone()
        if version >= _VERSION:
            return
        with self._transaction():
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(outbox)")}
            if columns and "state" not in columns:
                for statement in _TO_V1.split(";"):
                    if statement.strip():
                        self._db.execute(statement)
            else:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        self._db.execute(statement)
            self._db.execute(f"PRAGMA user_version = {_VERSION}")

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)

    def close(self) -> None:
        """Fold the token log and close the files."""
        self._fold()
        self._log.close()
        self._db.close()

    def _apply(self, records: list[TokenRecord]) -> None:
        """Move sessions down to the records' positions, in one durable transaction."""
        if not records:
            return
        with self._transaction():
            self._db.executemany(
                "UPDATE sessions SET position = ?, last = ?, last_paid = MAX(last_paid, ?)"
                " WHERE session = ? AND position > ?",
                [(r.position, r.token, r.time, r.session, r.position) for r in records])

    def _fold(self) -> None:
        """Write the log's news into the session rows; then the log may start again."""
        self._apply(list(self._unfolded.values()))
        self._unfolded.clear()
        self._log.reset()

    def open_session(self, s: StoredSession) -> None:
        """Record a session the bank has just blocked a coin for."""
        self._db.execute(
            "INSERT INTO sessions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (s.session, s.tip, s.token_value, s.start, s.position, s.last, s.deadline, s.state, s.opened,
             s.last_paid, s.credited))

    def record_token(self, session: bytes, index: int, token: bytes, now: int) -> bool:
        """Keep a newly paid token; ``False`` if the session already holds this one or a lower one."""
        known = self._positions.get(session)
        if known is None:
            row = self._db.execute("SELECT position FROM sessions WHERE session = ?", (session,)).fetchone()
            if row is None:
                return False
            known = int(row[0])
        if index >= known:
            return False
        if self._log.full:
            self._fold()
        record = TokenRecord(session, index, token, now)
        self._log.append(record)  # on disk when this returns
        self._positions[session] = index
        self._unfolded[session] = record
        return True

    def write(self, session: bytes, *, state: str, credited: int, queued: OutboxEntry | None = None,
              finished: Iterable[tuple[bytes, str, bytes | None]] = (), now: int = 0) -> None:
        """One durable transaction: the session's ``state`` and ``credited``, a new outbox entry
        (``queued``, written at ``now``) and entries that leave the queue (``req_id``, state, the
        bank's answer bytes)."""
        if state in ("closed", "forfeited"):
            self._fold()
            self._positions.pop(session, None)
        with self._transaction():
            self._db.execute("UPDATE sessions SET state = ?, credited = ? WHERE session = ?",
                             (state, credited, session))
            if queued is not None:
                self._db.execute("INSERT INTO outbox (req_id, session, keep_open, request, created, state)"
                                 " VALUES (?, ?, ?, ?, ?, ?)",
                                 (queued.req_id, queued.session, int(queued.keep_open), queued.request, now,
                                  queued.state))
            self._db.executemany("UPDATE outbox SET state = ?, answer = ? WHERE req_id = ?",
                                 [(entry_state, answer, req_id) for req_id, entry_state, answer in finished])

    def session(self, session: bytes) -> StoredSession | None:
        """One session as last written (tokens in the log included), or ``None``."""
        self._fold()
        row = self._db.execute("SELECT * FROM sessions WHERE session = ?", (session,)).fetchone()
        return None if row is None else StoredSession(*row)

    def sessions(self, *states: str) -> list[StoredSession]:
        """Sessions in any of ``states`` (all when none are named)."""
        self._fold()
        if states:
            marks = ",".join("?" * len(states))
            query = f"SELECT * FROM sessions WHERE state IN ({marks})"  # noqa: S608 - only "?" marks
            rows = self._db.execute(query, states).fetchall()
        else:
            rows = self._db.execute("SELECT * FROM sessions").fetchall()
        return [StoredSession(*r) for r in rows]

    def pending(self) -> list[OutboxEntry]:
        """Settlements not answered yet (``queued``), oldest first."""
        rows = self._db.execute("SELECT req_id, session, keep_open, request, answer, state FROM outbox "
                                "WHERE state = 'queued' ORDER BY created, rowid").fetchall()
        return [OutboxEntry(bytes(r[0]), bytes(r[1]), bool(r[2]), bytes(r[3]), None, str(r[5])) for r in rows]

    def outbox(self, session: bytes) -> list[OutboxEntry]:
        """Every outbox entry of ``session``, oldest first."""
        rows = self._db.execute("SELECT req_id, session, keep_open, request, answer, state FROM outbox "
                                "WHERE session = ? ORDER BY created, rowid", (session,)).fetchall()
        return [OutboxEntry(bytes(r[0]), bytes(r[1]), bool(r[2]), bytes(r[3]),
                            None if r[4] is None else bytes(r[4]), str(r[5])) for r in rows]


class _Transaction:
    """``BEGIN IMMEDIATE`` … ``COMMIT``, or ``ROLLBACK`` when the block raises."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        self._db.execute("COMMIT" if kind is None else "ROLLBACK")
