"""Devices that stay connected follow the bank's keys announcement: a revocation reaches them.

The bank signs its announcement again when a vendor is revoked (and at every start, new keysets
included). A device's connection used to keep the first announcement it heard for as long as it
stayed up, and a vendor kept the keyring it started with: a wallet withdrawing through a long-lived
connection kept paying a revoked vendor.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from m2mpay.agents.bank import admin
from m2mpay.agents.bank.keys import reannounce
from m2mpay.agents.bank.server import serve
from m2mpay.agents.mqtt import BankClient
from m2mpay.agents.user.agent import UserAgent, UserCredentials
from m2mpay.agents.vendor.agent import Credentials, VendorAgent
from m2mpay.agents.vendor.store import VendorStore
from m2mpay.protocol import cose
from m2mpay.protocol.certificates import sign_announcement, verify_announcement
from m2mpay.protocol.messages import KeysAnnouncement
from tests.bank_world import BankWorld

pytestmark = [pytest.mark.asyncio, pytest.mark.network]


class _Heard:
    """A keys listener that keeps what it is told and wakes whoever waits for it."""

    def __init__(self) -> None:
        self.announcements: list[bytes] = []
        self._event = asyncio.Event()

    def __call__(self, announcement: bytes) -> None:
        self.announcements.append(announcement)
        self._event.set()

    async def wait(self, timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            await self._event.wait()


@contextlib.asynccontextmanager
async def _serving(world: BankWorld, mosquitto: str) -> AsyncIterator[None]:
    ready = asyncio.Event()
    task = asyncio.create_task(serve(world.keys, world.service, mosquitto, sweep_interval=0.1, ready=ready))
    try:
        await asyncio.wait_for(ready.wait(), 10)
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _vendor_agent(world: BankWorld, bank: BankClient, tmp_path: Path) -> VendorAgent:
    vendor = world.vendor("meter")
    credentials = Credentials(vendor="meter", account=vendor.account, key=vendor.key, cert=vendor.cert,
                              bank=world.bank, ca_fingerprint=world.keys.fingerprint)
    return VendorAgent(credentials, world.keys.keyring, bank, VendorStore(tmp_path / "vendor.sqlite3"),
                       clock=world.clock)


async def test_connected_wallet_and_vendor_learn_a_revocation(world: BankWorld, mosquitto: str,
                                                              tmp_path: Path) -> None:
    world.vendor("rogue")
    user = world.user("alice")
    async with _serving(world, mosquitto), \
            BankClient(mosquitto, world.bank, f"alice-{uuid.uuid4().hex[:6]}") as bank:
        first = await bank.keys()
        assert verify_announcement(first, world.keys.fingerprint, world.clock.now).revoked == ()
        vendor = _vendor_agent(world, bank, tmp_path)  # started with the keys of the first announcement
        bank.keys_listeners.append(vendor.take_keys)
        heard = _Heard()
        bank.keys_listeners.append(heard)

        admin.revoke_vendor(world.store, "rogue", world.clock.now)
        await heard.wait()  # within a sweep interval, on the connection already open
        assert verify_announcement(await bank.keys(), world.keys.fingerprint, world.clock.now).revoked == ("rogue",)
        assert heard.announcements == [await bank.keys()] and heard.announcements[0] != first
        assert vendor.keyring.revoked == frozenset({"rogue"})

        wallet = UserAgent(tmp_path / "wallet", clock=world.clock)
        try:
            await wallet.withdraw(bank, UserCredentials.load(tmp_path / f"{user.name}.json"), 1)
            assert wallet.keyring().revoked == frozenset({"rogue"})  # kept for paying offline
        finally:
            wallet.close()
        vendor.store.close()


async def test_vendor_takes_only_newer_verified_announcements(world: BankWorld, mosquitto: str,
                                                              tmp_path: Path) -> None:
    async with BankClient(mosquitto, world.bank, f"meter-{uuid.uuid4().hex[:6]}") as bank:
        vendor = _vendor_agent(world, bank, tmp_path)
        keyring, now = vendor.keyring, world.clock.now
        assert vendor.take_keys(b"\xa0not an announcement") is False
        current = KeysAnnouncement.decode(cose.decode_sign1(world.keys.announcement).payload)
        forged = sign_announcement(dataclasses.replace(current, revoked=("meter",), issued=now + 5),
                                   Ed25519PrivateKey.generate())
        assert vendor.take_keys(forged) is False  # not signed by the delegated key
        assert vendor.keyring is keyring

        newer = reannounce(world.keys, world.keys.announcement, ("someone",), now + 10)
        older = reannounce(world.keys, world.keys.announcement, ("another",), now + 5)
        assert newer is not None and older is not None
        assert vendor.take_keys(newer) is True
        assert vendor.take_keys(older) is False  # a replayed older list never undoes a revocation
        assert vendor.keyring.revoked == frozenset({"someone"})
        offer = vendor.offer()
        assert offer.keysets == tuple(sorted(world.keys.keyring.keysets))  # offers still open under the same keys
        vendor.store.close()


async def test_listener_failure_does_not_end_the_connection(world: BankWorld, mosquitto: str) -> None:
    """What a listener raises is logged; the client keeps serving requests and later announcements."""
    world.vendor("rogue")
    async with _serving(world, mosquitto), \
            BankClient(mosquitto, world.bank, f"dev-{uuid.uuid4().hex[:6]}") as bank:
        seen = _Heard()

        def broken(_: bytes) -> None:
            raise RuntimeError("listener bug")

        await bank.keys()
        bank.keys_listeners += [broken, seen]
        admin.revoke_vendor(world.store, "rogue", world.clock.now)
        await seen.wait()
        assert len(seen.announcements) == 1
        assert await bank.request("status", b"\xffgarbage")  # a signed refusal: the connection is alive
