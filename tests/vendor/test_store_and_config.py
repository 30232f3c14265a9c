"""The vendor's configuration and durable store, across a simulated restart."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agents.vendor.config import ConfigError, VendorConfig
from agents.vendor.store import OutboxEntry, StoredSession, VendorStore


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
    store.enqueue(entry, 1_020)
    store.close()  # the process dies here, before the bank answered

    again = VendorStore(tmp_path / "vendor.sqlite3")
    held = again.session(sid)
    assert held is not None and (held.position, held.last, held.paid) == (95, token, 5)
    assert again.pending() == [entry]
    again.answered(entry.req_id, b"answer")
    again.set_state(sid, "closed", credited=5)
    assert again.pending() == [] and again.sessions("open") == []
    assert again.sessions("closed")[0].credited == 5
