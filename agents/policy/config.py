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

import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from m2mpay.protocol.messages import MAX_WITHDRAW_BATCH, is_name

__all__ = ["STRATEGIES", "UNLIMITED", "PolicyConfig", "PolicyError"]

STRATEGIES = ("best_fit", "drain_partial", "largest_first", "fresh_per_vendor")
UNLIMITED = "unlimited"
"""What a policy file writes to lift a limit (read as ``None``)."""
_LIMIT = {"unlimited": True}
"""Field metadata: this limit may be written as ``"unlimited"``."""
_NAME_RULE = "1-32 characters of a-z 0-9 - _ ."


class PolicyError(ValueError):
    """A policy file that does not describe a policy."""


@dataclass(frozen=True, slots=True)
class Budget:
    """Money out of the wallet, per rolling hour and day, and per payment session."""

    per_hour: int | None = field(default=200, metadata=_LIMIT)
    per_day: int | None = field(default=1000, metadata=_LIMIT)
    per_session: int | None = field(default=100, metadata=_LIMIT)


@dataclass(frozen=True, slots=True)
class Vendors:
    """Vendors allowed and denied (as certificates name them), and the daily limit for each."""

    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()
    max_per_day: int | None = field(default=500, metadata=_LIMIT)


@dataclass(frozen=True, slots=True)
class Categories:
    """Categories allowed and denied (as certificates name them), and the daily limit for each."""

    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()
    max_per_day: int | None = field(default=1000, metadata=_LIMIT)


@dataclass(frozen=True, slots=True)
class Price:
    """The most a unit may cost: money per unit (minor units), held against the offer's price."""

    max_per_unit: int | None = field(default=10, metadata=_LIMIT)
    per_category: dict[str, int] = field(default_factory=dict)

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

    max_duration: int = 900
    max_idle: int = 120


@dataclass(frozen=True, slots=True)
class Coins:
    """Which coin to block for an offer."""

    strategy: str = "best_fit"


@dataclass(frozen=True, slots=True)
class Refill:
    """When to withdraw while the bank is reachable. ``below = 0``: never."""

    below: int = 0
    coins: int = 1
    daily_cap: int | None = field(default=0, metadata=_LIMIT)


_TABLES: dict[str, type[Any]] = {"budget": Budget, "vendors": Vendors, "categories": Categories, "price": Price,
                                 "deadline": Deadline, "session": Session, "coins": Coins, "refill": Refill}
_NAMED = {("vendors", "allow"), ("vendors", "deny"), ("categories", "allow"), ("categories", "deny")}


def _check_name(table: str, key: str, name: str) -> None:
    if not is_name(name):
        raise PolicyError(f"[{table}] {key}: {name!r} can never match a certificate name ({_NAME_RULE})")


def _is_amount(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _value(table: str, spec: Any, value: Any) -> Any:
    """One key's value, checked against the field it sets."""
    key, default = spec.name, spec.default
    if spec.metadata.get("unlimited") and value == UNLIMITED:
        return None
    if isinstance(default, tuple):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise PolicyError(f"[{table}] {key} must be a list of names")
        if (table, key) in _NAMED:
            for name in value:
                _check_name(table, key, name)
        return tuple(value)
    if key == "per_category":
        if not isinstance(value, dict) or not all(_is_amount(v) for v in value.values()):
            raise PolicyError(f"[{table}] {key} must map names to amounts")
        for name in value:
            _check_name(table, key, name)
        return value
    if isinstance(default, str):
        if not isinstance(value, str):
            raise PolicyError(f"[{table}] {key} must be a string")
        return value
    if not isinstance(value, int) or isinstance(value, bool):
        also = f' or "{UNLIMITED}"' if spec.metadata.get("unlimited") else ""
        raise PolicyError(f"[{table}] {key} must be a whole number{also}")
    if value < 0:
        raise PolicyError(f"[{table}] {key} must not be negative")
    return value


def _table(cls: type[Any], raw: Any, name: str) -> Any:
    if not isinstance(raw, dict):
        raise PolicyError(f"[{name}] must be a table")
    known = {f.name: f for f in fields(cls)}
    unknown = set(raw) - set(known)
    if unknown:
        raise PolicyError(f"[{name}] unknown key {sorted(unknown)[0]!r}")
    return cls(**{key: _value(name, known[key], value) for key, value in raw.items()})


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
    def from_dict(cls, data: dict[str, Any]) -> PolicyConfig:
        """A policy from parsed TOML; what is left out keeps the default."""
        unknown = set(data) - set(_TABLES)
        if unknown:
            raise PolicyError(f"unknown table [{sorted(unknown)[0]}]")
        config = cls(**{name: _table(kind, data[name], name) for name, kind in _TABLES.items() if name in data})
        if config.coins.strategy not in STRATEGIES:
            raise PolicyError(f"[coins] strategy must be one of {', '.join(STRATEGIES)}")
        if config.session.max_duration < 1 or config.session.max_idle < 1:
            raise PolicyError("[session] max_duration and max_idle must be at least 1 second")
        if not 1 <= config.refill.coins <= MAX_WITHDRAW_BATCH:
            raise PolicyError(f"[refill] coins must be between 1 and {MAX_WITHDRAW_BATCH}")
        return config

    @classmethod
    def load(cls, path: Path) -> PolicyConfig:
        """Read a policy file."""
        try:
            return cls.from_dict(tomllib.loads(path.read_text()))
        except tomllib.TOMLDecodeError as exc:
            raise PolicyError(f"{path}: {exc}") from exc
        except OSError as exc:
            raise PolicyError(f"{path}: {exc.strerror or exc}") from exc
