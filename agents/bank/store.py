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
from dataclasses import dataclass, field
from typing import Any, TypeVar

from m2mpay.protocol.envelope import StoredAnswer
from m2mpay.protocol.rules.bank import BlockStatus, CoinRecord

from .postgresql import Book, NotFetched, PgEngine
from .schema import DIALECTS, MIGRATIONS, SYSTEM_ACCOUNTS, statements
from .sqlite import SqliteEngine, StoreError

__all__ = ["Rows", "Store", "StoreError", "Tx"]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Rows:
    """What a transaction reads before it decides, fetched in one round trip on PostgreSQL.

    ``coin``: the tip of the coin it changes, locked first (a transaction that names none
    changes nothing); ``answer``: the ``(signer, req_id)`` of the stored answer it looks up;
    ``vendor``: the vendor whose revocation it checks.
    """

    coin: bytes | None = None
    answer: tuple[str, bytes] | None = None
    vendor: str | None = None

    def fetch(self) -> tuple[bytes | None, str | None, bytes | None, str | None]:
        signer, req_id = self.answer or (None, None)
        return self.coin, signer, req_id, self.vendor


@dataclass
class _Fetched:
    """Rows read ahead of a transaction, by key; a key that is absent was not read."""

    coins: dict[bytes, CoinRecord | None] = field(default_factory=dict)
    answers: dict[tuple[str, bytes], StoredAnswer | None] = field(default_factory=dict)
    revoked: dict[str, bool] = field(default_factory=dict)

    @classmethod
    def from_row(cls, rows: Rows, row: tuple[Any, ...]) -> _Fetched:
        """The row of ``m2mpay_rows``: the coin's columns, the answer's two, the revocation."""
        fetched = cls()
        if rows.coin is not None:
            fetched.coins[rows.coin] = None if row[0] is None else _record(row[:13])
        if rows.answer is not None:
            fetched.answers[rows.answer] = None if row[13] is None else StoredAnswer(bytes(row[13]), bytes(row[14]))
        if rows.vendor is not None:
            fetched.revoked[rows.vendor] = bool(row[15])
        return fetched


