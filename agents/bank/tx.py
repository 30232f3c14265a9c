"""One open transaction on the bank's database: its methods are the only SQL the bank runs.

Rows come back typed: :class:`~m2mpay.protocol.rules.bank.CoinRecord` and the row types of
:mod:`m2mpay.agents.bank.rows`. The two dialects differ
in two details only, handled here: PostgreSQL's ``%s`` placeholders and ``FOR UPDATE`` (SQLite's
``BEGIN IMMEDIATE`` already holds the database's one write lock).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from m2mpay.protocol.envelope import StoredAnswer
from m2mpay.protocol.messages import KeysetInfo, KeysetPhase
from m2mpay.protocol.rules.bank import BlockStatus, CoinRecord

from .ledger import Rows, SignerKind
from .rows import Account, AccountRow, Entry, Issue, KeysetRow, VendorRow
from .sqlite import StoreError

__all__ = ["FINAL_ID_LOCK_TIMEOUT_MS", "Tx"]

FINAL_ID_LOCK_TIMEOUT_MS = 200
"""How long :meth:`Tx.final_journal_id` waits on PostgreSQL for the journal's writers: a
``/metrics`` scrape must not stall settlements for longer."""


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

    @property
    def dialect(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return "postgresql" if self._pg else "sqlite"

    # --- plumbing: raw SQL, for the methods below, migrations and tests ----------------------
    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """Run one statement (``?`` placeholders) and return the cursor."""
        if self._pg:
            sql = sql.replace("?", "%s")
        return self._conn.execute(sql, tuple(params))

    def one(self, sql: str, params: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        """The first row of a query, or ``None``."""
        row = self.execute(sql, params).fetchone()
        return None if row is None else tuple(row)

    def all(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Every row of a query."""
        return [tuple(r) for r in self.execute(sql, params).fetchall()]

    def _lock(self) -> str:
        return " FOR UPDATE" if self._pg else ""

    # --- accounts and the journal ----------------------------------------------------------
    def account(self, name: str, *, lock: bool = False) -> Account | None:
        """An account, locked for the transaction with ``lock``."""
        lock_clause = self._lock() if lock else ""  # the engine's FOR UPDATE or nothing: no input in the text
        query = "SELECT kind, public_key, balance FROM accounts WHERE name = ?" + lock_clause  # noqa: S608 - no input in the text
        row = self.one(query, (name,))
        return None if row is None else Account(str(row[0]), None if row[1] is None else bytes(row[1]), int(row[2]))

    def signer_key(self, kind: SignerKind, name: str) -> bytes | None:
        """The public key of a user account (``user``) or a vendor (``vendor``), ``None`` if none."""
        row = self.one("SELECT public_key FROM accounts WHERE name = ? AND kind = 'user'" if kind == "user"
                       else "SELECT public_key FROM vendors WHERE vendor = ?", (name,))
        return None if row is None or row[0] is None else bytes(row[0])

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
        # the columns are this class's constant and the lock clause the engine's: no input in the text
        query = f"SELECT {self._COIN_COLUMNS} FROM coins WHERE tip = ?" + (self._lock() if lock else "")  # noqa: S608 - constant text
        row = self.one(query, (tip,))
        return None if row is None else _record(row)

    def put_coin(self, record: CoinRecord, *, new: bool) -> None:
        values = (record.keyset, record.n, record.token_value, record.position, record.last, record.status.value,
                  record.session, record.vendor, record.account, record.start, record.deadline, record.credited)
        if new:
            self.execute(f"INSERT INTO coins ({self._COIN_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",  # noqa: S608 - constant columns
                         (record.tip, *values))
        else:
            self.execute("UPDATE coins SET keyset = ?, n = ?, token_value = ?, position = ?, last = ?, status = ?, "
                         "session = ?, vendor = ?, account = ?, start = ?, deadline = ?, credited = ? WHERE tip = ?",
                         (*values, record.tip))

    def coins(self) -> list[CoinRecord]:
        """Every coin's record."""
        return [_record(r) for r in self.all(f"SELECT {self._COIN_COLUMNS} FROM coins")]  # noqa: S608 - constant columns

    def due_to_lapse(self, now: int, limit: int = 500) -> list[bytes]:
        """Tips of open blocks whose deadline has passed (at most ``limit``)."""
        rows = self.all("SELECT tip FROM coins WHERE status = ? AND deadline <= ? LIMIT ?",
                        (BlockStatus.OPEN.value, now, limit))
        return [bytes(r[0]) for r in rows]


    # --- enrolment and keysets -------------------------------------------------------------
    def name_taken(self, name: str) -> bool:
        """Whether an account or a vendor has ``name`` (users and vendors share one name space)."""
        return self.one("SELECT 1 FROM accounts WHERE name = ? UNION ALL SELECT 1 FROM vendors WHERE vendor = ?",
                        (name, name)) is not None

    def add_vendor(self, vendor: str, account: str, category: str, public_key: bytes, cert: bytes) -> None:
        """Enrol a vendor (its account must exist)."""
        self.execute("INSERT INTO vendors (vendor, account, category, public_key, cert) VALUES (?, ?, ?, ?, ?)",
                     (vendor, account, category, public_key, cert))

    def vendor(self, vendor: str) -> VendorRow | None:
        """An enrolled vendor."""
        row = self.one("SELECT vendor, account, category, cert, revoked FROM vendors WHERE vendor = ?", (vendor,))
        return None if row is None else _vendor(row)

    def vendors(self, *, revoked_only: bool = False) -> list[VendorRow]:
        """Every vendor by name; with ``revoked_only`` the revoked ones, the latest revoked first."""
        if revoked_only:
            rows = self.all("SELECT vendor, account, category, cert, revoked FROM vendors WHERE revoked IS NOT NULL"
                            " ORDER BY revoked DESC, vendor")
        else:
            rows = self.all("SELECT vendor, account, category, cert, revoked FROM vendors ORDER BY vendor")
        return [_vendor(r) for r in rows]

    def revoke(self, vendor: str, now: int) -> None:
        """Mark ``vendor`` revoked at ``now``."""
        self.execute("UPDATE vendors SET revoked = ? WHERE vendor = ?", (now, vendor))

    def add_keyset(self, info: KeysetInfo) -> None:
        """Record a keyset's description."""
        self.execute("INSERT INTO keysets (id, info) VALUES (?, ?)", (info.id, info.encode()))

    def retire_keyset(self, keyset: str) -> bool:
        """Retire an active keyset; ``False`` if there is no such active keyset."""
        return bool(self.execute("UPDATE keysets SET retired = 1 WHERE id = ? AND retired = 0",
                                 (keyset,)).rowcount == 1)

    def keysets(self, *, active_only: bool = False) -> list[KeysetRow]:
        """Every keyset (or the ones not retired), by id."""
        rows = (self.all("SELECT info, retired FROM keysets WHERE retired = 0 ORDER BY id") if active_only
                else self.all("SELECT info, retired FROM keysets ORDER BY id"))
        return [KeysetRow(KeysetInfo.decode(bytes(r[0])), bool(r[1])) for r in rows]

    def keyset_phase(self, keyset: str) -> KeysetPhase | None:
        """A keyset's phase record (docs/LIFECYCLE.md), ``None`` if it has none: active by its dates."""
        row = self.one("SELECT phase FROM keysets WHERE id = ?", (keyset,))
        return None if row is None or row[0] is None else KeysetPhase.decode(bytes(row[0]))

    def keyset_phases(self) -> dict[str, KeysetPhase]:
        """Every phase record, by keyset id."""
        return {str(r[0]): KeysetPhase.decode(bytes(r[1]))
                for r in self.all("SELECT id, phase FROM keysets WHERE phase IS NOT NULL ORDER BY id")}

    def put_keyset_phase(self, record: KeysetPhase) -> None:
        """Store a keyset's phase record (a retired one is also marked ``retired``)."""
        self.execute("UPDATE keysets SET phase = ?, retired = ? WHERE id = ?",
                     (record.encode(), int(record.retired is not None), record.keyset))

    def unspent_coins(self, keyset: str) -> int:
        """How many coins of ``keyset`` the bank has seen that are not spent to the end."""
        row = self.one("SELECT COUNT(*) FROM coins WHERE keyset = ? AND position > 0", (keyset,))
        return 0 if row is None else int(row[0])

    # --- the books, read whole (audit, status, metrics) --------------------------------------
    def accounts(self, *, kind: str | None = None) -> list[AccountRow]:
        """Every account (or those of one kind), by name."""
        rows = (self.all("SELECT name, kind, balance FROM accounts ORDER BY name") if kind is None
                else self.all("SELECT name, kind, balance FROM accounts WHERE kind = ? ORDER BY name", (kind,)))
        return [AccountRow(str(r[0]), str(r[1]), int(r[2])) for r in rows]

    def journal(self) -> list[Entry]:
        """The whole journal, in order."""
        return [Entry(int(r[0]), str(r[1]), str(r[2]), int(r[3]), str(r[4]), None if r[5] is None else bytes(r[5]))
                for r in self.all("SELECT id, debit, credit, amount, kind, ref FROM journal ORDER BY id")]

    def issuance(self) -> list[Issue]:
        """Every issuance record."""
        return [Issue(str(r[0]), bytes(r[1]), None if r[2] is None else str(r[2]), None if r[3] is None else int(r[3]),
                      int(r[4]))
                for r in self.all("SELECT account, req_id, keyset, coins, value FROM issuance")]

    def moved_by_kind(self, *, after: int = 0, upto: int | None = None) -> dict[str, int]:
        """Minor units moved by journal kind, over the rows whose id is above ``after`` and (with
        ``upto``) at most ``upto``."""
        if upto is None:
            rows = self.all("SELECT kind, SUM(amount) FROM journal WHERE id > ? GROUP BY kind", (after,))
        else:
            rows = self.all("SELECT kind, SUM(amount) FROM journal WHERE id > ? AND id <= ? GROUP BY kind",
                            (after, upto))
        return {str(k): int(v) for k, v in rows}

    def final_journal_id(self) -> int:
        """The highest journal id no running transaction can still commit a row at or below (0 if
        the journal is empty).

        On SQLite this transaction holds the one write lock, so every id it sees is final. On
        PostgreSQL ids come from a sequence and may commit out of order, so the table is locked in
        ``SHARE MODE`` first, which waits for the transactions writing to it; the wait is bounded
        by :data:`FINAL_ID_LOCK_TIMEOUT_MS`, past which the statement fails with psycopg's
        ``LockNotAvailable`` (see :func:`~m2mpay.agents.bank.postgresql.is_lock_timeout`). Run it
        in a transaction of its own: the lock holds back new journal rows until it ends.
        """
        if self._pg:
            self.execute(f"SET LOCAL lock_timeout = '{FINAL_ID_LOCK_TIMEOUT_MS}ms'")
            self.execute("LOCK TABLE journal IN SHARE MODE")
        row = self.one("SELECT MAX(id) FROM journal")
        return 0 if row is None or row[0] is None else int(row[0])

    def account_totals(self) -> tuple[dict[str, int], dict[str, int]]:
        """Per account: what the journal credited to it, and what it debited from it."""
        credits = {str(k): int(v) for k, v in self.all("SELECT credit, SUM(amount) FROM journal GROUP BY credit")}
        debits = {str(k): int(v) for k, v in self.all("SELECT debit, SUM(amount) FROM journal GROUP BY debit")}
        return credits, debits

    def keyset_totals(self) -> tuple[dict[str, int], dict[str, int]]:
        """Per keyset: the value withdrawals issued, and what its coins have been credited."""
        issued = {str(k): int(v) for k, v in self.all(
            "SELECT keyset, SUM(value) FROM issuance WHERE keyset IS NOT NULL GROUP BY keyset")}
        paid = {str(k): int(v) for k, v in self.all(
            "SELECT c.keyset, SUM(j.amount) FROM journal j JOIN coins c ON c.tip = j.ref WHERE j.kind LIKE ?"
            " GROUP BY c.keyset", ("credit:%",))}
        return issued, paid

    def open_blocks(self, *, after: int | None = None) -> int:
        """How many coins are blocked (with ``after``: whose deadline is later)."""
        if after is None:
            row = self.one("SELECT COUNT(*) FROM coins WHERE status = ?", (BlockStatus.OPEN.value,))
        else:
            row = self.one("SELECT COUNT(*) FROM coins WHERE status = ? AND deadline > ?",
                           (BlockStatus.OPEN.value, after))
        return 0 if row is None else int(row[0])

    def stored_answers(self) -> list[tuple[str, bytes, bytes]]:
        """Every stored answer as ``(signer, req_id, answer)``."""
        return [(str(r[0]), bytes(r[1]), bytes(r[2])) for r in self.all("SELECT signer, req_id, answer FROM answers")]


def _vendor(row: tuple[Any, ...]) -> VendorRow:
    return VendorRow(str(row[0]), str(row[1]), str(row[2]), bytes(row[3]), None if row[4] is None else int(row[4]))


def _record(row: tuple[Any, ...]) -> CoinRecord:
    return CoinRecord(
        tip=bytes(row[0]), keyset=row[1], n=int(row[2]), token_value=int(row[3]), position=int(row[4]),
        last=bytes(row[5]), status=BlockStatus(row[6]), session=None if row[7] is None else bytes(row[7]),
        vendor=row[8], account=row[9], start=int(row[10]), deadline=int(row[11]), credited=int(row[12]))
