"""An m2mpay world in one process: the bank's own request pipeline, vendors and wallets.

``LocalBank`` is the bank agent minus MQTT and disk: the pipeline of
:mod:`m2mpay.agents.bank.pipeline` (the very code the bank runs) driven synchronously on the
bank's store over SQLite in memory. Time is a number passed in.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from m2mpay.agents.bank.audit import audit
from m2mpay.agents.bank.keys import BankKeys
from m2mpay.agents.bank.ledger import Atomic, drive_sync
from m2mpay.agents.bank.operations import sweep
from m2mpay.agents.bank.pipeline import Pipeline
from m2mpay.agents.bank.store import Store
from m2mpay.agents.bank.rows import Entry
from m2mpay.agents.bank.tx import Tx
from m2mpay.protocol import blindrsa, cose, envelope
from m2mpay.protocol.certificates import (
    ca_fingerprint,
    issue_certificate,
    issue_delegation,
    sign_announcement,
    verify_announcement,
)
from m2mpay.protocol.messages import (
    CertificateBody,
    KeyDelegation,
    KeysAnnouncement,
    KeysetInfo,
    Message,
    keyset_id,
)
from m2mpay.protocol.rules import bank as rules
from m2mpay.protocol.rules.keyring import Keyring
from m2mpay.protocol.rules.requests import BlockWindow

NOW = 1_800_000_000
BANK = "bank-a"


def det_rng(seed: int) -> Callable[[int], bytes]:
    """A deterministic RNG callable for reproducible tests."""
    r = random.Random(seed)
    return r.randbytes


@dataclass
class Keyset:
    info: KeysetInfo
    signer: blindrsa.BlindSigner
    public: blindrsa.PublicKey


def make_keyset(private: rsa.RSAPrivateKey, value: int, n: int, *, withdraw_until: int = NOW + 86400 * 30,
                spend_until: int = NOW + 86400 * 60) -> Keyset:
    public = blindrsa.PublicKey.from_cryptography(private.public_key())
    der = public.to_der()
    info = KeysetInfo(id=keyset_id(value, n, "EUR", withdraw_until, spend_until, der), value=value, n=n,
                      currency="EUR", withdraw_until=withdraw_until, spend_until=spend_until, public_key=der)
    return Keyset(info=info, signer=blindrsa.BlindSigner.from_private_key(private), public=public)


@dataclass
class Vendor:
    name: str
    account: str
    key: Ed25519PrivateKey
    cert: bytes

    @property
    def cert_hash(self) -> bytes:
        return hashlib.sha256(self.cert).digest()

    def sign(self, message: Message, op: str) -> bytes:
        return envelope.sign_request(message, self.key, self.name, BANK, op)


class _Balances:
    """``bank.balances[name]``: a user's running balance, anyone else's journal balance."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def __getitem__(self, name: str) -> int:
        def read(tx: Tx) -> int:
            account = tx.account(name)
            if account is None:
                raise KeyError(name)
            return account.balance if account.kind == "user" else tx.journal_balance(name)

        return self._store.run_sync(read)


