"""The tests' bank world: a real bank on disk (SQLite or PostgreSQL) and the devices that talk to it.

It is the benchmarks' :class:`~m2mpay.agents.bench.driver.BankDriver` with what only tests need: a
clock that starts at a fixed :data:`NOW`, whole block and settle round trips, and the audit every
bank test ends with. Each test gets its own bank id (:func:`bank_id_for`), so tests sharing the
session's Mosquitto never see each other's requests, answers or retained keys.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass

from m2mpay.agents.bank import admin
from m2mpay.agents.bench import driver
from m2mpay.agents.bench.driver import Device, Send
from m2mpay.protocol.messages import BlockAnswer, SettleAnswer
from m2mpay.protocol.rules import wallet
from m2mpay.protocol.rules.vendor import VendorSession

__all__ = ["NOW", "BankWorld", "Clock", "Device", "Send", "bank_id_for"]

NOW = 1_800_000_000
"""Where a test bank's clock starts (2027-01-15): far from any real certificate's validity."""

_UNSAFE = re.compile(r"[^a-z0-9]+")


def bank_id_for(nodeid: str) -> str:
    """A bank id no other test gets: a readable slug of the test's name and a digest of its whole
    node id. At most 29 characters (the protocol allows 32), valid in topics, shared-subscription
    names and the broker's ACL."""
    name = nodeid.rsplit("::", 1)[-1].lower().removeprefix("test_")
    slug = _UNSAFE.sub("-", name).strip("-")[:16].rstrip("-")
    digest = hashlib.sha256(nodeid.encode()).hexdigest()[:10]
    return f"t-{slug}-{digest}" if slug else f"t-{digest}"


@dataclass
class Clock(driver.Clock):
    """The bank's clock, at :data:`NOW` unless a test says otherwise; tests move it by hand."""

    now: int = NOW


class BankWorld(driver.BankDriver):
    """A bank driven with the pure device rules, plus the round trips and checks tests use."""

    async def block(self, vendor: Device, wc: wallet.WalletCoin) -> tuple[wallet.WalletCoin, VendorSession]:
        """``vendor`` opens a session on ``wc`` at the bank; the coin and the blocked session."""
        wc, session, signed = self.session(vendor, wc)
        answer = self.open(await self.send("block", signed), "block", BlockAnswer, request=signed)
        session.blocked(answer)
        return wc, session

    async def settle(self, vendor: Device, session: VendorSession, *, keep_open: bool = False) -> SettleAnswer:
        """``vendor`` settles what ``session`` holds; the bank's verified answer."""
        request = session.settle_request(os.urandom(16), keep_open=keep_open)
        signed = vendor.sign(request, "settle")
        answer = self.open(await self.send("settle", signed), "settle", SettleAnswer, request=signed)
        session.settled(answer)
        return answer

    def audit(self) -> admin.AuditReport:
        """The bank's books checked as ``bank audit`` checks them."""
        return admin.audit(self.store)
