"""A population run, and the agents' memory: U users paying V vendors through one bank.

Mosquitto, the bank (``m2mpay bank serve``) and every vendor (``m2mpay vendor serve``) run as
their own processes, as deployed; the users are wallets in this process sharing one aiocoap
context (a user device is one wallet, so a process per user would measure Python's start-up).
Each user withdraws before the clock starts, then pays random vendors for a few units at a
time until the time is up. The figures are sessions/s and tokens/s over the whole population;
then the bank is audited and withdrawn = credited + left in wallets is checked.

Memory: the bank's resident size once it serves and is idle, its peak after the run, the
vendors' peak, and the peak of one ``m2mpay user pay`` process from start to exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import aiocoap

from m2mpay.broker.launcher import Mosquitto, free_port, free_udp_port

from ..bank import admin
from ..bank.keys import init_bank, load_bank
from ..mqtt import BankClient
from ..policy.config import UNLIMITED, PolicyConfig
from ..user.agent import UserAgent, UserCredentials

__all__ = ["population"]

BANK = "bench-bank"


def _kib(pid: int, field: str) -> int:
    """``VmRSS`` or ``VmHWM`` (peak) of a running process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


async def _settled(vendor_dirs: list[Path], timeout: float) -> None:
    """Wait until no vendor holds an open session (a broken-off one settles after idle_timeout)."""
    from ..vendor.store import VendorStore

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        open_sessions = 0
        for directory in vendor_dirs:
            store = VendorStore(directory / "vendor.sqlite3")
            open_sessions += len(store.sessions("open"))
            store.close()
        if not open_sessions:
            return
        await asyncio.sleep(0.5)


def _process(*args: str | Path | int) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "m2mpay.agents.cli", *map(str, args)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def user_pay_peak_kib(wallet: Path, vendor: str, units: int) -> tuple[int, int]:
    """Peak RSS of one ``m2mpay user pay`` from start to exit, measured by a parent of its own."""
    probe = ("import resource, subprocess, sys; "
             "code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode; "
             "print(code, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", probe, sys.executable, "-m", "m2mpay.agents.cli", "user", "pay",
                          "--wallet", str(wallet), vendor, "--units", str(units)],
                         capture_output=True, text=True, timeout=120, check=False).stdout.split()
    return int(out[0]), int(out[1])


async def _shopper(agent: UserAgent, ctx: aiocoap.Context, vendors: list[str], until: float,
                   counts: dict[str, int], kinds: dict[str, int], seed: int) -> None:
    rng = random.Random(seed)
    while time.monotonic() < until:
        try:
            result = await agent.pay(ctx, rng.choice(vendors), rng.randint(2, 6))
            counts["sessions"] += 1
            counts["tokens"] += result.tokens
        except Exception as exc:  # noqa: BLE001 - a run counts its failures and goes on
            counts["failures"] += 1
            kinds[f"{type(exc).__name__}: {str(exc)[:60]}"] = kinds.get(f"{type(exc).__name__}: {str(exc)[:60]}", 0) + 1
            await asyncio.sleep(0.05)


