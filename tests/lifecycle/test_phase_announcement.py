"""Keyset phases in the signed keys announcement: what a device adopts, and what it refuses.

Attack-first: an announcement is signed by the bank's delegated key, so a device with a valid
vendor or user certificate cannot sign one; it can only replay or forge. The bank itself (a
compromised or buggy process) can sign anything: the device then refuses a phase moved back, a
redeem window shortened or withdrawals reopened, and keeps the record it had.
"""

from __future__ import annotations

import dataclasses

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from m2mpay.agents.bank.keys import reannounce
from m2mpay.agents.bank.phases import Announced, retire_keyset
from m2mpay.protocol import cbor, cose
from m2mpay.protocol.certificates import sign_announcement, verify_announcement
from m2mpay.protocol.errors import ErrorCode, ProtocolError, RemoteProtocolError
from m2mpay.protocol.messages import KeysAnnouncement, KeysetPhase
from m2mpay.protocol.rules.keyring import Keyring
from m2mpay.protocol.rules.phases import REDEEM_GRACE
from tests.bank_world import BankWorld

pytestmark = pytest.mark.asyncio


def _current(world: BankWorld) -> KeysAnnouncement:
    return KeysAnnouncement.decode(cose.decode_sign1(world.keys.announcement).payload)


def _signed(world: BankWorld, announcement: KeysAnnouncement) -> bytes:
    return sign_announcement(announcement, world.keys.announce_key)


def _retired(world: BankWorld) -> tuple[KeysAnnouncement, KeysetPhase]:
    """The announcement a running bank signs after ``bank keyset retire``."""
    report = retire_keyset(world.store, world.keyset, world.clock.now)
    info = world.keys.keyring.keysets[world.keyset]
    listed = Announced(revoked=(), keysets=(info,), phases={world.keyset: report.record})
    fresh = reannounce(world.keys, world.keys.announcement, (), world.clock.now + 1, listed=listed)
    assert fresh is not None
    return verify_announcement(fresh, world.keys.fingerprint, world.clock.now), report.record


async def test_retirement_is_announced_and_followed(world: BankWorld) -> None:
    old = Keyring.from_announcement(_current(world))
    assert old.phases == {} and old.withdrawable(world.keyset, world.clock.now)
    announcement, record = _retired(world)
    assert announcement.phases == (record,)
    assert (record.phase, record.withdraw_until, record.retired) == ("spend-only", world.clock.now, world.clock.now)
    info = world.keys.keyring.keysets[world.keyset]
    assert record.redeem_until == info.spend_until + REDEEM_GRACE
    keyring, refused = Keyring.following(announcement, old.phases)
    assert refused == () and keyring.phases == {world.keyset: record}
    with pytest.raises(RemoteProtocolError) as refusal:
        keyring.withdrawable(world.keyset, world.clock.now + 1)
    assert refusal.value.code is ErrorCode.KEYSET_EXPIRED
    # Spending goes on until spend_until, and not a second longer.
    assert keyring.spendable(world.keyset, info.spend_until)
    assert not keyring.spendable(world.keyset, info.spend_until + 1)
    # Unchanged books: nothing left the bank, and a second announcement says nothing new.
    assert reannounce(world.keys, _signed(world, announcement), (), world.clock.now + 2,
                      listed=Announced((), (info,), {world.keyset: record})) is None


async def test_forged_phases_are_not_taken(world: BankWorld) -> None:
    """A device's own key (or any key but the delegated one) cannot make an announcement."""
    announcement, _ = _retired(world)
    back = dataclasses.replace(announcement, phases=None, issued=announcement.issued + 10)
    forged = sign_announcement(back, Ed25519PrivateKey.generate())
    with pytest.raises(ProtocolError) as refusal:
        verify_announcement(forged, world.keys.fingerprint, world.clock.now)
    assert refusal.value.code is ErrorCode.BAD_SIGNATURE


@pytest.mark.parametrize("change", ["active again", "redeem earlier", "withdrawals reopened"])
async def test_a_phase_rolled_back_keeps_the_record_held(world: BankWorld, change: str) -> None:
    announcement, record = _retired(world)
    held = Keyring.from_announcement(announcement).phases
    changed = {"active again": dataclasses.replace(record, phase="active"),
               "redeem earlier": dataclasses.replace(record, redeem_until=record.redeem_until - 1),
               "withdrawals reopened": dataclasses.replace(record, withdraw_until=record.withdraw_until + 1,
                                                           retired=record.withdraw_until + 1)}[change]
    # Signed by the bank's own key: only the device's rule stands between it and the rollback.
    rolled = verify_announcement(_signed(world, dataclasses.replace(announcement, phases=(changed,))),
                                 world.keys.fingerprint, world.clock.now)
    keyring, refused = Keyring.following(rolled, held)
    assert refused == (world.keyset,) and keyring.phases == {world.keyset: record}
    with pytest.raises(RemoteProtocolError) as refusal:
        keyring.withdrawable(world.keyset, world.clock.now + 1)
    assert refusal.value.code is ErrorCode.KEYSET_EXPIRED


@pytest.mark.parametrize("bad", ["unlisted keyset", "two records", "withdrawals past its date",
                                 "exchanges end before spending"])
async def test_ill_formed_phase_records_refuse_the_announcement(world: BankWorld, bad: str) -> None:
    announcement, record = _retired(world)
    info = world.keys.keyring.keysets[world.keyset]
    if bad in ("unlisted keyset", "two records"):
        phases = ((dataclasses.replace(record, keyset="ks-0000000000000000"),) if bad == "unlisted keyset"
                  else (record, record))
        obj = dataclasses.replace(announcement, phases=(record,)).to_obj()
        obj["phases"] = [p.to_obj(versioned=False) for p in phases]
        with pytest.raises(RemoteProtocolError) as refusal:
            KeysAnnouncement.decode(cbor.encode(obj))
        assert refusal.value.code is ErrorCode.BAD_REQUEST
        return
    wrong = (dataclasses.replace(record, withdraw_until=info.withdraw_until + 1, retired=info.withdraw_until + 1)
             if bad == "withdrawals past its date" else
             dataclasses.replace(record, redeem_until=info.spend_until - 1, withdraw_until=record.withdraw_until))
    with pytest.raises(RemoteProtocolError) as refusal:
        Keyring.from_announcement(dataclasses.replace(announcement, phases=(wrong,)))
    assert refusal.value.code is ErrorCode.BAD_REQUEST


async def test_an_announcement_without_phases_encodes_as_before(world: BankWorld) -> None:
    """Devices that predate phases decode today's announcement: the field is left out when empty."""
    obj = _current(world).to_obj()
    assert "phases" not in obj
    announcement, _ = _retired(world)
    assert "phases" in announcement.to_obj()
