"""The same coin at two vendors at the same moment, through two bank worker processes on one
PostgreSQL: exactly one block each time, and the books balance."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from m2mpay.agents.bank import admin
from m2mpay.agents.mqtt import BankClient, broker_address
from m2mpay.protocol import envelope
from m2mpay.protocol.errors import ErrorCode
from m2mpay.protocol.messages import BlockAnswer
from tests.bank_world import BankWorld
from tests.waiting import wait_until_async

pytestmark = pytest.mark.network


def _workers(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def _connected(pid: int, port: int) -> bool:
    """Whether process ``pid`` holds an established TCP connection to ``port`` on this machine."""
    sockets = set()
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = fd.readlink().name
                if target.startswith("socket:["):
                    sockets.add(target[len("socket:["):-1])
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()  # local, remote (hex address:port), state (01 established), ..., inode
            if int(fields[2].rsplit(":", 1)[1], 16) == port and fields[3] == "01" and fields[9] in sockets:
                return True
    return False


async def _race(mosquitto: str, db_url: str, tmp_path: Path, trials: int, bank_id: str) -> tuple[int, int]:
    """(trials where exactly one vendor got the block, trials in all)."""
    world = BankWorld.create(tmp_path, db_url, bank=bank_id)
    keys, store = world.keys, world.store
    user = world.user("payer", deposit=100 * trials)
    vendors = [world.vendor("north"), world.vendor("south")]
    bank = subprocess.Popen([sys.executable, "-m", "m2mpay.agents.cli", "bank", "serve",
                             "--data", str(tmp_path / "bank"), "--broker", mosquitto, "--workers", "2"],
                            stderr=subprocess.DEVNULL)
    clients = [BankClient(mosquitto, world.bank, f"{v.name}-{uuid.uuid4().hex[:6]}", timeout=10) for v in vendors]
    try:
        for client in clients:
            await client.__aenter__()
        await clients[0].keys(timeout=30)
        # Both processes on the broker: each subscribes as soon as it is connected, and the
        # withdrawals below come before the first race.
        port = broker_address(mosquitto)[1]
        await wait_until_async(lambda: [p for p in [bank.pid, *_workers(bank.pid)] if _connected(p, port)][1:],
                               timeout=20, what="both bank processes are connected to the broker")
        world.send = clients[0].request
        coins = []
        for _ in range(0, trials, 50):
            coins += await world.withdraw(user, min(50, trials - len(coins)))
        exactly_one = 0
        for wc in coins:
            requests = [world.session(vendor, wc)[2] for vendor in vendors]
            raws = await asyncio.gather(*(c.request("block", r) for c, r in zip(clients, requests, strict=True)))
            outcomes = []
            for request, raw in zip(requests, raws, strict=True):
                try:
                    outcomes.append(envelope.open_answer(raw, keys.answer_key.public_key(), world.bank, "block",
                                                         BlockAnswer, request=request))
                except envelope.Refusal as exc:  # the loser's signed refusal
                    outcomes.append(exc)
            won = [o for o in outcomes if isinstance(o, BlockAnswer)]
            lost = [o for o in outcomes if not isinstance(o, BlockAnswer)]
            if len(won) == 1 and getattr(lost[0], "code", None) is ErrorCode.COIN_BLOCKED:
                exactly_one += 1
        report = admin.audit(store)
        assert report.ok, report.problems
        return exactly_one, len(coins)
    finally:
        for client in clients:
            await client.__aexit__(None, None, None)
        bank.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            bank.wait(15)
        store.close()


@pytest.mark.asyncio
async def test_same_coin_two_vendors_two_workers(mosquitto: str, pg_database: str, tmp_path: Path,
                                                  bank_id: str) -> None:
    exactly_one, trials = await _race(mosquitto, pg_database, tmp_path, 40, bank_id)
    assert exactly_one == trials == 40


@pytest.mark.heavy
@pytest.mark.asyncio
async def test_same_coin_two_vendors_two_workers_1000_times(mosquitto: str, pg_database: str,
                                                            tmp_path: Path, bank_id: str) -> None:
    exactly_one, trials = await _race(mosquitto, pg_database, tmp_path, 1000, bank_id)
    assert exactly_one == trials == 1000
