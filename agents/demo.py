"""``m2mpay demo``: the whole system on this machine, watched live, audited at the end.

A private Mosquitto on a free port, a bank on embedded SQLite, two vendors (parking at 1 minor unit
per minute-unit, EV charging at 3 per kWh-unit) and three user devices with different policies
(a car that may do both, a phone that only parks, a sensor on a tight hourly budget), each
refilling its wallet as its policy says, run scripted traffic for ``duration`` seconds. Then
everything stops, the bank is audited, and the summary checks that value withdrawn = value
credited to vendors + value left in wallets. Exit 0 only if both hold.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiocoap
from rich.console import Console
from rich.live import Live
from rich.table import Table

from m2mpay.broker.launcher import Mosquitto, free_port, free_udp_port
from m2mpay.protocol.rules.keyring import default_withdrawal

from .bank import admin
from .bank.keys import init_bank, load_bank
from .bank.server import serve
from .bank.service import BankService
from .bank.store import Store
from .mqtt import BankClient
from .policy.config import PolicyConfig
from .policy.engine import PolicyEngine
from .user.agent import PolicyRefusal, UserAgent, UserCredentials
from .vendor.config import Pricing, SessionPolicy, VendorConfig
from .vendor.server import load_credentials, run_vendor

__all__ = ["run_demo"]

BANK = "demo-bank"
VENDORS = (("parking", "parking", 1), ("charger", "ev", 3))
_REFILL = {"below": 150, "coins": 2, "daily_cap": 600}
USERS: dict[str, dict[str, Any]] = {
    "car": {"price": {"max_per_unit": 5}, "refill": _REFILL},
    "phone": {"categories": {"deny": ["ev"]}, "refill": _REFILL},
    "sensor": {"budget": {"per_hour": 40}, "refill": _REFILL},
}


@dataclass
class Stats:
    payments: int = 0
    tokens: int = 0
    refusals: dict[str, int] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)


def _view(stats: Stats, store: Store, users: dict[str, UserAgent], remaining: float) -> Table:
    table = Table(title=f"m2mpay demo — {remaining:4.0f} s left", expand=False)
    table.add_column("agent")
    table.add_column("balance at bank", justify="right")
    table.add_column("in wallet", justify="right")
    for name in users:
        table.add_row(name, str(admin.balance(store, name)),
                      str(sum(wc.remaining for wc, _ in users[name].store.coins())))
    for name, _, _ in VENDORS:
        table.add_row(f"vendor {name}", str(admin.balance(store, name)), "")
    elapsed = max(time.monotonic() - stats.started, 1e-6)
    open_sessions = store.run_sync(lambda tx: tx.open_blocks())
    table.caption = (f"open sessions {open_sessions}   payments {stats.payments}   "
                     f"tokens {stats.tokens} ({stats.tokens / elapsed:.0f}/s)   "
                     f"policy refusals {sum(stats.refusals.values())} {dict(sorted(stats.refusals.items()))}")
    return table


async def _refill(agent: UserAgent, bank: BankClient, credentials: UserCredentials, refilled: int) -> int:
    """Withdraw when the policy's refill rule says so; returns the value refilled today."""
    value = sum(wc.remaining for wc, _ in agent.store.coins())
    coin = default_withdrawal(agent.keyring().keysets.values())  # what a withdrawal brings: not change
    if coin is None:
        return refilled
    count, decision = PolicyEngine(agent.policy).refill(value, coin.value, True, refilled)
    agent.record_decision("refill", decision)
    if count:
        coins = await agent.withdraw(bank, credentials, count)
        refilled += sum(wc.remaining for wc in coins)
    return refilled


async def _shopper(name: str, agent: UserAgent, vendors: dict[str, str], stats: Stats, until: float,
                   stop: asyncio.Event, broker: str, credentials: UserCredentials) -> None:
    ctx = await aiocoap.Context.create_client_context()
    rng = random.Random(name)  # noqa: S311 - scripted traffic, not a secret
    refilled = 0
    try:
        async with BankClient(broker, BANK, f"{name}-{uuid.uuid4().hex[:6]}") as bank:
            refilled = await _refill(agent, bank, credentials, refilled)
        while time.monotonic() < until and not stop.is_set():
            if sum(wc.remaining for wc, _ in agent.store.coins()) < agent.policy.refill.below:
                async with BankClient(broker, BANK, f"{name}-{uuid.uuid4().hex[:6]}") as bank:
                    refilled = await _refill(agent, bank, credentials, refilled)
            vendor = rng.choice(sorted(vendors))
            try:
                result = await agent.pay(ctx, vendors[vendor], rng.randint(2, 8))
                stats.payments += 1
                stats.tokens += result.tokens
            except PolicyRefusal as refusal:
                stats.refusals[refusal.decision.reason] = stats.refusals.get(refusal.decision.reason, 0) + 1
            except Exception as exc:  # noqa: BLE001 - the demo reports and goes on
                stats.refusals[type(exc).__name__] = stats.refusals.get(type(exc).__name__, 0) + 1
            await asyncio.sleep(rng.uniform(0.05, 0.3))
    finally:
        await ctx.shutdown()


