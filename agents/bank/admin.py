"""Operating a bank: accounts, deposits, vendor enrolment, balances and the audit."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocol import cose, hashchain
from protocol.certificates import issue_certificate
from protocol.messages import CertificateBody
from protocol.messages._fields import IDENT

from .keys import BankKeys
from .store import Store, Tx

__all__ = ["AuditReport", "audit", "balance", "deposit", "enroll_vendor", "open_account"]


def _private_hex(key: Ed25519PrivateKey) -> str:
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption()).hex()


def _write_private_json(path: Path, content: dict[str, Any]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(content, handle, indent=2)
        handle.write("\n")


def _check_name(name: str) -> None:
    try:
        IDENT.check(name)
    except ValueError as exc:
        raise ValueError(f"name {name!r}: {exc}") from None


def open_account(keys: BankKeys, store: Store, name: str, out: Path, now: int) -> None:
    """Open a user account and write its credentials (account, key, bank, CA fingerprint)."""
    _check_name(name)
    key = Ed25519PrivateKey.generate()
    store.run_sync(lambda tx: tx.create_account(name, "user", cose.public_key_bytes(key.public_key()), now))
    _write_private_json(out, {"account": name, "key": _private_hex(key), "bank": keys.bank,
                              "ca_fingerprint": keys.fingerprint})


def deposit(store: Store, name: str, amount: int, now: int) -> int:
    """Pay ``amount`` minor units into an account from outside; returns the new balance."""
    if amount <= 0:
        raise ValueError("a deposit must be positive")

    def pay_in(tx: Tx) -> int:
        account = tx.account(name, lock=True)
        if account is None or account[0] == "system":
            raise KeyError(name)
        tx.transfer("world", name, amount, "deposit", None, now, running=(name,))
        return account[2] + amount

    return store.run_sync(pay_in)


def enroll_vendor(keys: BankKeys, store: Store, name: str, category: str, out: Path, now: int,
                  valid_days: float = 365) -> None:
    """Certify a vendor: an account to credit, a key, and a CA-signed certificate, written to ``out``."""
    _check_name(name)
    _check_name(category)
    key = Ed25519PrivateKey.generate()
    public = cose.public_key_bytes(key.public_key())
    account = f"v-{name}"[:32]
    body = CertificateBody(bank=keys.bank, vendor=name, account=account, name=name, category=category,
                           key=public, nbf=now - 60, exp=now + int(valid_days * 86400))
    cert = issue_certificate(body, keys.ca_key)

    def enroll(tx: Tx) -> None:
        tx.create_account(account, "vendor", public, now)
        tx.execute("INSERT INTO vendors (vendor, account, category, public_key, cert) VALUES (?, ?, ?, ?, ?)",
                   (name, account, category, public, cert))

    store.run_sync(enroll)
    _write_private_json(out, {"vendor": name, "account": account, "key": _private_hex(key), "cert": cert.hex(),
                              "bank": keys.bank, "ca_fingerprint": keys.fingerprint})


def balance(store: Store, name: str) -> int:
    """An account's balance (a vendor may be named by its vendor id)."""
    def read(tx: Tx) -> int:
        for candidate in (name, f"v-{name}"[:32]):
            account = tx.account(candidate)
            if account is not None:
                return account[2] if account[0] == "user" else tx.journal_balance(candidate)
        raise KeyError(name)

    return store.run_sync(read)


@dataclass
class AuditReport:
    """What the audit found; ``ok`` only when there are no problems."""

    problems: list[str]
    withdrawn: int = 0
    credited: int = 0
    outstanding: int = 0
    coins: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def audit(store: Store) -> AuditReport:
    """Money conserved, no coin credited beyond M, every stored last token hashes up to its tip."""
    def check(tx: Tx) -> AuditReport:
        report = AuditReport(problems=[])
        derived: dict[str, int] = {}
        for debit, credit, amount, kind, ref in tx.all("SELECT debit, credit, amount, kind, ref FROM journal"):
            derived[debit] = derived.get(debit, 0) - int(amount)
            derived[credit] = derived.get(credit, 0) + int(amount)
            if kind == "withdraw":
                report.withdrawn += int(amount)
            elif str(kind).startswith("credit:"):
                report.credited += int(amount)
        for name, kind, stored in tx.all("SELECT name, kind, balance FROM accounts"):
            balance = derived.get(name, 0)
            if kind == "user" and int(stored) != balance:
                report.problems.append(f"account {name}: balance {stored} but journal says {balance}")
            if kind != "user" and int(stored) != 0:
                report.problems.append(f"account {name}: a running balance where the journal is the truth")
            if name != "world" and balance < 0:
                report.problems.append(f"account {name}: negative balance {balance}")
        unknown = set(derived) - {r[0] for r in tx.all("SELECT name FROM accounts")}
        if unknown:
            report.problems.append(f"journal names unknown accounts: {sorted(unknown)[:3]}")
        if sum(derived.values()) != 0:
            report.problems.append("journal does not balance: money created or destroyed")
        report.outstanding = derived.get("outstanding", 0)
        if report.outstanding != report.withdrawn - report.credited:
            report.problems.append("outstanding coins do not equal withdrawn minus credited")
        per_coin: dict[bytes, int] = {}
        for ref, amount in tx.all("SELECT ref, amount FROM journal WHERE kind LIKE ?", ("credit:%",)):
            per_coin[bytes(ref)] = per_coin.get(bytes(ref), 0) + int(amount)
        for record in tx.coins():
            report.coins += 1
            label = record.tip.hex()[:16]
            if not 0 <= record.credited <= record.n:
                report.problems.append(f"coin {label}: credited {record.credited} of {record.n} tokens")
            if per_coin.get(record.tip, 0) != record.credited * record.token_value:
                report.problems.append(f"coin {label}: journal credits differ from the coin's record")
            if hashchain.iterate(record.last, record.n - record.position) != record.tip:
                report.problems.append(f"coin {label}: last token does not hash up to the tip")
        return report

    return store.run_sync(check)
