"""The vendor's durable memory: sessions, the last token of each, and a settlement outbox.

A token is on disk before its receipt leaves the device, so a crash never loses a token the user
was told we hold: it goes to the token log (:mod:`agents.vendor.tokenlog`, one ``fdatasync``
of a preallocated file), which is folded into the session rows (SQLite, WAL,
``synchronous=FULL``) when it fills, before sessions are read, and when the store opens. A settlement is written to the outbox as
the exact signed bytes before it is sent; after a restart every unanswered entry is sent again
with the same ``req_id``, which the bank answers from its store — a settlement is never lost
and never credited twice.
"""

from __future__ import annotations

import sqlite3
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
    answer BLOB
);
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


class VendorStore:
    """SQLite in WAL mode with durable commits; one writer (the vendor process)."""

    def __init__(self, path: Path) -> None:
        create_private(path)  # 0600 before SQLite makes it (its journal files take its mode)
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._log = TokenLog(path.with_name(path.name + ".tokens"))
        self._positions: dict[bytes, int] = {}  # latest position per session, log included
        self._unfolded: dict[bytes, TokenRecord] = {}  # latest record per session since the last fold
        self._apply(list(self._log.records()))  # whatever a crash left in the log

    def close(self) -> None:
        self._fold()
        self._log.close()
        self._db.close()

    def _apply(self, records: list[TokenRecord]) -> None:
        """Move sessions down to the records' positions, in one durable transaction."""
        if not records:
            return
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.executemany(
                "UPDATE sessions SET position = ?, last = ?, last_paid = MAX(last_paid, ?)"
                " WHERE session = ? AND position > ?",
                [(r.position, r.token, r.time, r.session, r.position) for r in records])
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

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

    def set_state(self, session: bytes, state: str, credited: int | None = None) -> None:
        if state == "closed":
            self._fold()
            self._positions.pop(session, None)
        if credited is None:
            self._db.execute("UPDATE sessions SET state = ? WHERE session = ?", (state, session))
        else:
            self._db.execute("UPDATE sessions SET state = ?, credited = ? WHERE session = ?",
                             (state, credited, session))

    def session(self, session: bytes) -> StoredSession | None:
        self._fold()
        row = self._db.execute("SELECT * FROM sessions WHERE session = ?", (session,)).fetchone()
        return None if row is None else StoredSession(*row)

    def sessions(self, *states: str) -> list[StoredSession]:
        """Sessions in any of ``states`` (all when none are named)."""
        self._fold()
        if states:
            marks = ",".join("?" * len(states))
            rows = self._db.execute(f"SELECT * FROM sessions WHERE state IN ({marks})", states).fetchall()
        else:
            rows = self._db.execute("SELECT * FROM sessions").fetchall()
        return [StoredSession(*r) for r in rows]

    def enqueue(self, entry: OutboxEntry, now: int) -> None:
        """Write a signed settlement before sending it."""
        self._db.execute("INSERT INTO outbox (req_id, session, keep_open, request, created) VALUES (?, ?, ?, ?, ?)",
                         (entry.req_id, entry.session, int(entry.keep_open), entry.request, now))

    def answered(self, req_id: bytes, answer: bytes) -> None:
        self._db.execute("UPDATE outbox SET answer = ? WHERE req_id = ?", (answer, req_id))

    def pending(self) -> list[OutboxEntry]:
        """Settlements sent but not answered yet, oldest first."""
        rows = self._db.execute("SELECT req_id, session, keep_open, request, answer FROM outbox "
                                "WHERE answer IS NULL ORDER BY created, rowid").fetchall()
        return [OutboxEntry(bytes(r[0]), bytes(r[1]), bool(r[2]), bytes(r[3]), None) for r in rows]
