"""The bank's keys and configuration in its data directory.

Layout: ``bank.json`` (bank id and database URL; a SQLite path in it is relative to the data
directory, so the directory can be moved and commands run from anywhere) and ``keys/``:

- ``ca.key``: the Ed25519 CA key. It certifies vendors and the online announcement key, and
  nothing else reads it: only ``bank init``, ``bank vendor enroll`` and ``bank delegate`` need it,
  so it can be kept offline. ``ca.pub`` is its public half, which everything else uses.
- ``announce.key`` and ``delegation.cose``: the online Ed25519 key that signs the keys
  announcement, and the CA's :class:`~m2mpay.protocol.messages.KeyDelegation` certifying it for a year.
- ``answer.key`` (Ed25519, signs answers), ``sealing.key`` (X25519, opens sealed authorizations),
  and one RSA key per keyset (PKCS#8 PEM), which signs coins of that keyset and nothing else.

Every file is written whole with mode 0600 and every directory is 0700 (:mod:`m2mpay.agents.files`).
Keyset descriptions and phases, accounts and vendors live in the database; retiring a keyset is
:func:`~m2mpay.agents.bank.phases.retire_keyset` (re-exported here).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from m2mpay.protocol import blindrsa, cose
from m2mpay.protocol.certificates import ca_fingerprint, issue_delegation, sign_announcement, verify_delegation
from m2mpay.protocol.errors import RemoteProtocolError
from m2mpay.protocol.messages import PURPOSE_ANNOUNCE, KeyDelegation, KeysAnnouncement, KeysetInfo, keyset_id
from m2mpay.protocol.rules.keyring import Keyring

from ..files import create_private, private_dir, write_private
from .phases import Announced, backfill_phases, listed_keysets
from .phases import retire_keyset as retire_keyset
from .revocation import revoked_vendors
from .store import Store
from .tx import Tx

__all__ = ["CHANGE_KEYSETS", "DEFAULT_KEYSETS", "DELEGATION_DAYS", "WITHDRAWAL_KEYSETS", "BankKeys", "add_keyset",
           "delegate", "init_bank", "load_bank", "load_ca_key", "reannounce", "retire_keyset"]

log = logging.getLogger(__name__)

DAY = 86400
DELEGATION_DAYS = 365
"""How long a delegation of the announcement key lasts; ``bank delegate`` renews it."""
_EARLY = 3600  # a delegation is valid from an hour back: devices whose clock lags still accept it
_RAW = serialization.Encoding.Raw
_RAW_PRIV = serialization.PrivateFormat.Raw
_NONE = serialization.NoEncryption()


def _raw(key: Ed25519PrivateKey | X25519PrivateKey) -> bytes:
    return key.private_bytes(_RAW, _RAW_PRIV, _NONE)


@dataclass(frozen=True)
class BankKeys:
    """What a bank process needs: never the CA's private key (see :func:`load_ca_key`)."""

    bank: str
    data_dir: Path
    ca_public: Ed25519PublicKey
    announce_key: Ed25519PrivateKey
    delegation: KeyDelegation
    answer_key: Ed25519PrivateKey
    sealing_key: X25519PrivateKey
    signers: dict[str, blindrsa.BlindSigner]
    announcement: bytes
    keyring: Keyring

    @property
    def fingerprint(self) -> str:
        """The CA fingerprint devices are provisioned with."""
        return ca_fingerprint(cose.public_key_bytes(self.ca_public))

    def load_ca_key(self) -> Ed25519PrivateKey:
        """The CA's private key, read from disk for one certifying command."""
        return load_ca_key(self.data_dir)


def load_ca_key(data_dir: Path, path: Path | None = None) -> Ed25519PrivateKey:
    """The CA's private key (``keys/ca.key`` unless ``path`` says where it is kept offline); a
    clear ``FileNotFoundError`` when it is not readable."""
    path = path or data_dir / "keys" / "ca.key"
    try:
        return Ed25519PrivateKey.from_private_bytes(path.read_bytes())
    except (FileNotFoundError, PermissionError):
        raise FileNotFoundError(f"the CA key {path} is not readable here: certifying needs it "
                                "(run this command where the CA key is kept)") from None


