"""The benchmarks' bank: a bank on disk and the devices that talk to it, driven with the pure rules.

``send`` is the bank's service called directly, or an MQTT client talking to a bank in another
process. The benchmarks build their load with it (accounts, vendors, withdrawals, signed block
requests) and check the answers the way a device does.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self, TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from m2mpay.agents.bank import admin
from m2mpay.agents.bank.keys import BankKeys, init_bank, load_bank
from m2mpay.agents.bank.service import BankService
from m2mpay.agents.bank.store import Store
from m2mpay.protocol import envelope, sealing
from m2mpay.protocol.certificates import cert_hash
from m2mpay.protocol.messages import Message, Offer, OpenSession, WithdrawAnswer
from m2mpay.protocol.rules import wallet
from m2mpay.protocol.rules.vendor import VendorSession

__all__ = ["BANK", "BankDriver", "Clock", "Device", "Send"]

BANK = "bank-a"
"""The bank id of a benchmark's throwaway bank (each run brings its own broker or clears its keys)."""

A = TypeVar("A", bound=Message)

Send = Callable[[str, bytes], Awaitable[bytes]]
"""Hands ``(op, signed request)`` to a bank and returns its raw answer."""


@dataclass
class Clock:
    """A settable clock: the bank's notion of now, in whole seconds."""

    now: int

    def __call__(self) -> float:
        return float(self.now)


@dataclass
class Device:
    """A user or vendor as its credentials file describes it."""

    name: str
    key: Ed25519PrivateKey
    bank: str
    cert: bytes = b""
    account: str = ""

    @classmethod
    def load(cls, path: Path) -> Device:
        """The device of the credentials file at ``path`` (what ``bank account open`` or
        ``bank vendor enroll`` wrote)."""
        data = json.loads(path.read_text())
        return cls(name=data.get("account") if "vendor" not in data else data["vendor"],
                   key=Ed25519PrivateKey.from_private_bytes(bytes.fromhex(data["key"])), bank=data["bank"],
                   cert=bytes.fromhex(data.get("cert", "")), account=data["account"])

    def sign(self, message: Message, op: str) -> bytes:
        """``message`` as a signed request for ``op`` to this device's bank."""
        return envelope.sign_request(message, self.key, self.name, self.bank, op)


@dataclass
class BankDriver:
    """Drives a bank through ``send`` (the service directly, or MQTT) with the pure device rules."""

    keys: BankKeys
    store: Store
    service: BankService
    clock: Clock
    directory: Path
    send: Send = field(init=False)

    def __post_init__(self) -> None:
        self.send = self.service.handle

    @classmethod
    def create(cls, directory: Path, db_url: str | None, *, now: int | None = None,
               bank: str = BANK, group_commits: bool = False) -> Self:
        """A new bank ``bank`` in ``directory / "bank"`` (one keyset of 100 one-unit tokens), clock at
        ``now`` (the real time when ``None``); ``group_commits`` as ``bank serve`` with one process."""
        clock = Clock(int(time.time()) if now is None else now)
        init_bank(directory / "bank", bank, db_url, clock.now, keysets=((100, 100),))
        keys, store = load_bank(directory / "bank", clock.now, connections=2, group_commits=group_commits)
        return cls(keys=keys, store=store, service=BankService(keys, store, clock=clock), clock=clock,
                   directory=directory)

    @property
    def bank(self) -> str:
        """This bank's id: its topics, the context its requests and answers are signed in."""
        return self.keys.bank

    def user(self, name: str, deposit: int = 10_000) -> Device:
        """A new account ``name`` holding ``deposit``."""
        path = self.directory / f"{name}.json"
        admin.open_account(self.keys, self.store, name, path, self.clock.now)
        admin.deposit(self.store, name, deposit, self.clock.now)
        return Device.load(path)

    def vendor(self, name: str, category: str = "parking") -> Device:
        """A newly enrolled vendor ``name``."""
        path = self.directory / f"{name}.json"
        admin.enroll_vendor(self.keys, self.store, name, category, path, self.clock.now)
        return Device.load(path)

    @property
    def keyset(self) -> str:
        """The keyset with the fewest tokens per coin."""
        return min(self.keys.keyring.keysets, key=lambda k: self.keys.keyring.keysets[k].n)

    async def withdraw(self, user: Device, count: int = 1) -> list[wallet.WalletCoin]:
        """``count`` coins of :attr:`keyset` for ``user``, verified."""
        info = self.keys.keyring.keysets[self.keyset]
        public = self.keys.keyring.rsa_keys[self.keyset]
        pending = wallet.prepare_withdrawal(user.name, info, public, count)
        signed = user.sign(pending.request, "withdraw")
        answer = self.open(await self.send("withdraw", signed), "withdraw", WithdrawAnswer, request=signed)
        return wallet.complete_withdrawal(pending, answer, info, public)

    def open(self, raw: bytes, op: str, kind: type[A], *, request: bytes) -> A:
        """The verified answer to ``request`` (the bytes sent)."""
        return envelope.open_answer(raw, self.keys.answer_key.public_key(), self.bank, op, kind, request=request)

    def session(self, vendor: Device, wc: wallet.WalletCoin, deadline: int | None = None,
                ) -> tuple[wallet.WalletCoin, VendorSession, bytes]:
        """Offer, authorization and the vendor's block request (signed), not yet sent."""
        offer = Offer(cert=vendor.cert, service="parking", unit="minute", price=1,
                      deadline=deadline or self.clock.now + 600, nonce=os.urandom(16), bank=self.bank,
                      keysets=tuple(sorted(self.keys.keyring.keysets)))
        wc, auth = wallet.authorize(wc, deadline=offer.deadline, nonce=offer.nonce, cert_hash=cert_hash(offer.cert),
                                    now=self.clock.now)
        sealed = sealing.seal(auth.encode(), self.keys.keyring.sealing_key, sealing.info_for_bank(self.bank))
        session = VendorSession(offer, self.keys.keyring, vendor.name)
        request = session.open(OpenSession(coin=wc.coin, sealed=sealed, deadline=offer.deadline, nonce=offer.nonce),
                               os.urandom(16), self.clock.now)
        return wc, session, vendor.sign(request, "block")

