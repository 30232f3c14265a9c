"""A token bucket per bank process, for work that a request naming nobody can make the bank do.

Restores (RSA signatures) and exchanges (hash-chain checks) are plain CBOR, signed by nobody:
there is no account to refuse or to charge. Each bank process spends at most a budget of such
work per second on them; a request that would exceed it is refused with ``unavailable`` (not
final: the device retries later) before the work is done. See
:class:`~m2mpay.agents.bank.restore.SignatureBudget` and
:class:`~m2mpay.agents.bank.exchange.HashBudget`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Budget"]


@dataclass
class Budget:
    """A token bucket: ``rate`` units of work a second, at most ``burst`` saved up.

    Time is the bank's clock in whole seconds (the requests' ``now``); a clock that steps back
    refills nothing. Taken on the event loop only (the pipeline's steps), so never by two threads.
    """

    rate: float
    burst: float
    tokens: float = field(init=False)
    """Units left now: the bucket starts full."""
    last: int | None = field(default=None, init=False)
    """When it was last refilled (``None``: never used)."""

    def __post_init__(self) -> None:
        self.tokens = self.burst

    def take(self, count: int, now: int) -> bool:
        """Spend ``count`` units at ``now`` if the budget holds them; whether it did."""
        if self.last is not None and now > self.last:
            self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now if self.last is None else max(self.last, now)
        if count > self.tokens:
            return False
        self.tokens -= count
        return True
