"""Operating a bank: accounts, deposits, vendor enrolment and revocation, balances and the audit."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from m2mpay.protocol import cose
from m2mpay.protocol.certificates import issue_certificate
from m2mpay.broker.pki import is_bank_login
from m2mpay.protocol.messages import CertificateBody, is_name

from ..files import write_private
from .audit import AuditReport, audit
from .keys import BankKeys
from .revocation import revoke
from .store import Store
from .tx import Tx

__all__ = ["AuditReport", "audit", "balance", "deposit", "enroll_vendor", "open_account", "revoke_vendor"]


def _private_hex(key: Ed25519PrivateKey) -> str:
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption()).hex()


def _write_private_json(path: Path, content: dict[str, Any]) -> None:
    # A new 0600 file renamed over ``path``: an existing file's mode never carries a key.
    write_private(path, json.dumps(content, indent=2) + "\n")


def _check_name(name: str) -> None:
    if not is_name(name):
        raise ValueError(f"name {name!r}: must be 1 to 32 characters of a-z, 0-9, '-', '_' and '.'")


def _check_device_name(name: str) -> None:
    """A device's name is its broker login: never one of the bank workers' (``bank``, ``bank-<n>``),
    whose certificates read every request."""
    _check_name(name)
    if is_bank_login(name):
        raise ValueError(f"name {name!r}: reserved for the bank's own broker logins (bank, bank-<n>)")


def open_account(keys: BankKeys, store: Store, name: str, out: Path, now: int) -> None:
    """Open a user account and write its credentials (account, key, bank, CA fingerprint)."""
    _check_device_name(name)
    key = Ed25519PrivateKey.generate()

    def create(tx: Tx) -> None:
        _name_free(tx, name)
        tx.create_account(name, "user", cose.public_key_bytes(key.public_key()), now)

    store.run_sync(create)
    _write_private_json(out, {"account": name, "key": _private_hex(key), "bank": keys.bank,
                              "ca_fingerprint": keys.fingerprint})


def _name_free(tx: Tx, name: str) -> None:
    """Refuse a name some account or vendor already has.

    Users and vendors share one name space: a signer's answers come back on
    ``m2mpay/{bank}/resp/{name}`` and are remembered under ``(name, req_id)``, so a user named like
    a vendor could read that vendor's answers (whose session ids open its CoAP sessions).
    """
    if tx.name_taken(name):
        raise ValueError(f"the name {name!r} is taken by an account or a vendor")


def deposit(store: Store, name: str, amount: int, now: int) -> int:
    """Pay ``amount`` minor units into an account from outside; returns the new balance."""
    if amount <= 0:
        raise ValueError("a deposit must be positive")

    def pay_in(tx: Tx) -> int:
        account = tx.account(name, lock=True)
        if account is None or account.kind != "user":
            # Only user accounts keep a running balance; vendors are paid by settlements only
            raise KeyError(name)
        tx.transfer("world", name, amount, "deposit", None, now, running=(name,))
        return account.balance + amount

    return store.run_sync(pay_in)


def enroll_vendor(keys: BankKeys, store: Store, name: str, category: str, out: Path, now: int,
                  valid_days: float = 365, *, ca_key: Ed25519PrivateKey | None = None) -> None:
    """Certify a vendor: an account to credit, a key, and a CA-signed certificate, written to ``out``.

    Signs with ``ca_key``, or reads the CA's private key from the data directory for this one
    signature.
    """
    _check_device_name(name)
    _check_name(category)
    ca_key = ca_key or keys.load_ca_key()  # before anything is written: without it nothing happens
    key = Ed25519PrivateKey.generate()
    public = cose.public_key_bytes(key.public_key())
    account = f"v-{name}"[:32]
    body = CertificateBody(bank=keys.bank, vendor=name, account=account, name=name, category=category,
                           key=public, nbf=now - 60, exp=now + int(valid_days * 86400))
    cert = issue_certificate(body, ca_key)

    def enroll(tx: Tx) -> None:
        _name_free(tx, name)
        _name_free(tx, account)
        tx.create_account(account, "vendor", public, now)
        tx.add_vendor(name, account, category, public, cert)

    store.run_sync(enroll)
    _write_private_json(out, {"vendor": name, "account": account, "key": _private_hex(key), "cert": cert.hex(),
                              "bank": keys.bank, "ca_fingerprint": keys.fingerprint})


def revoke_vendor(store: Store, name: str, now: int) -> bool:
    """Revoke a vendor: from now on the bank refuses its blocks and settlements, and the running
    bank lists it in its keys announcement within one sweep interval, so wallets refuse to pay it. ``False`` if
    it was revoked already; ``KeyError`` for an unknown vendor."""
    return store.run_sync(lambda tx: revoke(tx, name, now))


def balance(store: Store, name: str) -> int:
    """An account's balance (a vendor may be named by its vendor id)."""
    def read(tx: Tx) -> int:
        for candidate in (name, f"v-{name}"[:32]):
            account = tx.account(candidate)
            if account is not None:
                return account.balance if account.kind == "user" else tx.journal_balance(candidate)
        raise KeyError(name)

    return store.run_sync(read)
