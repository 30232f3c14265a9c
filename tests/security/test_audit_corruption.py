"""The audit catches books corrupted directly in the database (SQLite and PostgreSQL).

Each test builds real books through the bank's service — a deposit, a withdrawal of two coins,
one of them paid with and settled — then changes rows with plain SQL the way someone with write
access to the database could, and expects ``bank audit`` to fail with a message naming what was
done. Most of these corruptions keep every identity the journal alone can check (it still
balances, outstanding still equals withdrawn minus credited): only rows kept independently of the
journal (issuance records, coin records, running user balances) show them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from m2mpay.agents.bank import admin, store as store_module
from m2mpay.agents.bank.keys import init_bank, load_bank
from m2mpay.agents.bank.schema import MIGRATIONS
from m2mpay.agents.bank.service import BankService
from m2mpay.agents.bank.store import Store, Tx
from m2mpay.protocol import hashchain
from m2mpay.protocol.rules import wallet

from tests.bank_world import BankWorld, Clock

pytestmark = pytest.mark.asyncio


@dataclass
class Books:
    """A bank with a little history, and the keyset that never issued a coin."""

    world: BankWorld
    unissued: str

    def sql(self, statement: str, params: tuple[Any, ...] = ()) -> None:
        """Change the database behind the bank's back."""
        _sql(self.world.store, statement, params)

    def forge_coin(self, keyset: str, n: int, position: int) -> bytes:
        """Register and credit a coin nobody withdrew (see :func:`_forged_coin`)."""
        return _forged_coin(self.world.store, self.world.clock.now, keyset, n, position)

    def problems(self) -> list[str]:
        report = admin.audit(self.world.store)
        assert report.ok is False
        return report.problems


@pytest_asyncio.fixture
async def books(tmp_path: Path, db_url: str, bank_id: str) -> AsyncIterator[Books]:
    clock = Clock(int(time.time()))  # the real time: the bank's command-line tools check their keys against it
    init_bank(tmp_path / "bank", bank_id, db_url, clock.now, keysets=((100, 100), (1000, 1000)))
    keys, store = load_bank(tmp_path / "bank", clock.now, connections=2)
    world = BankWorld(keys=keys, store=store, service=BankService(keys, store, clock=clock), clock=clock,
                      directory=tmp_path)
    try:
        user, vendor = world.user("alice"), world.vendor("meter")
        wc, _ = await world.withdraw(user, 2)  # 2 coins of 100 tokens worth 1 each: 200
        wc, session = await world.block(vendor, wc)
        for _ in range(10):
            wc, pay = wallet.reveal(wc, 1)
            session.pay(pay, clock.now)
        assert (await world.settle(vendor, session)).credited == 11
        assert world.audit().ok, world.audit().problems
        (unissued,) = set(keys.keyring.keysets) - {world.keyset}
        yield Books(world=world, unissued=unissued)
    finally:
        store.close()


def naming(problems: list[str], *words: str) -> list[str]:
    """The problems that mention every one of ``words``."""
    return [p for p in problems if all(w in p for w in words)]


async def test_credit_without_a_withdrawal(books: Books) -> None:
    books.sql("INSERT INTO journal (ts, debit, credit, amount, kind, ref) VALUES (?, ?, ?, ?, ?, ?)",
              (books.world.clock.now, "outstanding", "v-meter", 30, "credit:settle", os.urandom(32)))
    assert naming(books.problems(), "credit without a withdrawal", "v-meter")


def _sql(store: Store, statement: str, params: tuple[Any, ...] = ()) -> None:
    store.run_sync(lambda tx: tx.execute(statement, params))


def _forged_coin(store: Store, now: int, keyset: str, n: int, position: int) -> bytes:
    """A coin nobody withdrew, registered and credited down to ``position``, journal to match."""
    seed = os.urandom(32)
    tip, last = hashchain.iterate(seed, n), hashchain.iterate(seed, position)
    _sql(store, "INSERT INTO coins (tip, keyset, n, token_value, position, last, status, session, vendor, account, "
         "start, deadline, credited) VALUES (?, ?, ?, ?, ?, ?, ?, NULL, NULL, NULL, ?, 0, ?)",
         (tip, keyset, n, 1, position, last, "none", position, n - position))
    _sql(store, "INSERT INTO journal (ts, debit, credit, amount, kind, ref) VALUES (?, ?, ?, ?, ?, ?)",
         (now, "outstanding", "v-meter", n - position, "credit:settle", tip))
    return tip