def _check_db_url(url: str) -> None:
    """Refuse a PostgreSQL URL with a password: ``bank.json`` is no place for one."""
    if not url.startswith(("postgresql://", "postgres://")):
        return
    parts = urlsplit(url)
    if parts.password is not None or "password" in parse_qs(parts.query):
        raise ValueError("the database URL holds a password, which bank.json must not keep: give the URL "
                         "without it and set PGPASSWORD, ~/.pgpass or a pg_service.conf service instead")


def _sqlite_path(data_dir: Path, url: str) -> Path | None:
    """The SQLite file a stored URL names (resolved against the data directory), or ``None`` for
    PostgreSQL."""
    if url.startswith(("postgresql://", "postgres://")):
        return None
    return data_dir / url.removeprefix("sqlite:///")  # an absolute path stays itself


def add_keyset(data_dir: Path, store: Store, *, value: int, tokens: int, withdraw_days: float,
               spend_days: float, now: int, currency: str = "EUR", bits: int = 2048) -> KeysetInfo:
    """Create a keyset with its own RSA key and record it."""
    private = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    der = blindrsa.PublicKey.from_cryptography(private.public_key()).to_der()
    withdraw_until, spend_until = now + int(withdraw_days * DAY), now + int(spend_days * DAY)
    info = KeysetInfo(id=keyset_id(value, tokens, currency, withdraw_until, spend_until, der), value=value,
                      n=tokens, currency=currency, withdraw_until=withdraw_until, spend_until=spend_until,
                      public_key=der)
    write_private(data_dir / "keys" / f"{info.id}.pem",
                  private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, _NONE),
                  exclusive=True)
    store.run_sync(lambda tx: tx.add_keyset(info))
    return info


def delegate(data_dir: Path, now: int, *, valid_days: float = DELEGATION_DAYS, bank: str | None = None,
             ca_key: Ed25519PrivateKey | None = None) -> KeyDelegation:
    """Make a new online announcement key and have the CA certify it (needs the CA key).

    It replaces the previous key and delegation: the bank announces with the new one from its
    next start; devices accept either while each is valid.
    """
    if bank is None:
        bank = str(json.loads((data_dir / "bank.json").read_text())["bank"])
    ca = ca_key if ca_key is not None else load_ca_key(data_dir)
    online = Ed25519PrivateKey.generate()
    body = KeyDelegation(bank=bank, key=cose.public_key_bytes(online.public_key()), purpose=PURPOSE_ANNOUNCE,
                         nbf=now - _EARLY, exp=now + int(valid_days * DAY))
    keys_dir = data_dir / "keys"
    write_private(keys_dir / "ca.pub", cose.public_key_bytes(ca.public_key()))
    write_private(keys_dir / "announce.key", _raw(online))
    write_private(keys_dir / "delegation.cose", issue_delegation(body, ca))
    return body


WITHDRAWAL_KEYSETS = ((100, 100), (1000, 1000))
"""``(value, tokens)`` of the coins a new bank issues to pay with: 1.00 and 10.00 in cents."""
CHANGE_KEYSETS = tuple((1 << i, 1 << i) for i in range(10))
"""Change of token value 1 for exchanges: 1, 2, 4 … 512 tokens, which add up to 1023, so any
remainder of the 1000-token coin has its change (``change_slots``, docs/LIFECYCLE.md)."""
DEFAULT_KEYSETS = WITHDRAWAL_KEYSETS + CHANGE_KEYSETS
"""What ``bank init`` makes: without the change keysets, wallets could not exchange."""