class _Coins:
    """``bank.coins[tip]``: the bank's record of a coin (set one to play a corrupted database)."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def get(self, tip: bytes) -> rules.CoinRecord | None:
        return self._store.run_sync(lambda tx: tx.coin(tip, lock=False))

    def __getitem__(self, tip: bytes) -> rules.CoinRecord:
        record = self.get(tip)
        if record is None:
            raise KeyError(tip.hex())
        return record

    def __contains__(self, tip: object) -> bool:
        return isinstance(tip, bytes) and self.get(tip) is not None

    def __setitem__(self, tip: bytes, record: rules.CoinRecord) -> None:
        self._store.run_sync(lambda tx: tx.put_coin(record, new=tx.coin(tip) is None))


@dataclass
class LocalBank:
    """The bank's pipeline on SQLite in memory, with the keys a test makes up."""

    keysets: dict[str, Keyset]
    ca: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)
    online: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)  # signs the announcement
    answer_key: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)
    sealing: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate)
    window: BlockWindow = field(default_factory=BlockWindow)
    store: Store = field(init=False)
    pipeline: Pipeline = field(init=False)

    def __post_init__(self) -> None:
        self.store = Store(":memory:")

        def keysets(tx: Tx) -> None:
            for ks in self.keysets.values():
                tx.add_keyset(ks.info)

        self.store.run_sync(keysets)
        delegation = KeyDelegation(bank=BANK, key=cose.public_key_bytes(self.online.public_key()),
                                   purpose="announce", nbf=NOW - 3600, exp=NOW + 365 * 86400)
        keys = BankKeys(bank=BANK, data_dir=Path(), ca_public=self.ca.public_key(), announce_key=self.online,
                        delegation=delegation, answer_key=self.answer_key, sealing_key=self.sealing,
                        signers={k: ks.signer for k, ks in self.keysets.items()}, announcement=self.announcement(),
                        keyring=self.keyring())
        self.pipeline = Pipeline(keys, self.window)

    def announcement(self) -> bytes:
        delegation = issue_delegation(KeyDelegation(
            bank=BANK, key=cose.public_key_bytes(self.online.public_key()), purpose="announce", nbf=NOW - 3600,
            exp=NOW + 365 * 86400), self.ca)
        ann = KeysAnnouncement(
            bank=BANK, issued=NOW, ca_key=cose.public_key_bytes(self.ca.public_key()), delegation=delegation,
            answer_key=cose.public_key_bytes(self.answer_key.public_key()),
            sealing_key=self.sealing.public_key().public_bytes_raw(),
            keysets=tuple(k.info for k in self.keysets.values()), revoked=())
        return sign_announcement(ann, self.online)

    @property
    def fingerprint(self) -> str:
        return ca_fingerprint(cose.public_key_bytes(self.ca.public_key()))

    def keyring(self) -> Keyring:
        return Keyring.from_announcement(verify_announcement(self.announcement(), self.fingerprint, NOW))

    def open_account(self, name: str, balance: int) -> Ed25519PrivateKey:
        key = Ed25519PrivateKey.generate()

        def create(tx: Tx) -> None:
            tx.create_account(name, "user", cose.public_key_bytes(key.public_key()), NOW)
            tx.transfer("world", name, balance, "deposit", None, NOW, running=(name,))

        self.store.run_sync(create)
        return key

    def enroll(self, name: str, category: str, *, nbf: int = NOW - 10, exp: int = NOW + 86400) -> Vendor:
        key = Ed25519PrivateKey.generate()
        public = cose.public_key_bytes(key.public_key())
        body = CertificateBody(bank=BANK, vendor=name, account=f"acct-{name}", name=name.title(),
                               category=category, key=public, nbf=nbf, exp=exp)
        cert = issue_certificate(body, self.ca)

        def create(tx: Tx) -> None:
            tx.create_account(body.account, "vendor", public, NOW)
            tx.add_vendor(name, body.account, category, public, cert)

        self.store.run_sync(create)
        return Vendor(name=name, account=body.account, key=key, cert=cert)

    # --- the request path: the bank's own ----------------------------------------------------
    def _run(self, step: Atomic[Any]) -> Any:
        return self.store.run_sync(step.fn)

    def handle(self, op: str, data: bytes, now: int = NOW) -> bytes:
        """Answer one signed request, as bytes signed by the bank; never raises for bad input."""
        return drive_sync(self.pipeline.handle(op, data, now), self._run).answer

    def sweep(self, now: int) -> None:
        """The periodic lapse sweep."""
        drive_sync(sweep(now), self._run)

    # --- the books -------------------------------------------------------------------------
    @property
    def balances(self) -> _Balances:
        return _Balances(self.store)

    @property
    def coins(self) -> _Coins:
        return _Coins(self.store)

    @property
    def credits(self) -> list[Entry]:
        """The journal's credits to vendors."""
        return [e for e in self.store.run_sync(lambda tx: tx.journal()) if e.kind.startswith("credit:")]

    @property
    def withdrawn(self) -> int:
        """The value of every withdrawal."""
        return sum(i.value for i in self.store.run_sync(lambda tx: tx.issuance()))

    def close(self) -> None:
        """Drop the database."""
        self.store.close()

    def audit(self) -> None:
        """The bank's own audit: money conserved, no coin over-credited, every chain sound."""
        report = audit(self.store)
        assert report.ok, report.problems
