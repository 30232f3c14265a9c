"""A user device's spending policy, from TOML; unknown keys are refused.

Nothing is unlimited unless written: a table or key left out takes the conservative default
below (the whole default is written out in ``deploy/examples/policy.toml``), and a limit is
lifted only by writing ``"unlimited"``. Amounts are minor units; durations are seconds. Names of
vendors and categories must be names a certificate can carry (1-32 of ``a-z 0-9 - _ .``): any
other would silently never match. Example::

    [budget]
    per_hour = 200
    per_day = 1000
    per_session = 100          # "unlimited" lifts a limit

    [vendors]
    allow = []                 # empty: any vendor
    deny = ["shady-meter"]
    max_per_day = 500          # per vendor

    [categories]
    allow = ["parking", "ev"]  # empty: any category
    deny = []
    max_per_day = 1000         # per category

    [price]
    max_per_unit = 10          # default ceiling: money per unit, the offer's price, whatever the coin
    per_category = { parking = 5 }

    [deadline]
    max_ahead = 3600           # refuse a T further ahead than this
    clock_skew = 30            # tolerance when comparing the vendor's T with our clock

    [session]
    max_duration = 900         # every payment ends (and closes) by then, whatever the vendor does
    max_idle = 120             # close when the vendor has asked for nothing this long

    [coins]
    strategy = "best_fit"      # best_fit | drain_partial | largest_first | fresh_per_vendor

    [refill]
    below = 200                # withdraw when the wallet holds less than this
    coins = 2
    daily_cap = 2000           # withdrawn per local calendar day, restarts and `user withdraw` included
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from m2mpay.protocol.messages import MAX_WITHDRAW_BATCH

from ..config import UNLIMITED, ConfigError, build, read_toml

__all__ = ["STRATEGIES", "UNLIMITED", "PolicyConfig", "PolicyError"]

STRATEGIES = ("best_fit", "drain_partial", "largest_first", "fresh_per_vendor")
_LIMIT = {"unlimited": True}
"""Field metadata: this limit may be written as ``"unlimited"``."""
_NAMES = {"names": True}
"""Field metadata: names a certificate can carry (anything else would silently never match)."""


class PolicyError(ConfigError):
    """A policy that does not describe a policy (a :class:`~m2mpay.agents.config.ConfigError`)."""


@dataclass(frozen=True, slots=True)
class Budget:
    """Money out of the wallet, per rolling hour and day, and per payment session."""

    per_hour: int | None = field(default=200, metadata=_LIMIT)
    per_day: int | None = field(default=1000, metadata=_LIMIT)
    per_session: int | None = field(default=100, metadata=_LIMIT)


@dataclass(frozen=True, slots=True)
class Vendors:
    """Vendors allowed and denied (as certificates name them), and the daily limit for each."""

    allow: tuple[str, ...] = field(default=(), metadata=_NAMES)
    deny: tuple[str, ...] = field(default=(), metadata=_NAMES)
    max_per_day: int | None = field(default=500, metadata=_LIMIT)


@dataclass(frozen=True, slots=True)
class Categories:
    """Categories allowed and denied (as certificates name them), and the daily limit for each."""

    allow: tuple[str, ...] = field(default=(), metadata=_NAMES)
    deny: tuple[str, ...] = field(default=(), metadata=_NAMES)
    max_per_day: int | None = field(default=1000, metadata=_LIMIT)


@dataclass(frozen=True, slots=True)
class Price:
    """The most a unit may cost: money per unit (minor units), held against the offer's price."""

    max_per_unit: int | None = field(default=10, metadata=_LIMIT)
    per_category: dict[str, int] = field(default_factory=dict, metadata=_NAMES)

    def ceiling(self, category: str) -> int | None:
        """The price ceiling for ``category`` (``None``: unlimited)."""
        return self.per_category.get(category, self.max_per_unit)


@dataclass(frozen=True, slots=True)
class Deadline:
    """How far ahead a vendor's deadline ``T`` may be, and how much our clocks may disagree."""

    max_ahead: int = 3600
    clock_skew: int = 30


@dataclass(frozen=True, slots=True)
class Session:
    """How long one payment may take: never unlimited, so no vendor can hold the device."""

    max_duration: int = field(default=900, metadata={"min": 1})
    max_idle: int = field(default=120, metadata={"min": 1})


@dataclass(frozen=True, slots=True)
class Coins:
    """Which coin to block for an offer."""

    strategy: str = field(default="best_fit", metadata={"choices": STRATEGIES})


@dataclass(frozen=True, slots=True)
class Refill:
    """When to withdraw while the bank is reachable. ``below = 0``: never."""

    below: int = 0
    coins: int = field(default=1, metadata={"min": 1, "max": MAX_WITHDRAW_BATCH})
    daily_cap: int | None = field(default=0, metadata=_LIMIT)


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    """The whole policy of one device; ``PolicyConfig()`` is the conservative default."""

    budget: Budget = field(default_factory=Budget)
    vendors: Vendors = field(default_factory=Vendors)
    categories: Categories = field(default_factory=Categories)
    price: Price = field(default_factory=Price)
    deadline: Deadline = field(default_factory=Deadline)
    session: Session = field(default_factory=Session)
    coins: Coins = field(default_factory=Coins)
    refill: Refill = field(default_factory=Refill)

    @classmethod
    def from_dict(cls, data: dict[str, Any], file: Path | None = None) -> PolicyConfig:
        """A policy from parsed TOML; what is left out keeps the default."""
        try:
            return build(cls, data, file=file)
        except ConfigError as exc:
            raise PolicyError(exc.why, key=exc.key, table=exc.table, file=exc.file, hint=exc.hint) from None

    @classmethod
    def load(cls, path: Path) -> PolicyConfig:
        """Read a policy file."""
        try:
            data = read_toml(path, "a policy file")
        except ConfigError as exc:
            raise PolicyError(exc.why, file=exc.file, hint=exc.hint) from None
        return cls.from_dict(data, path)
