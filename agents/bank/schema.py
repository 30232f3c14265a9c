"""The bank's schema as numbered, forward-only migrations, one text for SQLite and PostgreSQL.

``{blob}`` and ``{serial}`` are filled in per database; everything else is common SQL, except a
migration given as one text per database (server-side functions exist only on PostgreSQL), which
is used as it is.
Amounts are integers in minor units. The journal is double-entry: every row moves ``amount``
from ``debit`` to ``credit``, so the balances of all accounts, the outside world included,
always sum to zero. ``accounts.balance`` is kept only for user accounts (it is checked under
lock before a debit); every other balance is read from the journal.
"""

from __future__ import annotations

MIGRATIONS: tuple[tuple[int, str | dict[str, str]], ...] = (
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
    # One round trip for each half of a request on PostgreSQL (see agents.bank.postgresql):
    # ``m2mpay_rows`` locks the coin and then reads what the rules need; ``m2mpay_book`` applies
    # what they decided. The rules stay in Python; these only move rows. SQLite, in the process,
    # runs the same statements one by one and records the version with nothing to do.
    (4, {"sqlite": "", "postgresql": """
CREATE FUNCTION m2mpay_rows(
    p_tip BYTEA, p_signer TEXT, p_req_id BYTEA, p_vendor TEXT,
    OUT c_tip BYTEA, OUT c_keyset TEXT, OUT c_n INTEGER, OUT c_token_value BIGINT, OUT c_position INTEGER,
    OUT c_last BYTEA, OUT c_status TEXT, OUT c_session BYTEA, OUT c_vendor TEXT, OUT c_account TEXT,
    OUT c_start INTEGER, OUT c_deadline BIGINT, OUT c_credited INTEGER,
    OUT a_digest BYTEA, OUT a_answer BYTEA, OUT v_revoked BOOLEAN)
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    -- The coin first, and locked: a twin of this request waits here until the other commits.
    -- Each statement of a VOLATILE function takes a new snapshot (READ COMMITTED), so the
    -- answer read next is the twin's, as when these were separate statements.
    IF p_tip IS NOT NULL THEN
        SELECT tip, keyset, n, token_value, position, last, status, session, vendor, account, start,
               deadline, credited
          INTO c_tip, c_keyset, c_n, c_token_value, c_position, c_last, c_status, c_session, c_vendor,
               c_account, c_start, c_deadline, c_credited
          FROM coins WHERE tip = p_tip FOR UPDATE;
    END IF;
    IF p_signer IS NOT NULL THEN
        SELECT digest, answer INTO a_digest, a_answer FROM answers WHERE signer = p_signer AND req_id = p_req_id;
    END IF;
    IF p_vendor IS NOT NULL THEN
        v_revoked := EXISTS (SELECT 1 FROM vendors WHERE vendor = p_vendor AND revoked IS NOT NULL);
    END IF;
END
$$;
CREATE FUNCTION m2mpay_book(
    p_new BOOLEAN, p_tip BYTEA, p_keyset TEXT, p_n INTEGER, p_token_value BIGINT, p_position INTEGER,
    p_last BYTEA, p_status TEXT, p_session BYTEA, p_vendor TEXT, p_account TEXT, p_start INTEGER,
    p_deadline BIGINT, p_credited INTEGER,
    p_ts BIGINT[], p_debit TEXT[], p_credit TEXT[], p_amount BIGINT[], p_kind TEXT[], p_ref BYTEA[],
    p_signer TEXT, p_req_id BYTEA, p_digest BYTEA, p_answer BYTEA, p_created BIGINT)
RETURNS VOID LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    -- p_new NULL: the coin is not changed.
    IF p_new THEN
        INSERT INTO coins (tip, keyset, n, token_value, position, last, status, session, vendor, account,
                           start, deadline, credited)
        VALUES (p_tip, p_keyset, p_n, p_token_value, p_position, p_last, p_status, p_session, p_vendor,
                p_account, p_start, p_deadline, p_credited);
    ELSIF NOT p_new THEN
        UPDATE coins SET keyset = p_keyset, n = p_n, token_value = p_token_value, position = p_position,
                         last = p_last, status = p_status, session = p_session, vendor = p_vendor,
                         account = p_account, start = p_start, deadline = p_deadline, credited = p_credited
         WHERE tip = p_tip;
    END IF;
    IF cardinality(p_amount) > 0 THEN
        INSERT INTO journal (ts, debit, credit, amount, kind, ref)
        SELECT ts, debit, credit, amount, kind, ref
          FROM unnest(p_ts, p_debit, p_credit, p_amount, p_kind, p_ref)
               WITH ORDINALITY AS j (ts, debit, credit, amount, kind, ref, i)
         ORDER BY i;
    END IF;
    IF p_signer IS NOT NULL THEN
        INSERT INTO answers (signer, req_id, digest, answer, created)
        VALUES (p_signer, p_req_id, p_digest, p_answer, p_created);
    END IF;
END
$$
"""}),
    # Keyset phases (docs/LIFECYCLE.md): the keyset's KeysetPhase record, deterministic CBOR (NULL:
    # none, active by its dates). ``bank keyset retire`` writes one; the announcement carries them.
    # A keyset retired before this migration gets its record when the bank next loads its keys.
    (5, """
ALTER TABLE keysets ADD COLUMN phase {blob}
"""),
    # Exchanges (docs/LIFECYCLE.md): one row per exchanged coin, for ever, keyed by its tip (a
    # coin is exchanged at most once); the request's hash and the answer make a retry get the
    # same bytes. ``exchange_outputs`` is what it issued per keyset (the audit's
    # issued_by_exchange), ``signed_messages`` every blinded message it had signed (never twice).
    (6, """
CREATE TABLE exchanges (
    tip {blob} PRIMARY KEY,
    req_id {blob} NOT NULL,
    request_hash {blob} NOT NULL,      -- SHA-256 of the exact request bytes
    keyset TEXT NOT NULL,              -- the exchanged coin's
    tokens INTEGER NOT NULL CHECK (tokens > 0),
    value BIGINT NOT NULL CHECK (value > 0),
    change_used {blob} NOT NULL,       -- CBOR list of the change slots signed
    answer {blob} NOT NULL,            -- empty until the outputs are signed
    ts BIGINT NOT NULL
);
CREATE TABLE exchange_outputs (
    tip {blob} NOT NULL,
    keyset TEXT NOT NULL,
    coins INTEGER NOT NULL CHECK (coins > 0),
    value BIGINT NOT NULL CHECK (value > 0),
    PRIMARY KEY (tip, keyset)
);
CREATE TABLE signed_messages (
    blinded {blob} PRIMARY KEY,
    keyset TEXT NOT NULL,
    tip {blob} NOT NULL                -- the exchange that had it signed
)
"""),
    # Every blinded message a withdrawal paid for, written with its debit: a withdrawal or an
    # exchange refuses a message signed before (``replay``: a restored wallet replaying a counter
    # would pay twice for one coin), and a restore finds here, and in ``signed_messages``, what the
    # bank signed. Withdrawals made before this migration are not recorded: restore does not find them.
    (7, """
CREATE TABLE withdrawn_messages (
    blinded {blob} PRIMARY KEY,
    keyset TEXT NOT NULL,
    account TEXT NOT NULL,
    req_id {blob} NOT NULL             -- the withdrawal that had it signed, with the account
)
"""),
)

SYSTEM_ACCOUNTS = ("world", "outstanding")
"""``world``: money paid in and out of the system; ``outstanding``: the value of issued coins."""

DIALECTS = {
    "sqlite": {"blob": "BLOB", "serial": "INTEGER"},
    "postgresql": {"blob": "BYTEA", "serial": "BIGSERIAL"},
}


def statements(script: str) -> list[str]:
    """The statements of a migration script: split at each ``;`` that is not inside a ``$$``
    function body."""
    parts, current, quoted = [], [], False
    for piece in script.split("$$"):
        if quoted:
            current.append("$$" + piece + "$$")
        else:
            *done, rest = piece.split(";")
            for text in done:
                parts.append("".join(current) + text)
                current = []
            current.append(rest)
        quoted = not quoted
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]
