"""The vendor process: CoAP site, bank connection, meter and settler, until cancelled.

At start it reads back what it held (sessions open or closing, their queued settlements; those
left open are closed at once) and serves at once: the bank may be unreachable, and settlements
are sent in the background. Then, in one TaskGroup: the meter counts one unit of every open
session per ``meter_interval`` and asks for the tokens the units now owe (the service hook is told
of the units each token pays for), and the settler closes sessions that went idle or are within
``settle_margin`` of their deadline, checkpoints every ``checkpoint_every`` tokens, and sends
every queued settlement when the core says it is due (at once, then with backoff until the bank
answers). The keys it checks coins with follow the bank's announcement: each new one (a
revocation, new keysets) is taken without a restart (:meth:`VendorAgent.take_keys`).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from m2mpay.protocol.certificates import verify_announcement
from m2mpay.protocol.rules.keyring import Keyring
from m2mpay.protocol.rules.vendor import SessionState

from ..config import read_json
from ..mqtt import BankClient, TlsLogin
from .agent import Credentials, VendorAgent
from .coap import serve_coap
from .config import VendorConfig
from .store import VendorStore

__all__ = ["load_credentials", "run_vendor"]

log = logging.getLogger(__name__)


def load_credentials(path: Path) -> Credentials:
    """Read the bundle written by ``m2mpay bank vendor enroll``."""
    data = read_json(path, "a credentials file")  # a file that is not JSON is named in the error
    return Credentials(vendor=data["vendor"], account=data["account"],
                       key=Ed25519PrivateKey.from_private_bytes(bytes.fromhex(data["key"])),
                       cert=bytes.fromhex(data["cert"]), bank=data["bank"], ca_fingerprint=data["ca_fingerprint"])


async def _meter(agent: VendorAgent) -> None:
    interval = agent.config.pricing.meter_interval
    while True:
        await asyncio.sleep(interval)
        for sid, session in list(agent.sessions.items()):
            if session.state is SessionState.OPEN:
                agent.due(sid)


async def _settler(agent: VendorAgent, period: float = 1.0) -> None:
    while True:
        agent.tend()
        due = agent.next_due()
        wait = period if due is None else min(period, max(0.01, due - agent.monotonic()))
        await asyncio.sleep(wait)


async def run_vendor(credentials: Credentials, broker: str, coap_port: int, data_dir: Path,
                     config: VendorConfig, host: str = "::1", ready: asyncio.Event | None = None,
                     clock: Callable[[], float] = time.time, settle_period: float = 1.0,
                     tls: TlsLogin | None = None) -> None:
    """Serve payments until cancelled."""
    store = VendorStore(data_dir / "vendor.sqlite3")
    try:
        retry = config.settlement
        async with BankClient(broker, credentials.bank, f"{credentials.vendor}-{uuid.uuid4().hex[:6]}",
                              timeout=retry.answer_timeout, retries=retry.attempts, tls=tls) as bank:
            announcement = await bank.keys(timeout=30)
            keyring = Keyring.from_announcement(verify_announcement(announcement, credentials.ca_fingerprint,
                                                                    int(clock())))
            agent = VendorAgent(credentials, keyring, bank, store, config=config, clock=clock,
                                deliver=lambda sid, units: log.info("delivered %d unit(s) in %s", units, sid.hex()[:8]))
            agent.take_keys(announcement)  # remembers when these keys were issued: no older list is taken later
            bank.keys_listeners.append(agent.take_keys)  # a revocation or new keysets, without a restart
            try:
                restored = agent.restore()
                if restored:
                    log.info("read back %d session(s) to settle", restored)
                async with serve_coap(agent, host, coap_port):
                    log.info("vendor %s serving CoAP on [%s]:%d", credentials.vendor, host, coap_port)
                    if ready is not None:
                        ready.set()
                    async with asyncio.TaskGroup() as group:
                        group.create_task(_meter(agent), name="vendor-meter")
                        group.create_task(_settler(agent, settle_period), name="vendor-settler")
            finally:
                await agent.aclose()
    finally:
        store.close()
