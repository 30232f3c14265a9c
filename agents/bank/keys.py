"""The bank's keys and configuration in its data directory.

Layout: ``bank.json`` (bank id and database URL) and ``keys/`` with the Ed25519 CA key, the
Ed25519 answer-signing key, the X25519 sealing key (raw 32 bytes each) and one RSA key per
keyset (PKCS#8 PEM). Every private key file is created with mode 0600. Keyset descriptions live
in the database; a keyset's RSA key signs coins of that keyset and nothing else.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from protocol import blindrsa, cose
from protocol.certificates import ca_fingerprint, sign_announcement
from protocol.messages import KeysAnnouncement, KeysetInfo, keyset_id
from protocol.rules.keyring import Keyring

from .store import Store, Tx

__all__ = ["BankKeys", "add_keyset", "init_bank", "load_bank", "retire_keyset"]

DAY = 86400
_RAW = serialization.Encoding.Raw
_RAW_PRIV = serialization.PrivateFormat.Raw
_NONE = serialization.NoEncryption()


def _write_secret(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


@dataclass(frozen=True)
class BankKeys:
    """Everything secret and public a bank process needs."""

    bank: str
    ca_key: Ed25519PrivateKey
    answer_key: Ed25519PrivateKey
    sealing_key: X25519PrivateKey
    signers: dict[str, blindrsa.BlindSigner]
    announcement: bytes
    keyring: Keyring

    @property
    def fingerprint(self) -> str:
        """The CA fingerprint devices are provisioned with."""
        return ca_fingerprint(cose.public_key_bytes(self.ca_key.public_key()))


def add_keyset(data_dir: Path, store: Store, *, value: int, tokens: int, withdraw_days: float,
               spend_days: float, now: int, currency: str = "EUR", bits: int = 2048) -> KeysetInfo:
    """Create a keyset with its own RSA key and record it."""
    private = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    der = blindrsa.PublicKey.from_cryptography(private.public_key()).to_der()
    withdraw_until, spend_until = now + int(withdraw_days * DAY), now + int(spend_days * DAY)
    info = KeysetInfo(id=keyset_id(value, tokens, currency, withdraw_until, spend_until, der), value=value,
                      n=tokens, currency=currency, withdraw_until=withdraw_until, spend_until=spend_until,
                      public_key=der)
    _write_secret(data_dir / "keys" / f"{info.id}.pem",
                  private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, _NONE))
    store.run_sync(lambda tx: tx.execute("INSERT INTO keysets (id, info) VALUES (?, ?)", (info.id, info.encode())))
    return info


def retire_keyset(store: Store, keyset: str) -> None:
    """Take a keyset out of the keys announcement (from the next ``bank serve`` on): wallets can no
    longer withdraw from it and vendors no longer accept it. Coins already registered keep their
    records, so their sessions can still settle."""
    def retire(tx: Tx) -> None:
        if tx.execute("UPDATE keysets SET retired = 1 WHERE id = ? AND retired = 0", (keyset,)).rowcount != 1:
            raise KeyError(keyset)

    store.run_sync(retire)


def init_bank(data_dir: Path, bank: str, db_url: str | None, now: int,
              keysets: tuple[tuple[int, int], ...] = ((100, 100), (1000, 1000))) -> None:
    """Create a bank: configuration, CA, answer and sealing keys, and the first keysets."""
    if (data_dir / "bank.json").exists():
        raise FileExistsError(f"{data_dir} already holds a bank")
    data_dir.mkdir(parents=True, exist_ok=True)
    url = db_url or str(data_dir / "bank.sqlite3")
    for name, key in (("ca.key", Ed25519PrivateKey.generate()), ("answer.key", Ed25519PrivateKey.generate()),
                      ("sealing.key", X25519PrivateKey.generate())):
        _write_secret(data_dir / "keys" / name, key.private_bytes(_RAW, _RAW_PRIV, _NONE))
    store = Store(url)
    try:
        for value, tokens in keysets:
            add_keyset(data_dir, store, value=value, tokens=tokens, withdraw_days=365, spend_days=730, now=now)
    finally:
        store.close()
    (data_dir / "bank.json").write_text(json.dumps({"bank": bank, "db": url}, indent=2) + "\n")


def _active_keysets(tx: Tx) -> list[KeysetInfo]:
    return [KeysetInfo.decode(bytes(r[0])) for r in tx.all("SELECT info FROM keysets WHERE retired = 0 ORDER BY id")]


def load_bank(data_dir: Path, now: int, *, connections: int = 1) -> tuple[BankKeys, Store]:
    """Open a bank's keys and database; the keys announcement is signed afresh."""
    config = json.loads((data_dir / "bank.json").read_text())
    keys_dir = data_dir / "keys"
    ca = Ed25519PrivateKey.from_private_bytes((keys_dir / "ca.key").read_bytes())
    answer = Ed25519PrivateKey.from_private_bytes((keys_dir / "answer.key").read_bytes())
    sealing = X25519PrivateKey.from_private_bytes((keys_dir / "sealing.key").read_bytes())
    store = Store(config["db"], connections=connections)
    infos = store.run_sync(_active_keysets)
    signers = {}
    for info in infos:
        private = serialization.load_pem_private_key((keys_dir / f"{info.id}.pem").read_bytes(), None)
        if not isinstance(private, rsa.RSAPrivateKey):
            raise ValueError(f"keyset {info.id}: not an RSA key")
        signers[info.id] = blindrsa.BlindSigner.from_private_key(private)
    announcement = KeysAnnouncement(
        bank=config["bank"], issued=now, ca_key=cose.public_key_bytes(ca.public_key()),
        answer_key=cose.public_key_bytes(answer.public_key()),
        sealing_key=sealing.public_key().public_bytes_raw(), keysets=tuple(infos))
    keys = BankKeys(bank=config["bank"], ca_key=ca, answer_key=answer, sealing_key=sealing, signers=signers,
                    announcement=sign_announcement(announcement, ca),
                    keyring=Keyring.from_announcement(announcement))
    return keys, store
