"""The bank's schema as numbered, forward-only migrations, one text for SQLite and PostgreSQL.

``{blob}`` and ``{serial}`` are filled in per database; everything else is common SQL.
Amounts are integers in minor units. The journal is double-entry: every row moves ``amount``
from ``debit`` to ``credit``, so the balances of all accounts, the outside world included,
always sum to zero. ``accounts.balance`` is kept only for user accounts (it is checked under
lock before a debit); every other balance is read from the journal.
"""

from __future__ import annotations

MIGRATIONS: tuple[tuple[int, str], ...] = (
    (1, """
CREATE TABLE accounts (
    name TEXT PRIMARY KEY,
    kind TEXT NOT NULL,                -- user, vendor or system
    public_key {blob},
    balance BIGINT NOT NULL DEFAULT 0,
    created BIGINT NOT NULL
);
CREATE TABLE vendors (
    vendor TEXT PRIMARY KEY,
    account TEXT NOT NULL REFERENCES accounts(name),
    category TEXT NOT NULL,
    public_key {blob} NOT NULL,
    cert {blob} NOT NULL
);
CREATE TABLE keysets (
    id TEXT PRIMARY KEY,
    info {blob} NOT NULL,              -- KeysetInfo, deterministic CBOR
    retired INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE coins (
    tip {blob} PRIMARY KEY,
    keyset TEXT NOT NULL REFERENCES keysets(id),
    n INTEGER NOT NULL,
    token_value BIGINT NOT NULL,
    position INTEGER NOT NULL,
    last {blob} NOT NULL,
    status TEXT NOT NULL,
    session {blob},
    vendor TEXT,
    account TEXT,
    start INTEGER NOT NULL,
    deadline BIGINT NOT NULL,
    credited INTEGER NOT NULL
);
CREATE INDEX coins_open ON coins (status, deadline);
CREATE TABLE answers (
    signer TEXT NOT NULL,
    req_id {blob} NOT NULL,
    digest {blob} NOT NULL,
    answer {blob} NOT NULL,
    created BIGINT NOT NULL,
    PRIMARY KEY (signer, req_id)
);
CREATE TABLE journal (
    id {serial} PRIMARY KEY,
    ts BIGINT NOT NULL,
    debit TEXT NOT NULL,
    credit TEXT NOT NULL,
    amount BIGINT NOT NULL CHECK (amount > 0),
    kind TEXT NOT NULL,
    ref {blob}
);
CREATE INDEX journal_debit ON journal (debit);
CREATE INDEX journal_credit ON journal (credit);
"""),
    # Issuance: what each withdrawal issued, written in the withdrawal's own transaction. It
    # mirrors the journal's withdraw rows, so the audit can tell per keyset whether registered
    # coins claim more than was issued, and a deleted journal row shows as a mismatch between the
    # two sets of rows (no single "chain head" row that every request would have to lock).
    # Withdrawals journalled before this migration are copied in without a keyset (their coin
    # count is not recorded anywhere readable by SQL): the audit treats them as one pool that may
    # back coins of any keyset.
    (2, """
CREATE TABLE issuance (
    account TEXT NOT NULL,
    req_id {blob} NOT NULL,
    keyset TEXT,                       -- NULL: journalled before issuance was recorded
    coins INTEGER CHECK (coins > 0),   -- NULL with keyset
    value BIGINT NOT NULL CHECK (value > 0),
    balance BIGINT,                    -- the balance after the debit, as the answer reports it
    ts BIGINT NOT NULL,
    PRIMARY KEY (account, req_id)
);
CREATE INDEX issuance_keyset ON issuance (keyset);
INSERT INTO issuance (account, req_id, keyset, coins, value, balance, ts)
    SELECT debit, ref, NULL, NULL, amount, NULL, ts FROM journal WHERE kind = 'withdraw'
"""),
    # Vendor revocation: when ``bank vendor revoke`` revoked the vendor (NULL: not revoked). The
    # bank refuses a revoked vendor's blocks and settlements; the announcement lists it.
    (3, """
ALTER TABLE vendors ADD COLUMN revoked BIGINT
"""),
)

SYSTEM_ACCOUNTS = ("world", "outstanding")
"""``world``: money paid in and out of the system; ``outstanding``: the value of issued coins."""

DIALECTS = {
    "sqlite": {"blob": "BLOB", "serial": "INTEGER"},
    "postgresql": {"blob": "BYTEA", "serial": "BIGSERIAL"},
}