def init_bank(data_dir: Path, bank: str, db_url: str | None, now: int,
              keysets: tuple[tuple[int, int], ...] = DEFAULT_KEYSETS) -> tuple[KeysetInfo, ...]:
    """Create a bank: configuration, CA, announcement, answer and sealing keys, the first keysets
    (``(value, tokens)`` each; :data:`DEFAULT_KEYSETS` unless given), which it returns.

    A PostgreSQL URL must not carry a password (``ValueError``); a SQLite path given on the
    command line is taken relative to the working directory, the default one lives in the data
    directory and is stored relative to it.
    """
    if db_url is not None:
        _check_db_url(db_url)
    if (data_dir / "bank.json").exists():
        raise FileExistsError(f"{data_dir} already holds a bank")
    if db_url is None:
        url = "bank.sqlite3"
    elif _sqlite_path(data_dir, db_url) is None:
        url = db_url
    else:
        url = str(Path(db_url.removeprefix("sqlite:///")).resolve())
    private_dir(data_dir)
    path = _sqlite_path(data_dir, url)
    if path is not None:
        create_private(path)  # before SQLite creates it (and its journal files) with the umask's mode
    # The database first: if it cannot be reached, no key has been written and the same command
    # can simply be run again.
    store = Store(url if path is None else str(path))
    try:
        ca = Ed25519PrivateKey.generate()
        for name, key in (("ca.key", ca), ("answer.key", Ed25519PrivateKey.generate()),
                          ("sealing.key", X25519PrivateKey.generate())):
            write_private(data_dir / "keys" / name, _raw(key), exclusive=True)
        delegate(data_dir, now, bank=bank, ca_key=ca)
        made = tuple(add_keyset(data_dir, store, value=value, tokens=tokens, withdraw_days=365, spend_days=730,
                                now=now) for value, tokens in keysets)
    finally:
        store.close()
    write_private(data_dir / "bank.json", json.dumps({"bank": bank, "db": url}, indent=2) + "\n")
    return made


def _all_keysets(tx: Tx) -> list[KeysetInfo]:
    return [row.info for row in tx.keysets()]