async def population(users: int, vendors: int, seconds: float, coins: int = 3) -> dict[str, object]:
    """Run the population for ``seconds``; sessions/s, tokens/s, audit and memory figures."""
    work = Path(tempfile.mkdtemp(prefix="m2mpay-population-"))
    now = int(time.time())
    processes: list[subprocess.Popen[bytes]] = []
    with Mosquitto(work / "mosquitto", port=free_port()) as broker:
        init_bank(work / "bank", BANK, None, now, keysets=((100, 100),))
        keys, store = load_bank(work / "bank", now)
        try:
            for i in range(users):
                admin.open_account(keys, store, f"u{i}", work / f"u{i}.json", now)
                admin.deposit(store, f"u{i}", 100 * (coins + 1), now)
            admin.open_account(keys, store, "probe", work / "probe.json", now)  # the one `user pay` process
            admin.deposit(store, "probe", 100, now)
            for i in range(vendors):
                admin.enroll_vendor(keys, store, f"v{i}", "parking", work / f"v{i}.json", now)
                (work / f"v{i}.toml").write_text(
                    "[pricing]\nprice = 1\nmeter_interval = 0.02\n[session]\nidle_timeout = 10\n")
            bank = _process("bank", "serve", "--data", work / "bank", "--broker", broker.url)
            processes.append(bank)
            # A throughput run, not a budget test: the default policy's budgets would refuse most of it.
            spend_freely = PolicyConfig.from_dict({
                "budget": {"per_hour": UNLIMITED, "per_day": UNLIMITED, "per_session": UNLIMITED},
                "vendors": {"max_per_day": UNLIMITED}, "categories": {"max_per_day": UNLIMITED}})
            agents = [UserAgent(work / "wallets" / f"u{i}", spend_freely) for i in range(users)]
            async with BankClient(broker.url, BANK, f"bench-{uuid.uuid4().hex[:6]}") as client:
                await client.keys(timeout=30)
                await asyncio.sleep(1.0)  # settled after start-up: the idle figure
                bank_idle = _kib(bank.pid, "VmRSS")
                await asyncio.gather(*(a.withdraw(client, UserCredentials.load(work / f"u{i}.json"), coins)
                                       for i, a in enumerate(agents)))
                probe = UserAgent(work / "wallets" / "probe")
                await probe.withdraw(client, UserCredentials.load(work / "probe.json"), 1)
                probe.close()
            urls = []
            for i in range(vendors):
                port = free_udp_port()
                processes.append(_process("vendor", "serve", "--credentials", work / f"v{i}.json", "--broker",
                                          broker.url, "--coap-port", port, "--config", work / f"v{i}.toml",
                                          "--data", work / f"v{i}"))
                urls.append(f"coap://[::1]:{port}")
            ctx = await aiocoap.Context.create_client_context()
            try:
                for url in urls:  # each vendor serves once it has the bank's keys
                    deadline = time.monotonic() + 30
                    while True:
                        try:
                            await agents[0].discover(ctx, url)
                            break
                        except Exception:  # not up yet
                            if time.monotonic() > deadline:
                                raise
                            await asyncio.sleep(0.2)
                counts = {"sessions": 0, "tokens": 0, "failures": 0}
                kinds: dict[str, int] = {}
                start = time.monotonic()
                until = start + seconds
                await asyncio.gather(*(_shopper(a, ctx, urls, until, counts, kinds, i) for i, a in enumerate(agents)))
                elapsed = time.monotonic() - start
            finally:
                await ctx.shutdown()
            bank_peak = _kib(bank.pid, "VmHWM")
            vendor_peak = max(_kib(p.pid, "VmHWM") for p in processes[1:])
            code, user_peak = user_pay_peak_kib(work / "wallets" / "probe", urls[0], 3)
            for agent in agents:
                agent.close()
            await _settled([work / f"v{i}" for i in range(vendors)], timeout=30.0)
        finally:
            for process in reversed(processes):
                process.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(10)
        wallets = 0
        for name in [f"u{i}" for i in range(users)] + ["probe"]:
            agent = UserAgent(work / "wallets" / name)
            wallets += sum(wc.remaining for wc, _ in agent.store.coins())
            agent.close()
        report = admin.audit(store)
        store.close()
    return {
        "users": users, "vendors": vendors, "seconds": elapsed,
        "sessions_per_s": counts["sessions"] / elapsed, "tokens_per_s": counts["tokens"] / elapsed,
        "sessions": counts["sessions"], "tokens": counts["tokens"], "failures": counts["failures"],
        "failure_kinds": kinds,
        "audit_ok": report.ok, "balanced": report.withdrawn == report.credited + wallets,
        "withdrawn": report.withdrawn, "credited": report.credited, "in_wallets": wallets,
        "bank_idle_mb": bank_idle / 1024, "bank_peak_mb": bank_peak / 1024,
        "vendor_peak_mb": vendor_peak / 1024, "user_pay_peak_mb": user_peak / 1024,
        "user_pay_exit": code,
    }


def main() -> int:
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument("--vendors", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=20)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(population(args.users, args.vendors, args.seconds)), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
