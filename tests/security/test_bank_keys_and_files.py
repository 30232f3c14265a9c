"""Security review, Low findings on the bank's keys and files.

1. The CA's private key was loaded by every ``bank serve``: now an online key, certified by the CA
   for one purpose and a limited time, signs the announcement, and the CA key is read only by the
   admin commands that certify (enrolment, renewing that delegation). Vendor revocation.
2. File modes: secrets written atomically with mode 0600 whatever the umask and whatever existed;
   no database password in ``bank.json``.
3. A relative ``--data`` path: the database is found from any working directory, and a command
   never creates a missing database.
"""

from __future__ import annotations

import dataclasses
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from m2mpay.agents.bank import admin
from m2mpay.agents.bank.keys import init_bank, load_bank
from m2mpay.protocol import cose
from m2mpay.protocol.certificates import AAD_KEYS, ca_fingerprint, verify_announcement
from m2mpay.protocol.errors import RemoteProtocolError
from m2mpay.protocol.messages import BlockAnswer, Offer, SettleAnswer

from tests.bank_world import NOW, BankWorld

from tests.commands import m2mpay

DAY = 86400
BANK = "keys-and-files"
"""The bank id of the tests here that build a bank of their own: none of them reaches a broker."""


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask_zero() -> Iterator[None]:
    """The most permissive umask: modes must come from the code, not from the environment."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def _new_bank(tmp_path: Path) -> Path:
    data = tmp_path / "bank"
    init_bank(data, BANK, None, NOW, keysets=((100, 100),))
    return data


# --- 1. the CA key stays offline; an online key signs the announcement --------------------------

def test_ca_key_loaded_by_every_serve_no_longer(tmp_path: Path) -> None:
    """What ``bank serve`` loads works without ca.key and holds no CA private key."""
    data = _new_bank(tmp_path)
    keys, store = load_bank(data, NOW)
    store.close()
    fingerprint = keys.fingerprint
    offline = tmp_path / "offline-ca.key"
    (data / "keys" / "ca.key").rename(offline)  # kept offline from now on
    keys, store = load_bank(data, NOW + 60)
    try:
        assert keys.fingerprint == fingerprint
        ca_public = cose.public_key_bytes(keys.keyring.ca_key)
        for item in dataclasses.fields(keys):
            value = getattr(keys, item.name)
            if isinstance(value, Ed25519PrivateKey):
                assert cose.public_key_bytes(value.public_key()) != ca_public, f"BankKeys.{item.name} is the CA key"
        announcement = verify_announcement(keys.announcement, fingerprint, NOW + 60)
        assert announcement.bank == BANK
        with pytest.raises(RemoteProtocolError):  # signed by the delegated key, not by the CA
            cose.verify_sign1(keys.announcement, keys.keyring.ca_key, external_aad=AAD_KEYS)
        with pytest.raises(FileNotFoundError, match=r"ca\.key"):  # certifying needs the CA key: a clear error
            admin.enroll_vendor(keys, store, "meter", "parking", tmp_path / "meter.json", NOW + 60)
        assert not (tmp_path / "meter.json").exists()
        from m2mpay.agents.bank.keys import load_ca_key

        admin.enroll_vendor(keys, store, "meter", "parking", tmp_path / "meter.json", NOW + 60,
                            ca_key=load_ca_key(data, offline))  # `--ca-key FILE`: where it is kept offline
        assert json.loads((tmp_path / "meter.json").read_text())["ca_fingerprint"] == fingerprint
    finally:
        store.close()


def test_ca_key_loaded_by_every_serve_delegation_is_checked() -> None:
    """Devices accept an announcement only under a CA-certified, unexpired, announce-only key."""
    from m2mpay.protocol.certificates import issue_delegation, sign_announcement
    from m2mpay.protocol.messages import KeyDelegation, KeysAnnouncement

    ca, online = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    fingerprint = ca_fingerprint(cose.public_key_bytes(ca.public_key()))

    def delegation(*, purpose: str = "announce", bank: str = BANK, signer: Ed25519PrivateKey = ca,
                   key: Ed25519PrivateKey = online) -> bytes:
        return issue_delegation(KeyDelegation(bank=bank, key=cose.public_key_bytes(key.public_key()),
                                              purpose=purpose, nbf=NOW - 60, exp=NOW + DAY), signer)

    def announcement(cert: bytes, revoked: tuple[str, ...] = ()) -> KeysAnnouncement:
        other = Ed25519PrivateKey.generate()
        return KeysAnnouncement(bank=BANK, issued=NOW, ca_key=cose.public_key_bytes(ca.public_key()),
                                delegation=cert, answer_key=cose.public_key_bytes(other.public_key()),
                                sealing_key=bytes(32), keysets=(), revoked=revoked)

    good = announcement(delegation(), revoked=("meter",))
    assert verify_announcement(sign_announcement(good, online), fingerprint, NOW).revoked == ("meter",)
    for now in (NOW - 3600, NOW + DAY):  # before nbf, at exp
        with pytest.raises(RemoteProtocolError):
            verify_announcement(sign_announcement(good, online), fingerprint, now)
    with pytest.raises(RemoteProtocolError):  # signed by a key the CA did not delegate
        verify_announcement(sign_announcement(good, Ed25519PrivateKey.generate()), fingerprint, NOW)
    with pytest.raises(RemoteProtocolError):  # the CA itself signing the announcement is the old way: refused
        verify_announcement(sign_announcement(good, ca), fingerprint, NOW)
    for bad in (delegation(purpose="answer"), delegation(bank="bank-b"),
                delegation(signer=Ed25519PrivateKey.generate())):
        with pytest.raises(RemoteProtocolError):
            verify_announcement(sign_announcement(announcement(bad), online), fingerprint, NOW)


def test_ca_key_loaded_by_every_serve_old_data_dir_and_renewal(tmp_path: Path) -> None:
    """A data directory from before the online key gets one on its first load while ca.key is
    there; without ca.key that is one clear error. An expired delegation stops the bank until
    ``bank delegate`` renews it."""
    data = _new_bank(tmp_path)
    online, delegation = data / "keys" / "announce.key", data / "keys" / "delegation.cose"
    assert online.exists() and delegation.exists(), "bank init creates the online key and its delegation"
    online.unlink()
    delegation.unlink()
    keys, store = load_bank(data, NOW)
    store.close()
    assert _mode(online) == 0o600 and _mode(delegation) == 0o600
    assert verify_announcement(keys.announcement, keys.fingerprint, NOW).bank == BANK

    ca = (data / "keys" / "ca.key").read_bytes()
    online.unlink()
    delegation.unlink()
    (data / "keys" / "ca.key").unlink()
    with pytest.raises(FileNotFoundError, match="bank delegate"):
        load_bank(data, NOW)
    (data / "keys" / "ca.key").write_bytes(ca)
    load_bank(data, NOW)[1].close()

    later = NOW + 400 * DAY
    with pytest.raises(ValueError, match="bank delegate"):
        load_bank(data, later)
    m2mpay("bank", "delegate", "--data", data)  # the CLI renews with the real clock
    from m2mpay.agents.bank.keys import delegate
    delegate(data, later)
    keys, store = load_bank(data, later)
    store.close()
    assert verify_announcement(keys.announcement, keys.fingerprint, later).bank == BANK


@pytest.mark.asyncio
async def test_vendor_revocation_refuses_blocks_and_settlements(world: BankWorld, tmp_path: Path) -> None:
    """``revoke_vendor``: the running bank refuses that vendor's blocks and settlements at once;
    the next announcement lists it, and a wallet refuses to pay it."""
    alice, meter, other = world.user("alice"), world.vendor("meter"), world.vendor("other")
    first, second, third = await world.withdraw(alice, 3)
    _, session = await world.block(meter, first)
    admin.revoke_vendor(world.store, "meter", world.clock.now)

    request = meter.sign(session.settle_request(os.urandom(16), keep_open=False), "settle")
    with pytest.raises(RemoteProtocolError) as refused:
        world.open(await world.send("settle", request), "settle", SettleAnswer, request=request)
    assert refused.value.code.wire == "revoked"
    _, _, block = world.session(meter, second)
    with pytest.raises(RemoteProtocolError) as refused:
        world.open(await world.send("block", block), "block", BlockAnswer, request=block)
    assert refused.value.code.wire == "revoked" and refused.value.code.coap == "4.03"
    await world.block(other, third)  # everyone else is served as before
    with pytest.raises(KeyError):
        admin.revoke_vendor(world.store, "nobody", world.clock.now)

    keys, store = load_bank(world.directory / "bank", world.clock.now)  # the next serve
    store.close()
    announcement = verify_announcement(keys.announcement, keys.fingerprint, world.clock.now)
    assert announcement.revoked == ("meter",)
    from m2mpay.agents.user.agent import UserAgent

    wallet_dir = tmp_path / "wallet"
    wallet_dir.mkdir()
    (wallet_dir / "bank-keys.cose").write_bytes(keys.announcement)
    (wallet_dir / "wallet.json").write_text(json.dumps({"ca_fingerprint": keys.fingerprint, "bank": world.bank}))
    agent = UserAgent(wallet_dir, clock=world.clock)
    try:
        def offer(cert: bytes) -> Offer:
            return Offer(cert=cert, service="parking", unit="minute", price=1, deadline=world.clock.now + 600,
                         nonce=bytes(16), bank=world.bank, keysets=tuple(keys.keyring.keysets))

        assert agent.offer_view(offer(other.cert)).vendor == "other"
        with pytest.raises(RemoteProtocolError) as refused:
            agent.offer_view(offer(meter.cert))
        assert refused.value.code.wire == "revoked"
    finally:
        agent.close()


def test_vendor_revocation_from_the_command_line(tmp_path: Path) -> None:
    data = tmp_path / "bank"
    m2mpay("bank", "init", "--data", data)
    m2mpay("bank", "vendor", "enroll", "--data", data, "meter", "--category", "parking", "--out", tmp_path / "m.json")
    assert "revoked" in m2mpay("bank", "vendor", "revoke", "--data", data, "meter").stdout
    assert json.loads(m2mpay("bank", "keys", "--data", data, "--json").stdout)["revoked"] == ["meter"]
    unknown = m2mpay("bank", "vendor", "revoke", "--data", data, "nobody", check=False)
    assert unknown.returncode == 2 and "Traceback" not in unknown.stderr


# --- 2. file modes and the database password ----------------------------------------------------

def test_file_modes_secrets_are_0600_whatever_existed(tmp_path: Path, umask_zero: None) -> None:
    data = _new_bank(tmp_path)
    keys, store = load_bank(data, NOW)
    outs = [tmp_path / "alice.json", tmp_path / "meter.json"]
    for out in outs:  # an existing, world-readable file is replaced, not written into
        out.write_text("{}")
        out.chmod(0o644)
    try:
        admin.open_account(keys, store, "alice", outs[0], NOW)
        admin.enroll_vendor(keys, store, "meter", "parking", outs[1], NOW)
    finally:
        store.close()
    for out in outs:
        assert _mode(out) == 0o600, out.name
        assert "key" in json.loads(out.read_text())
    assert _mode(data) == 0o700 and _mode(data / "keys") == 0o700
    files = [p for p in data.rglob("*") if p.is_file()]
    assert data / "bank.sqlite3" in files and data / "bank.json" in files
    for path in files:
        assert _mode(path) == 0o600, path.relative_to(data)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary file left behind"


@pytest.mark.parametrize("url", ["postgresql://bank:s3cret@127.0.0.1:1/bankdb",
                                 "postgresql://bank@127.0.0.1:1/bankdb?password=s3cret"])
def test_file_modes_database_password_kept_out_of_bank_json(tmp_path: Path, url: str) -> None:
    data = tmp_path / "bank"
    result = m2mpay("bank", "init", "--data", data, "--db", url, check=False)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "PGPASSWORD" in result.stderr
    assert "s3cret" not in result.stdout + result.stderr
    assert not (data / "bank.json").exists() and not (data / "keys").exists()


def test_file_modes_device_databases_and_logs_are_0600(tmp_path: Path, umask_zero: None) -> None:
    from m2mpay.agents.policy.engine import Decision
    from m2mpay.agents.user.agent import UserAgent
    from m2mpay.agents.vendor.store import VendorStore

    vendor = VendorStore(tmp_path / "vendor" / "vendor.sqlite3")
    vendor.close()
    assert _mode(tmp_path / "vendor") == 0o700
    for path in (tmp_path / "vendor").iterdir():
        assert _mode(path) == 0o600, path.name
    agent = UserAgent(tmp_path / "wallet")
    try:
        agent._log("offer", Decision(True, "ok", "within the limits"))  # spending is in the database
    finally:
        agent.close()
    for path in (tmp_path / "wallet").iterdir():
        assert _mode(path) == 0o600, path.name


# --- 3. relative data paths; reading commands never create a database ----------------------------

def _in(cwd: Path, *args: str | Path, check: bool = True) -> str:
    return m2mpay(*args, check=check, cwd=cwd).stdout


def test_relative_data_path_found_from_another_directory(tmp_path: Path) -> None:
    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    here.mkdir()
    elsewhere.mkdir()
    _in(here, "bank", "init", "--data", "bank")
    _in(here, "bank", "account", "open", "--data", "bank", "alice", "--out", "alice.json")
    _in(here, "bank", "account", "deposit", "--data", "bank", "alice", "500")
    assert _in(elsewhere, "bank", "balance", "--data", "../here/bank", "alice").strip() == "500"
    assert "audit passed" in _in(elsewhere, "bank", "audit", "--data", "../here/bank")
    assert list(elsewhere.iterdir()) == [], "a command created files in the working directory"
    moved = tmp_path / "moved"
    (here / "bank").rename(moved)  # the data directory is self-contained
    assert _in(tmp_path, "bank", "balance", "--data", "moved", "alice").strip() == "500"


@pytest.mark.parametrize("command", [["audit", "--data", "{d}"], ["balance", "--data", "{d}", "alice"],
                                     ["keys", "--data", "{d}"], ["account", "deposit", "--data", "{d}", "alice", "5"]])
def test_relative_data_path_missing_database_is_an_error(tmp_path: Path, command: list[str]) -> None:
    data = tmp_path / "bank"
    m2mpay("bank", "init", "--data", data)
    for path in data.glob("bank.sqlite3*"):
        path.unlink()
    result = m2mpay("bank", *[part.format(d=data) for part in command], check=False)
    assert result.returncode != 0 and "audit passed" not in result.stdout
    assert len(result.stderr.strip().splitlines()) == 1 and "database" in result.stderr
    assert "Traceback" not in result.stderr
    assert not list(data.glob("bank.sqlite3*")), "a command created the missing database"
