"""The bank's request handling on its store: signed bytes in, signed answer bytes out, never an exception.

The pipeline (:mod:`m2mpay.agents.bank.pipeline`) decides; this module runs its transactions on
the bank's :class:`~m2mpay.agents.bank.store.Store` and counts the results. Expensive crypto
(signature checks, HPKE, blind signing) happens between transactions, never inside one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from m2mpay.protocol.rules.requests import BlockWindow

from .keys import BankKeys
from .ledger import Atomic, drive, drive_sync
from .metrics import BankMetrics
from .operations import sweep
from .pipeline import Pipeline, Reply
from .store import Store

__all__ = ["BankService", "Reply"]


@dataclass
class BankService:
    """Answers the operations of DESIGN.md §3-§4 for one bank, on its store."""

    keys: BankKeys
    store: Store
    window: BlockWindow = field(default_factory=BlockWindow)
    clock: Callable[[], float] = time.time
    metrics: BankMetrics | None = None
    pipeline: Pipeline = field(init=False)

    def __post_init__(self) -> None:
        self.pipeline = Pipeline(self.keys, self.window)

    async def handle(self, op: str, data: bytes, *, defer_sync: bool = False) -> bytes:
        """The signed answer to one request (an :class:`ErrorAnswer` for any refusal).

        With ``defer_sync`` the answer may rest on commits not yet on disk: the caller must
        call ``store.flush()`` before sending it (see :meth:`Store.run`).
        """
        return (await self.reply(op, data, defer_sync=defer_sync)).answer

    async def reply(self, op: str, data: bytes, *, defer_sync: bool = False) -> Reply:
        """:meth:`handle`, with the verified signer the answer is for. Never raises for any input."""
        start = time.perf_counter()

        def run(step: Atomic[Any]) -> Any:
            return self.store.run(step.fn, defer_sync=defer_sync, rows=step.rows)

        return self._observed(op, await drive(self.pipeline.handle(op, data, int(self.clock())), run), start)

    def reply_now(self, op: str, data: bytes) -> Reply:
        """:meth:`reply` with ``defer_sync``, in one go on SQLite (:attr:`Store.runs_inline`):
        no task, no turn of the event loop, for a request that never waits."""
        start = time.perf_counter()
        steps = self.pipeline.handle(op, data, int(self.clock()))
        return self._observed(op, drive_sync(steps, lambda step: self.store.run_now(step.fn)), start)

    def _observed(self, op: str, reply: Reply, start: float) -> Reply:
        if self.metrics is not None:
            self.metrics.observe(op, reply.result, time.perf_counter() - start)
        return reply

    async def sweep(self) -> int:
        """Lapse every open block past its deadline, crediting what the bank saw. Returns the count."""

        def run(step: Atomic[Any]) -> Any:
            return self.store.run(step.fn, rows=step.rows)

        return await drive(sweep(int(self.clock())), run)