async def test_coins_of_an_unissued_keyset(books: Books) -> None:
    books.forge_coin(books.unissued, 1000, 970)  # 30 credited: less than the 189 still outstanding
    assert naming(books.problems(), f"keyset {books.unissued}", "never issued")


@pytest.mark.parametrize("cover", ["alone", "journal edited to match"])
async def test_edited_balance(books: Books, cover: str) -> None:
    books.sql("UPDATE accounts SET balance = balance + 60 WHERE name = ?", ("alice",))
    if cover == "alone":
        assert naming(books.problems(), "account alice: balance 9860 but journal says 9800")
        return
    books.sql("UPDATE journal SET amount = amount - 60 WHERE kind = ? AND debit = ?", ("withdraw", "alice"))
    assert naming(books.problems(), "account alice", "journalled 140 but issued 200")


@pytest.mark.parametrize("cover", ["journal row copied", "coin record edited to match"])
async def test_duplicated_settlement(books: Books, cover: str) -> None:
    books.sql("INSERT INTO journal (ts, debit, credit, amount, kind, ref) SELECT ts, debit, credit, amount, kind, ref "
              "FROM journal WHERE kind = ?", ("credit:settle",))
    if cover != "journal row copied":
        books.sql("UPDATE coins SET credited = 2 * credited WHERE credited > 0")
    assert naming(books.problems(), "duplicated settlement")


@pytest.mark.parametrize("kind", ["withdraw", "credit:settle", "deposit"])
async def test_deleted_journal_row(books: Books, kind: str) -> None:
    books.sql("DELETE FROM journal WHERE kind = ?", (kind,))
    assert naming(books.problems(), "journal row missing")


async def test_bank_audit_command_fails_naming_the_corruption(books: Books) -> None:
    books.forge_coin(books.unissued, 1000, 970)
    result = subprocess.run([sys.executable, "-m", "m2mpay.agents.cli", "bank", "audit", "--data",
                             str(books.world.directory / "bank")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"keyset {books.unissued}" in result.stderr and "never issued" in result.stderr
    assert "audit FAILED" in result.stdout


async def test_database_upgraded_from_before_issuance_records_audits_clean(
        tmp_path: Path, db_url: str, bank_id: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Withdrawals journalled before migration 2 carry no keyset: they form one pool that may
    back coins of any keyset, and the audit of an upgraded database passes."""
    now = int(time.time())
    with monkeypatch.context() as old:
        old.setattr(store_module, "MIGRATIONS", MIGRATIONS[:1])  # the bank as it was
        init_bank(tmp_path / "bank", bank_id, db_url, now, keysets=((100, 100),))
        store = Store(db_url)
        try:
            (keyset,) = [row[0] for row in store.run_sync(lambda tx: tx.all("SELECT id FROM keysets"))]

            def history(tx: Tx) -> None:  # what the bank wrote then: a deposit and a withdrawal
                tx.create_account("alice", "user", None, now)
                tx.create_account("v-meter", "vendor", None, now)
                tx.transfer("world", "alice", 1_000, "deposit", None, now, running=("alice",))
                tx.transfer("alice", "outstanding", 300, "withdraw", os.urandom(16), now, running=("alice",))

            store.run_sync(history)
            _forged_coin(store, now, keyset, 100, 60)  # a coin of that withdrawal, 40 tokens settled
        finally:
            store.close()
    store = Store(db_url)
    try:
        report = admin.audit(store)
        assert report.ok, report.problems
        assert (report.withdrawn, report.credited, report.outstanding) == (300, 40, 260)
        for _ in range(3):  # four coins of 100: beyond what the old withdrawal of 300 can back
            _forged_coin(store, now, keyset, 100, 60)
        assert naming(admin.audit(store).problems, f"keyset {keyset}", "beyond the 300 withdrawn before")
    finally:
        store.close()
