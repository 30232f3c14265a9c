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

Every key is checked by the strict loader (:mod:`m2mpay.agents.config`): an unknown key, a wrong
type (``units = true``) or a value out of range stops the command with the file, table and key.
``wallet``, ``credentials``, ``broker`` and ``tls`` may come from the environment instead
(``M2MPAY_WALLET`` …, which wins over the file); the file itself is found as docs/OPERATOR.md
("Configuration") says.

Each round, when the bank is reachable: exchange the coins of keysets whose spending ends within a
week (docs/LIFECYCLE.md), then refill if the policy says so, counting only the value that can pay
now. Then ask the vendors whose close was pending for their final receipt again; ask every vendor
for its offer; take the cheapest one the policy allows; pay there. Every decision goes to the log.

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
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiocoap

from m2mpay.protocol.errors import ProtocolError
from m2mpay.protocol.rules.keyring import default_withdrawal

from ..config import ConfigError, build, read_toml
from ..mqtt import BankClient, TlsLogin, TransportError
from ..policy.config import PolicyConfig
from ..policy.engine import DAY, Decision, PolicyEngine
from .agent import PaymentResult, UserAgent, UserCredentials
from .errors import PolicyRefusal, VendorUnreachable

__all__ = ["RunConfig", "day_start", "run_user"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunConfig:
    """``user.toml``: where the wallet is, whom to pay, how much, how often, under which policy."""

    wallet: Path
    credentials: Path
    broker: str
    vendors: tuple[str, ...] = ()
    units: int = field(default=1, metadata={"min": 1})
    rounds: int = 1
    interval: float = 10.0
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    tls: Path | None = None
    """PKI directory for a certificate login (``mqtts://`` broker); the account name picks the files."""

    def __post_init__(self) -> None:
        for key, value, low in (("units", self.units, 1), ("rounds", self.rounds, 0), ("interval", self.interval, 0)):
            if value < low:
                raise ConfigError(f"must be at least {low} (got {value})", key=key)

    @classmethod
    def load(cls, path: Path, overrides: Mapping[str, Any] | None = None) -> RunConfig:
        """Read ``user.toml`` (paths in it are relative to its directory), then apply ``overrides``
        (settings the environment gives, which win over the file's)."""
        return build(cls, read_toml(path, "a user.toml"), file=path, base=path.parent, given=overrides)


def day_start(now: int) -> int:
    """The device's last local midnight at or before ``now`` (Unix seconds): the refill cap's day."""
    local = datetime.datetime.fromtimestamp(now)  # naive local time: timestamp() below follows DST
    return int(local.replace(hour=0, minute=0, second=0, microsecond=0).timestamp())


async def _refill(agent: UserAgent, config: RunConfig, credentials: UserCredentials) -> None:
    # Only what can pay now: coins in a session, uncertain ones and those of keysets past
    # spending would make the wallet think it holds money it cannot use.
    value = agent.spendable_value()
    refilled = agent.store.withdrawn_since(day_start(agent.now()))
    engine = PolicyEngine(config.policy)
    try:
        tls = TlsLogin.from_dir(config.tls, credentials.account) if config.tls else None
        async with BankClient(config.broker, credentials.bank, f"{credentials.account}-{uuid.uuid4().hex[:6]}",
                              timeout=5, tls=tls) as bank:
            if not agent.meta:  # a new wallet: learn the keys first
                await agent.withdraw(bank, credentials, 0)
            # Coins of a retired keyset become coins of current ones before their spending ends
            # (the announcement is fetched afresh here: a retirement counts from now).
            await agent.exchange_due(bank, credentials)
            keyring = agent.keyring()
            value = agent.spendable_value(keyring)  # the keys may be fresh: a retirement counts now
            # The coin a withdrawal without a keyset brings: the cheapest that is not change.
            open_ = [k for k in keyring.keysets.values() if agent.can_withdraw(keyring, k.id)]
            coin = default_withdrawal(open_) or default_withdrawal(keyring.keysets.values())
            if coin is None:
                log.warning("no refill: the bank lists no keyset")
                return
            count, decision = engine.refill(value, coin.value, True, refilled)
            agent.record_decision("refill", decision)
            if count:
                await agent.withdraw(bank, credentials, count)
    except TransportError as exc:
        _, decision = engine.refill(value, 1, False, refilled)
        agent.record_decision("refill", decision)
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
    agent.record_decision("choose", decision)
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
                   sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                   on_decision: Callable[[str, Decision], None] | None = None) -> list[PaymentResult]:
    """Run the configured rounds (forever when ``rounds`` is 0); returns the payments made.

    ``clock`` and ``sleep`` are the device's time (tests pass simulated ones); ``on_decision`` is
    told of every decision as it is logged (``user run`` shows progress with it).
    """
    credentials = UserCredentials.load(config.credentials)
    agent = UserAgent(config.wallet, config.policy, clock=clock)
    agent.on_decision = on_decision
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
