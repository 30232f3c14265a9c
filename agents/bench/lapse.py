"""How fast the bank's lapse sweep lapses open blocks past their deadline.

``bank serve`` sweeps every few seconds (:func:`m2mpay.agents.bank.operations.sweep`); a region
where many blocks end by lapsing rather than settling needs the sweep to keep up with the blocks
opened. :func:`lapse_rate` measures it on a scratch bank: coins/s, one process.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from m2mpay.agents.bank.tx import Tx
from m2mpay.protocol.rules.bank import BlockStatus, CoinRecord

from .driver import BankDriver

__all__ = ["lapse_rate"]


async def lapse_rate(db_url: str, coins: int = 2000) -> float:
    """Coins/s the bank's lapse sweep lapses: ``coins`` open blocks, each with 10 tokens seen,
    past their deadline, swept as ``bank serve`` sweeps (one sweep after another until none is
    left). On a scratch bank of its own: these coins were never withdrawn, so it is not audited."""
    world = BankDriver.create(Path(tempfile.mkdtemp(prefix="m2mpay-lapse-")), db_url)
    try:
        vendor, info = world.vendor("v0"), world.keys.keyring.keysets[world.keyset]

        def open_blocks(tx: Tx) -> None:
            for _ in range(coins):
                tip = os.urandom(32)
                tx.put_coin(CoinRecord(tip=tip, keyset=info.id, n=info.n, token_value=info.token_value,
                                       position=info.n - 10, last=tip, status=BlockStatus.OPEN,
                                       session=os.urandom(16), vendor=vendor.name, account=vendor.account,
                                       start=info.n, deadline=world.clock.now - 1), new=True)

        world.store.run_sync(open_blocks)
        lapsed, start = 0, time.perf_counter()
        while lapsed < coins and (swept := await world.service.sweep()):
            lapsed += swept
        rate = lapsed / (time.perf_counter() - start)
        if lapsed != coins:
            raise SystemExit(f"the lapse sweep lapsed {lapsed} of {coins} blocks")
        return rate
    finally:
        world.store.close()