def _online_key(data_dir: Path, bank: str, now: int) -> tuple[Ed25519PublicKey, Ed25519PrivateKey, bytes]:
    """The CA's public key, the online announcement key and its delegation, checked at ``now``.

    A data directory from before the online key gets one here if the CA key is readable.
    """
    keys_dir = data_dir / "keys"
    names = ("ca.pub", "announce.key", "delegation.cose")
    if not all((keys_dir / name).exists() for name in names):
        try:
            ca = load_ca_key(data_dir)
        except FileNotFoundError:
            raise FileNotFoundError(f"no announcement key in {keys_dir} (a bank made before it had one): run "
                                    "'m2mpay bank delegate' where the CA key is") from None
        delegate(data_dir, now, bank=bank, ca_key=ca)
        log.info("created the online announcement key and its delegation by the CA")
    ca_public = Ed25519PublicKey.from_public_bytes((keys_dir / "ca.pub").read_bytes())
    online = Ed25519PrivateKey.from_private_bytes((keys_dir / "announce.key").read_bytes())
    delegation = (keys_dir / "delegation.cose").read_bytes()
    try:
        body = verify_delegation(delegation, ca_public, bank, now)
    except RemoteProtocolError as exc:
        raise ValueError(f"the announcement key's delegation is not valid now ({exc.message}): renew it with "
                         "'m2mpay bank delegate' where the CA key is") from None
    if body.key != cose.public_key_bytes(online.public_key()):
        raise ValueError("keys/announce.key is not the key keys/delegation.cose certifies: run "
                         "'m2mpay bank delegate' again")
    if body.exp - now < 30 * DAY:
        log.warning("the announcement key's delegation expires in %d days: run 'm2mpay bank delegate'",
                    (body.exp - now) // DAY)
    return ca_public, online, delegation


def load_bank(data_dir: Path, now: int, *, connections: int = 1,
              group_commits: bool = False) -> tuple[BankKeys, Store]:
    """Open a bank's keys and its existing database; the keys announcement is signed afresh.

    Reads neither the CA's private key (unless the online announcement key is still to be made)
    nor creates a database: a missing one is a ``FileNotFoundError``.
    """
    config = json.loads((data_dir / "bank.json").read_text())
    bank, url = str(config["bank"]), str(config["db"])
    path = _sqlite_path(data_dir, url)
    if path is not None and not path.is_file():
        raise FileNotFoundError(f"no bank database at {path}: bank.json names {url!r}, taken relative to the "
                                "data directory (banks made by older versions may need \"db\": \"bank.sqlite3\")")
    if path is None and (urlsplit(url).password is not None or "password=" in url):
        log.warning("bank.json holds a database password: move it to PGPASSWORD, ~/.pgpass or a service file")
    keys_dir = data_dir / "keys"
    ca_public, online, delegation = _online_key(data_dir, bank, now)
    answer = Ed25519PrivateKey.from_private_bytes((keys_dir / "answer.key").read_bytes())
    sealing = X25519PrivateKey.from_private_bytes((keys_dir / "sealing.key").read_bytes())
    store = Store(url if path is None else str(path), connections=connections, group_commits=group_commits)
    try:
        store.run_sync(lambda tx: backfill_phases(tx, now))
        infos, phases = store.run_sync(lambda tx: listed_keysets(tx, now))
        revoked = store.run_sync(lambda tx: revoked_vendors(tx, now))
        signers = {}
        # Every keyset, retired ones too: a withdrawal paid for before the retirement is still
        # signed when its device retries (a new one is refused: its phase is read at the debit).
        for info in store.run_sync(_all_keysets):
            # OpenSSL's full RSA key check costs ~30 ms a key (a third of a second for the default
            # twelve keysets, seconds on a Pi, at every start and every admin command). What it
            # guards against is checked otherwise: the key must be the keyset's own (its public
            # half is the announced one), and every signature is verified before it leaves
            # (BlindSigner.sign checks s^e == m), so a damaged key can only refuse, never mis-sign.
            private = serialization.load_pem_private_key((keys_dir / f"{info.id}.pem").read_bytes(), None,
                                                         unsafe_skip_rsa_key_validation=True)
            if not isinstance(private, rsa.RSAPrivateKey):
                raise ValueError(f"keyset {info.id}: not an RSA key")
            if blindrsa.PublicKey.from_cryptography(private.public_key()).to_der() != info.public_key:
                raise ValueError(f"keyset {info.id}: its key file holds another keyset's key")
            signers[info.id] = blindrsa.BlindSigner.from_private_key(private)
    except BaseException:
        store.close()
        raise
    announcement = KeysAnnouncement(
        bank=bank, issued=now, ca_key=cose.public_key_bytes(ca_public), delegation=delegation,
        answer_key=cose.public_key_bytes(answer.public_key()),
        sealing_key=sealing.public_key().public_bytes_raw(), keysets=infos, revoked=revoked,
        phases=tuple(phases.values()) or None)
    keys = BankKeys(bank=bank, data_dir=data_dir, ca_public=ca_public, announce_key=online,
                    delegation=KeyDelegation.decode(cose.decode_sign1(delegation).payload), answer_key=answer,
                    sealing_key=sealing, signers=signers, announcement=sign_announcement(announcement, online),
                    keyring=Keyring.from_announcement(announcement))
    return keys, store


def reannounce(keys: BankKeys, announcement: bytes, revoked: tuple[str, ...], now: int, *,
               listed: Announced | None = None) -> bytes | None:
    """``announcement`` signed again with ``revoked`` as its list (and, given ``listed``, its
    keysets and phase records), or ``None`` if nothing changed.

    How a running bank tells devices about a revocation or a retirement without a restart. Only
    keysets this process can sign for are listed: one added since it started waits for a restart.
    """
    current = KeysAnnouncement.decode(cose.decode_sign1(announcement).payload)
    fresh = dataclasses.replace(current, revoked=revoked)
    if listed is not None:
        infos = tuple(info for info in listed.keysets if info.id in keys.signers)
        records = tuple(listed.phases[i.id] for i in infos if i.id in listed.phases)
        fresh = dataclasses.replace(fresh, keysets=infos, phases=records or None)
    if fresh == current:
        return None
    return sign_announcement(dataclasses.replace(fresh, issued=now), keys.announce_key)
