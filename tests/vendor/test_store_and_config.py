"""The vendor's configuration and durable store, across a simulated restart."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from m2mpay.agents.vendor.config import ConfigError, VendorConfig
from m2mpay.agents.vendor.store import OutboxEntry, StoredSession, VendorStore


def test_config_from_toml(tmp_path: Path) -> None:
    path = tmp_path / "vendor.toml"
    path.write_text('[pricing]\nservice = "parking"\nprice = 2\nmeter_interval = 60\n[session]\nblock_window = 600\n')
    config = VendorConfig.load(path)
    assert (config.pricing.service, config.pricing.price, config.pricing.meter_interval) == ("parking", 2, 60.0)
    assert config.session.block_window == 600 and config.session.settle_margin == 60


@pytest.mark.parametrize("text", [
    "[pricing]\nprize = 1\n",  # a typo is an error, not a silent default
    "[pricing]\nprice = true\n",
    "[pricing]\nprice = 0\n",
    "[session]\nblock_window = 30\nsettle_margin = 60\n",
    "[extra]\n",
    "[pricing\n",
], ids=["unknown-key", "bool", "zero-price", "margin-beyond-window", "unknown-table", "not-toml"])
def test_config_refusals(tmp_path: Path, text: str) -> None:
    path = tmp_path / "vendor.toml"
    path.write_text(text)
    with pytest.raises(ConfigError):
        VendorConfig.load(path)


def _session(sid: bytes) -> StoredSession:
    return StoredSession(session=sid, tip=os.urandom(32), token_value=1, start=100, position=99, last=os.urandom(32),
                         deadline=2_000, state="open", opened=1_000, last_paid=1_000, credited=0)


def test_tokens_and_outbox_survive_a_restart(tmp_path: Path) -> None:
    store = VendorStore(tmp_path / "vendor.sqlite3")
    sid = os.urandom(16)
    store.open_session(_session(sid))
    token = os.urandom(32)
    assert store.record_token(sid, 95, token, 1_010)
    assert not store.record_token(sid, 95, token, 1_011)  # a retransmission changes nothing
    assert not store.record_token(sid, 97, os.urandom(32), 1_012)  # never move back up the chain
    entry = OutboxEntry(req_id=os.urandom(16), session=sid, keep_open=False, request=b"signed", answer=None)
    store.write(sid, state="closing", credited=0, queued=entry, now=1_020)  # one transaction
    store.close()  # the process dies here, before the bank answered

    again = VendorStore(tmp_path / "vendor.sqlite3")
    held = again.session(sid)
    assert held is not None and (held.position, held.last, held.paid, held.state) == (95, token, 5, "closing")
    assert again.pending() == [entry]
    with pytest.raises(sqlite3.IntegrityError):  # a req_id is the outbox's key: never inserted twice
        again.write(sid, state="closing", credited=0, queued=entry, now=1_021)
    assert again.pending() == [entry] and again.session(sid).state == "closing"  # type: ignore[union-attr]
    again.write(sid, state="closed", credited=5, finished=[(entry.req_id, "answered", b"answer")])
    assert again.pending() == [] and again.sessions("open", "closing") == []
    assert again.sessions("closed")[0].credited == 5
    assert again.outbox(sid) == [OutboxEntry(entry.req_id, sid, False, b"signed", b"answer", "answered")]


def test_outbox_of_an_older_version_is_brought_up_to_date(tmp_path: Path) -> None:
    """Earlier versions marked a settlement the bank never answered as answered with no bytes and
    never sent it again: after the upgrade those of sessions still open are queued again."""
    path = tmp_path / "vendor.sqlite3"
    old = sqlite3.connect(path)
    old.executescript(_OLD_SCHEMA)
    abandoned, settled, refused = os.urandom(16), os.urandom(16), os.urandom(16)
    rows = [(abandoned, "open", b""), (settled, "closed", b"answer"), (refused, "closed", b"")]
    for sid, state, answer in rows:
        old.execute("INSERT INTO sessions VALUES (?, ?, 1, 100, 90, ?, 2000, ?, 1000, 1000, 0)",
                    (sid, os.urandom(32), os.urandom(32), state))
        old.execute("INSERT INTO outbox VALUES (?, ?, 0, ?, 1000, ?)", (sid[::-1], sid, b"signed", answer))
    old.commit()
    old.close()
    store = VendorStore(path)
    assert [(e.session, e.state) for e in store.pending()] == [(abandoned, "queued")]
    assert store.outbox(settled)[0].state == "answered" and store.outbox(refused)[0].state == "refused"
    store.close()
    assert [e.session for e in VendorStore(path).pending()] == [abandoned]  # migrated once


_OLD_SCHEMA = """
CREATE TABLE sessions (session BLOB PRIMARY KEY, tip BLOB NOT NULL, token_value INTEGER NOT NULL,
    start INTEGER NOT NULL, position INTEGER NOT NULL, last BLOB NOT NULL, deadline INTEGER NOT NULL,
    state TEXT NOT NULL, opened INTEGER NOT NULL, last_paid INTEGER NOT NULL, credited INTEGER NOT NULL DEFAULT 0);