class Tx:
    """One open transaction; its methods are the only SQL the bank runs."""

    def __init__(self, conn: Any, dialect: str, fetched: _Fetched | None = None) -> None:
        self._conn = conn
        self._pg = dialect == "postgresql"
        self._fetched = fetched or _Fetched()

    # --- plumbing --------------------------------------------------------------------------
    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        if self._pg:
            sql = sql.replace("?", "%s")
        return self._conn.execute(sql, tuple(params))

    def one(self, sql: str, params: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        row = self.execute(sql, params).fetchone()
        return None if row is None else tuple(row)

    def all(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return [tuple(r) for r in self.execute(sql, params).fetchall()]

    def _lock(self) -> str:
        return " FOR UPDATE" if self._pg else ""

    # --- accounts and the journal ----------------------------------------------------------
    def account(self, name: str, *, lock: bool = False) -> tuple[str, bytes | None, int] | None:
        """``(kind, public_key, balance)`` of an account."""
        row = self.one("SELECT kind, public_key, balance FROM accounts WHERE name = ?" + (self._lock() if lock else ""),
                       (name,))
        return None if row is None else (row[0], None if row[1] is None else bytes(row[1]), int(row[2]))

    def create_account(self, name: str, kind: str, public_key: bytes | None, now: int) -> None:
        self.execute("INSERT INTO accounts (name, kind, public_key, balance, created) VALUES (?, ?, ?, 0, ?)",
                     (name, kind, public_key, now))

    def transfer(self, debit: str, credit: str, amount: int, kind: str, ref: bytes | None, now: int,
                 *, running: tuple[str, ...] = ()) -> None:
        """Move ``amount`` from ``debit`` to ``credit``: one journal row.

        Only the accounts named in ``running`` (user accounts, whose balance is checked under
        lock before a debit) keep a running balance; vendor and system balances are sums over
        the journal. A running balance on ``outstanding`` would be one row that every
        settlement locks until it commits, serializing the whole bank.
        """
        if amount <= 0:
            return
        self.execute("INSERT INTO journal (ts, debit, credit, amount, kind, ref) VALUES (?, ?, ?, ?, ?, ?)",
                     (now, debit, credit, amount, kind, ref))
        if debit in running:
            self.execute("UPDATE accounts SET balance = balance - ? WHERE name = ?", (amount, debit))
        if credit in running:
            self.execute("UPDATE accounts SET balance = balance + ? WHERE name = ?", (amount, credit))

    def journal_balance(self, name: str) -> int:
        """An account's balance as the journal says: credits in minus debits out."""
        row = self.one("SELECT (SELECT COALESCE(SUM(amount), 0) FROM journal WHERE credit = ?)"
                       " - (SELECT COALESCE(SUM(amount), 0) FROM journal WHERE debit = ?)", (name, name))
        return 0 if row is None else int(row[0])

    # --- idempotency -----------------------------------------------------------------------
    def answer(self, signer: str, req_id: bytes) -> StoredAnswer | None:
        if (signer, req_id) in self._fetched.answers:
            return self._fetched.answers[signer, req_id]
        row = self.one("SELECT digest, answer FROM answers WHERE signer = ? AND req_id = ?", (signer, req_id))
        return None if row is None else StoredAnswer(bytes(row[0]), bytes(row[1]))

    def put_answer(self, signer: str, req_id: bytes, stored: StoredAnswer, now: int) -> None:
        self.execute("INSERT INTO answers (signer, req_id, digest, answer, created) VALUES (?, ?, ?, ?, ?)",
                     (signer, req_id, stored.digest, stored.answer, now))

    def fill_answer(self, signer: str, req_id: bytes, answer: bytes) -> bytes:
        """Store ``answer`` in place of a pending (empty) one; the answer now stored under the key.

        A twin that completed the same pending request first keeps its answer, and it is returned.
        """
        self.execute("UPDATE answers SET answer = ? WHERE signer = ? AND req_id = ? AND length(answer) = 0",
                     (answer, signer, req_id))
        row = self.one("SELECT answer FROM answers WHERE signer = ? AND req_id = ?", (signer, req_id))
        if row is None:
            raise StoreError("no pending answer to fill")
        return bytes(row[0])

    def vendor_revoked(self, vendor: str) -> bool:
        """Whether the bank revoked ``vendor`` (read in the transaction that acts for it)."""
        if vendor in self._fetched.revoked:
            return self._fetched.revoked[vendor]
        row = self.one("SELECT revoked FROM vendors WHERE vendor = ?", (vendor,))
        return row is not None and row[0] is not None

    # --- issuance --------------------------------------------------------------------------
    def issue(self, account: str, req_id: bytes, keyset: str, coins: int, value: int, balance: int,
              now: int) -> None:
        """Record what a withdrawal issued, in the transaction that journals its debit."""
        self.execute("INSERT INTO issuance (account, req_id, keyset, coins, value, balance, ts)"
                     " VALUES (?, ?, ?, ?, ?, ?, ?)", (account, req_id, keyset, coins, value, balance, now))

    def issued_balance(self, account: str, req_id: bytes) -> int:
        """The balance a recorded withdrawal left, as its answer reports it."""
        row = self.one("SELECT balance FROM issuance WHERE account = ? AND req_id = ?", (account, req_id))
        if row is None or row[0] is None:
            raise StoreError("no issuance recorded for this withdrawal")
        return int(row[0])

    # --- coins -----------------------------------------------------------------------------
    _COIN_COLUMNS = ("tip, keyset, n, token_value, position, last, status, session, vendor, account, "
                     "start, deadline, credited")

    def coin(self, tip: bytes, *, lock: bool = True) -> CoinRecord | None:
        if tip in self._fetched.coins:  # fetched locked
            return self._fetched.coins[tip]
        row = self.one(f"SELECT {self._COIN_COLUMNS} FROM coins WHERE tip = ?" + (self._lock() if lock else ""), (tip,))
        return None if row is None else _record(row)

    def put_coin(self, record: CoinRecord, *, new: bool) -> None:
        values = (record.keyset, record.n, record.token_value, record.position, record.last, record.status.value,
                  record.session, record.vendor, record.account, record.start, record.deadline, record.credited)
        if new:
            self.execute(f"INSERT INTO coins ({self._COIN_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                         (record.tip, *values))
        else:
            self.execute("UPDATE coins SET keyset = ?, n = ?, token_value = ?, position = ?, last = ?, status = ?, "
                         "session = ?, vendor = ?, account = ?, start = ?, deadline = ?, credited = ? WHERE tip = ?",
                         (*values, record.tip))

    def coins(self) -> list[CoinRecord]:
        return [_record(r) for r in self.all(f"SELECT {self._COIN_COLUMNS} FROM coins")]

    def due_to_lapse(self, now: int, limit: int = 500) -> list[bytes]:
        rows = self.all("SELECT tip FROM coins WHERE status = ? AND deadline <= ? LIMIT ?",
                        (BlockStatus.OPEN.value, now, limit))
        return [bytes(r[0]) for r in rows]


def _record(row: tuple[Any, ...]) -> CoinRecord:
    return CoinRecord(
        tip=bytes(row[0]), keyset=row[1], n=int(row[2]), token_value=int(row[3]), position=int(row[4]),
        last=bytes(row[5]), status=BlockStatus(row[6]), session=None if row[7] is None else bytes(row[7]),
        vendor=row[8], account=row[9], start=int(row[10]), deadline=int(row[11]), credited=int(row[12]))


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


class Store:
    """A bank database. ``url`` is a SQLite file path (or ``sqlite:///path``) or ``postgresql://…``."""

    def __init__(self, url: str, *, connections: int = 1) -> None:
        self.url = url
        self.dialect = "postgresql" if url.startswith(("postgresql://", "postgres://")) else "sqlite"
        self._pg: PgEngine | None = None
        self._sqlite: SqliteEngine | None = None
        if self.dialect == "postgresql":
            self._pg = PgEngine(url, connections)
        else:
            self._sqlite = SqliteEngine(url.removeprefix("sqlite:///"))
        self.run_sync(_migrate)

    def run_sync(self, fn: Callable[[Tx], T]) -> T:
        """Run ``fn`` in one transaction and wait until it is durable (for commands, not the event loop)."""
        if self._sqlite is not None:
            result, commit = self._sqlite.transaction(lambda conn: fn(Tx(conn, "sqlite")))
            self._sqlite.sync(commit)
            return result
        return self._postgresql().run_sync(lambda conn: fn(Tx(conn, "postgresql")))

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
        if self._sqlite is not None:
            # Each statement costs a few µs in the process: fetching the rows ahead saves nothing
            # measurable here, so SQLite runs ``fn`` as it is (``rows`` is for PostgreSQL).
            result, commit = self._sqlite.transaction(lambda conn: fn(Tx(conn, "sqlite")))
            if not defer_sync:
                await self._sqlite.durable(commit)
            return result
        pg = self._postgresql()
        if rows is not None:

            def decide(row: tuple[Any, ...]) -> tuple[T, Book | None]:
                tx = _BufferedTx(_Fetched.from_row(rows, row), writable=rows.coin is not None)
                return fn(tx), tx.book()

            try:
                return await pg.fetched(rows.fetch(), decide)
            except NotFetched:
                pass  # nothing was changed: the general road below does it all
        return await pg.run(lambda conn: fn(Tx(conn, "postgresql")))

    def _postgresql(self) -> PgEngine:
        if self._pg is None:
            raise StoreError("not a PostgreSQL store")
        return self._pg

    def flush(self) -> None:
        """Make every commit so far durable (SQLite: one ``fdatasync`` if any is pending)."""
        if self._sqlite is not None:
            self._sqlite.sync(self._sqlite.commits)

    @property
    def commits(self) -> int:
        """A mark for :meth:`durable`: the commits so far."""
        return 0 if self._sqlite is None else self._sqlite.commits

    async def durable(self, mark: int) -> None:
        """Wait, on the sync thread, until the commits up to ``mark`` are on disk (shared by all waiters)."""
        if self._sqlite is not None:
            await self._sqlite.durable(mark)

    def close(self) -> None:
        """Close every connection and stop the threads."""
        if self._sqlite is not None:
            self._sqlite.close()
        elif self._pg is not None:
            self._pg.close()


def _migrate(tx: Tx) -> None:
    """Apply the migrations this database has not seen, in order."""
    tx.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    row = tx.one("SELECT MAX(version) FROM schema_version")
    current = 0 if row is None or row[0] is None else int(row[0])
    dialect = "postgresql" if tx._pg else "sqlite"
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