async def _demo(duration: float, console: Console, work: Path) -> int:
    now = int(time.time())
    console.print(f"[bold]m2mpay demo[/bold] in {work}")
    with Mosquitto(work / "mosquitto", port=free_port()) as broker:
        init_bank(work / "bank", BANK, None, now)
        keys, store = load_bank(work / "bank", now, connections=1)
        service = BankService(keys, store)
        for name in USERS:
            admin.open_account(keys, store, name, work / f"{name}.json", now)
            admin.deposit(store, name, 1_000, now)
        tasks: list[asyncio.Task[None]] = []
        ready = asyncio.Event()
        tasks.append(asyncio.create_task(serve(keys, service, broker.url, ready=ready), name="demo-bank"))
        await asyncio.wait_for(ready.wait(), 15)
        vendors = {}
        for name, category, price in VENDORS:
            admin.enroll_vendor(keys, store, name, category, work / f"{name}.json", now)
            port, up = free_udp_port(), asyncio.Event()
            config = VendorConfig(pricing=Pricing(service=name, unit="unit", price=price, meter_interval=0.02),
                                  session=SessionPolicy(block_window=600, idle_timeout=5))
            tasks.append(asyncio.create_task(run_vendor(load_credentials(work / f"{name}.json"), broker.url, port,
                                                        work / name, config, ready=up), name=f"demo-{name}"))
            await asyncio.wait_for(up.wait(), 15)
            vendors[name] = f"coap://[::1]:{port}"
        console.print(f"broker {broker.url}; vendors {', '.join(f'{k} {v}' for k, v in vendors.items())}")
        users = {name: UserAgent(work / "wallets" / name, PolicyConfig.from_dict(policy))
                 for name, policy in USERS.items()}
        for name, agent in users.items():  # learn the bank's keys; refills follow each user's policy
            async with BankClient(broker.url, BANK, f"{name}-{uuid.uuid4().hex[:6]}") as bank:
                await agent.withdraw(bank, UserCredentials.load(work / f"{name}.json"), 0)
        stats = Stats()
        until = time.monotonic() + duration
        stop = asyncio.Event()  # Ctrl-C ends the traffic early; the audit still runs
        asyncio.get_running_loop().add_signal_handler(signal.SIGINT, stop.set)
        shoppers = [asyncio.create_task(_shopper(n, a, vendors, stats, until, stop, broker.url,
                                                 UserCredentials.load(work / f"{n}.json")), name=f"demo-{n}")
                    for n, a in users.items()]
        try:
            with Live(_view(stats, store, users, duration), console=console, refresh_per_second=4) as live:
                while not all(s.done() for s in shoppers):
                    await asyncio.sleep(0.25)
                    live.update(_view(stats, store, users, max(0.0, until - time.monotonic())))
        finally:
            for task in shoppers + list(reversed(tasks)):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        wallets = sum(wc.remaining for agent in users.values() for wc, _ in agent.store.coins())
        for agent in users.values():
            agent.close()
        report = admin.audit(store)
        store.close()
    balanced = report.withdrawn == report.credited + wallets
    console.print()
    console.print(f"withdrawn {report.withdrawn} = credited to vendors {report.credited} + left in wallets "
                  f"{wallets}: {'yes' if balanced else 'NO'}")
    console.print(f"payments {stats.payments}, tokens {stats.tokens}, policy refusals "
                  f"{dict(sorted(stats.refusals.items()))}")
    for problem in report.problems:
        console.print(f"[red]audit problem:[/red] {problem}")
    ok = report.ok and balanced
    console.print("[green]audit passed[/green]" if ok else "[red]audit FAILED[/red]")
    return 0 if ok else 1


def run_demo(duration: float) -> int:
    """Run the demo; Ctrl-C stops the traffic early and still audits.

    Its keys, wallets and databases live in a temporary directory removed on the way out,
    however the demo ends (an error, or Ctrl-C before the traffic starts): they hold private keys.
    """
    with tempfile.TemporaryDirectory(prefix="m2mpay-demo-") as work:
        return asyncio.run(_demo(duration, Console(), Path(work)))
