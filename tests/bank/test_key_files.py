"""The bank's keyset key files are checked against the keysets they belong to when it loads them."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from m2mpay.agents.bank.keys import init_bank, load_bank


def test_a_key_file_of_another_keyset_stops_the_bank(tmp_path: Path) -> None:
    now = int(time.time())
    init_bank(tmp_path / "bank", "bank-k", None, now, keysets=((100, 100), (64, 64)))
    keys, store = load_bank(tmp_path / "bank", now)
    store.close()
    first, second = sorted(keys.signers)
    files = tmp_path / "bank" / "keys"
    a, b = (files / f"{first}.pem").read_bytes(), (files / f"{second}.pem").read_bytes()
    (files / f"{first}.pem").write_bytes(b)  # swapped: each file holds the other keyset's key
    (files / f"{second}.pem").write_bytes(a)
    with pytest.raises(ValueError, match=f"keyset {first}: its key file holds another keyset's key"):
        load_bank(tmp_path / "bank", now)
