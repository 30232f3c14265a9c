"""``m2mpay user run``: the autonomous user device.

Configuration (TOML)::

    wallet = "var/alice"
    credentials = "alice.json"
    broker = "mqtt://127.0.0.1:1883"
    vendors = ["coap://[::1]:5683", "coap://[::1]:5684"]
    units = 5          # units to buy per round
    rounds = 3         # 0: run until interrupted
    interval = 10.0    # seconds between rounds
    tls = "pki"        # optional: certificate login (mqtts:// broker) with pki/ACCOUNT.crt

    [policy]           # the tables of a policy file: budget, vendors, categories, price, …

Each round: refill if the policy says so and the bank is reachable; ask the vendors whose close
was pending for their final receipt again; ask every vendor for its offer; take the cheapest one
the policy allows; pay there. Every decision goes to the log.

No peer ends the loop: a vendor that refuses, stalls or never answers costs that round's payment
(logged; the payment's own deadline bounds it), a bank that refuses or cannot be reached costs
that round's refill. The daily refill cap counts the withdrawals kept in the wallet's database
since the device's local midnight, so neither a restart nor a long run gets around it.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
import tomllib
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiocoap

from m2mpay.protocol.errors import ProtocolError

from ..mqtt import BankClient, TlsLogin, TransportError
from ..policy.config import PolicyConfig
from ..policy.engine import DAY, PolicyEngine
from .agent import PaymentResult, UserAgent, UserCredentials
from .errors import PolicyRefusal, UsageError, VendorUnreachable

__all__ = ["RunConfig", "day_start", "run_user"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunConfig:
    """``user.toml``: where the wallet is, whom to pay, how much, how often, under which policy."""

    wallet: Path
    credentials: Path
    broker: str
    vendors: tuple[str, ...]
    units: int = 1
    rounds: int = 1
    interval: float = 10.0
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    tls: Path | None = None
    """PKI directory for a certificate login (``mqtts://`` broker); the account name picks the files."""

    def __post_init__(self) -> None:
        if self.units < 1 or self.rounds < 0 or self.interval < 0:
            raise UsageError("units must be at least 1, rounds and interval not negative")

    @classmethod
    def load(cls, path: Path) -> RunConfig:
        """Read ``user.toml``; paths in it are relative to its directory."""
        data: dict[str, Any] = tomllib.loads(path.read_text())
        allowed = {"wallet", "credentials", "broker", "vendors", "units", "rounds", "interval", "policy", "tls"}
        unknown = set(data) - allowed
        if unknown:
            raise ValueError(f"{path}: unknown key {sorted(unknown)[0]!r}")
        base = path.parent
        return cls(wallet=base / data["wallet"], credentials=base / data["credentials"], broker=data["broker"],
                   vendors=tuple(data.get("vendors", ())), units=int(data.get("units", 1)),
                   rounds=int(data.get("rounds", 1)), interval=float(data.get("interval", 10.0)),
                   policy=PolicyConfig.from_dict(data.get("policy", {})),
                   tls=base / data["tls"] if "tls" in data else None)


def day_start(now: int) -> int:
    """The device's last local midnight at or before ``now`` (Unix seconds): the refill cap's day."""
    local = datetime.datetime.fromtimestamp(now)  # naive local time: timestamp() below follows DST
    return int(local.replace(hour=0, minute=0, second=0, microsecond=0).timestamp())


async def _refill(agent: UserAgent, config: RunConfig, credentials: UserCredentials) -> None:
    value = sum(wc.remaining for wc, _ in agent.store.coins())
    refilled = agent.store.withdrawn_since(day_start(agent.now()))
    engine = PolicyEngine(config.policy)
    try:
        tls = TlsLogin.from_dir(config.tls, credentials.account) if config.tls else None
        async with BankClient(config.broker, credentials.bank, f"{credentials.account}-{uuid.uuid4().hex[:6]}",
                              timeout=5, tls=tls) as bank:
            if not agent.meta:  # a new wallet: learn the keys first
                await agent.withdraw(bank, credentials, 0)
            coin_value = min(k.value for k in agent.keyring().keysets.values())
            count, decision = engine.refill(value, coin_value, True, refilled)
            agent._log("refill", decision)
            if count:
                await agent.withdraw(bank, credentials, count)
    except TransportError as exc:
        _, decision = engine.refill(value, 1, False, refilled)
        agent._log("refill", decision)
        log.info("no refill: bank unreachable (%s)", exc)
    except ProtocolError as exc:  # refused, or an answer that does not verify: next round tries again
        log.warning("refill failed: %s (%s)", exc.code.wire, exc.message)


async def _round(agent: UserAgent, config: RunConfig, ctx: aiocoap.Context) -> PaymentResult | None:
    found = []
    for base in config.vendors:
        try:
            found.append((base, agent.offer_view(await agent.discover(ctx, base))))
        except (ProtocolError, VendorUnreachable) as exc:
            log.info("no usable offer at %s: %s", base, exc)
    engine = PolicyEngine(config.policy, agent.spending(since=agent.now() - DAY))
    best, decision = engine.choose_offer([view for _, view in found], config.units, agent.now())
    agent._log("choose", decision)
    if best is None:
        return None
    base = next(b for b, view in found if view is best)
    try:
        result = await agent.pay(ctx, base, config.units)
    except PolicyRefusal as refusal:
        log.info("policy refused: %s", refusal.decision.message)
        return None
    except (ProtocolError, VendorUnreachable) as exc:
        log.warning("payment at %s failed before the session opened: %s", base, exc)
        return None
    if not result.complete:
        log.warning("payment at %s incomplete: %s", base, result.why())
    return result


async def run_user(config: RunConfig, clock: Callable[[], float] = time.time,
                   sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> list[PaymentResult]:
    """Run the configured rounds (forever when ``rounds`` is 0); returns the payments made.

    ``clock`` and ``sleep`` are the device's time (tests pass simulated ones).
    """
    credentials = UserCredentials.load(config.credentials)
    agent = UserAgent(config.wallet, config.policy, clock=clock)
    payments: list[PaymentResult] = []
    try:
        ctx = await aiocoap.Context.create_client_context()
        try:
            round_ = 0
            while config.rounds == 0 or round_ < config.rounds:
                round_ += 1
                await _refill(agent, config, credentials)
                await agent.settle_pending(ctx)  # coins whose close was pending may be free by now
                result = await _round(agent, config, ctx)
                if result is not None:
                    payments.append(result)
                if config.rounds == 0 or round_ < config.rounds:
                    await sleep(config.interval)
        finally:
            await ctx.shutdown()
    finally:
        agent.close()
    return payments