CREATE TABLE outbox (req_id BLOB PRIMARY KEY, session BLOB NOT NULL REFERENCES sessions(session),
    keep_open INTEGER NOT NULL, request BLOB NOT NULL, created INTEGER NOT NULL, answer BLOB);
"""


def test_tokens_only_in_the_log_survive_a_crash(tmp_path: Path) -> None:
    """The process dies with tokens in the log and none folded into SQLite: the next start has them."""
    store = VendorStore(tmp_path / "vendor.sqlite3")
    sids = [os.urandom(16) for _ in range(3)]
    for sid in sids:
        store.open_session(_session(sid))
    last = {}
    for position in range(98, 90, -1):
        for sid in sids:
            last[sid] = os.urandom(32)
            assert store.record_token(sid, position, last[sid], 2_000 - position)
    # No close(): a second store opens the same files as a restart after kill -9 would.
    reborn = VendorStore(tmp_path / "vendor.sqlite3")
    for sid in sids:
        held = reborn.session(sid)
        assert held is not None and (held.position, held.last, held.last_paid) == (91, last[sid], 1_909)


def test_a_torn_record_is_skipped_and_a_full_log_folds(tmp_path: Path) -> None:
    store = VendorStore(tmp_path / "vendor.sqlite3")
    store._log.slots = 4  # fold after four tokens
    sid = os.urandom(16)
    store.open_session(_session(sid))
    tokens = {position: os.urandom(32) for position in range(98, 88, -1)}
    for position, token in tokens.items():
        assert store.record_token(sid, position, token, 1_000)
    # Ten tokens through a four-slot log: folded at 95 and at 91; slots now hold 90, 89 (new), 92, 91 (stale).
    log_path = tmp_path / "vendor.sqlite3.tokens"
    torn = bytearray(log_path.read_bytes())
    torn[2 * 64 + 20] ^= 0xFF  # a stale record whose CRC no longer holds: skipped
    log_path.write_bytes(bytes(torn))
    held = VendorStore(tmp_path / "vendor.sqlite3").session(sid)
    assert held is not None and (held.position, held.last) == (89, tokens[89])


def test_a_torn_newest_record_falls_back_to_the_one_before(tmp_path: Path) -> None:
    """A crash in the middle of writing a token: its receipt never left, the one before stands."""
    store = VendorStore(tmp_path / "vendor.sqlite3")
    sid = os.urandom(16)
    store.open_session(_session(sid))
    before, newest = os.urandom(32), os.urandom(32)
    assert store.record_token(sid, 97, before, 1_001) and store.record_token(sid, 96, newest, 1_002)
    log_path = tmp_path / "vendor.sqlite3.tokens"
    torn = bytearray(log_path.read_bytes())
    torn[1 * 64 + 20] ^= 0xFF
    log_path.write_bytes(bytes(torn))
    held = VendorStore(tmp_path / "vendor.sqlite3").session(sid)
    assert held is not None and (held.position, held.last) == (97, before)
