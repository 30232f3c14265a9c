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

Each round: refill if the policy says so and the bank is reachable; ask every vendor for its
offer; take the cheapest one the policy allows; pay there. Every decision goes to the log.
"""

from __future__ import annotations

import asyncio
import logging
import time
import tomllib
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiocoap

from protocol.errors import ProtocolError

from ..mqtt import BankClient, TlsLogin, TransportError
from ..policy.config import PolicyConfig
from ..policy.engine import PolicyEngine
from .agent import PaymentResult, PolicyRefusal, UserAgent, UserCredentials

__all__ = ["RunConfig", "run_user"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunConfig:
    wallet: Path
    credentials: Path
    broker: str
    vendors: tuple[str, ...]
    units: int = 1
    rounds: int = 1
    interval: float = 10.0
    policy: PolicyConfig = PolicyConfig()
    tls: Path | None = None
    """PKI directory for a certificate login (``mqtts://`` broker); the account name picks the files."""

    @classmethod
    def load(cls, path: Path) -> RunConfig:
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


async def _refill(agent: UserAgent, config: RunConfig, credentials: UserCredentials, refilled: int) -> int:
    value = sum(wc.remaining for wc, _ in agent.store.coins())
    try:
        tls = TlsLogin.from_dir(config.tls, credentials.account) if config.tls else None
        async with BankClient(config.broker, credentials.bank, f"{credentials.account}-{uuid.uuid4().hex[:6]}",
                              timeout=5, tls=tls) as bank:
            coin_value = 0
            if agent.meta:
                keyring = agent.keyring()
                coin_value = min(k.value for k in keyring.keysets.values())
            else:  # a new wallet: learn the keys first
                await agent.withdraw(bank, credentials, 0)
                coin_value = min(k.value for k in agent.keyring().keysets.values())
            count, decision = PolicyEngine(config.policy).refill(value, coin_value, True, refilled)
            agent._log("refill", decision)
            if count:
                coins = await agent.withdraw(bank, credentials, count)
                return refilled + sum(wc.n * wc.token_value for wc in coins)
    except TransportError:
        _, decision = PolicyEngine(config.policy).refill(value, 1, False, refilled)
        agent._log("refill", decision)
    return refilled


async def run_user(config: RunConfig, clock: Callable[[], float] = time.time) -> list[PaymentResult]:
    """Run the configured rounds (forever when ``rounds`` is 0); returns the payments made."""
    credentials = UserCredentials.load(config.credentials)
    agent = UserAgent(config.wallet, config.policy, clock=clock)
    ctx = await aiocoap.Context.create_client_context()
    payments: list[PaymentResult] = []
    refilled, round_ = 0, 0
    try:
        while config.rounds == 0 or round_ < config.rounds:
            round_ += 1
            refilled = await _refill(agent, config, credentials, refilled)
            found = []
            for base in config.vendors:
                try:
                    found.append((base, agent.offer_view(await agent.discover(ctx, base))))
                except (ProtocolError, TimeoutError, aiocoap.error.Error) as exc:
                    log.info("no usable offer at %s: %s", base, exc)
            engine = PolicyEngine(config.policy, agent._history())
            best, decision = engine.choose_offer([view for _, view in found], config.units, agent.now())
            agent._log("choose", decision)
            if best is not None:
                base = next(b for b, view in found if view is best)
                try:
                    payments.append(await agent.pay(ctx, base, config.units))
                except PolicyRefusal as refusal:
                    log.info("policy refused: %s", refusal.decision.message)
                except ProtocolError as exc:
                    log.warning("payment at %s failed: %s", base, exc.code.wire)
            if config.rounds == 0 or round_ < config.rounds:
                await asyncio.sleep(config.interval)
    finally:
        await ctx.shutdown()
        agent.close()
    return payments
