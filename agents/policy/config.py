"""A user device's spending policy, from TOML; unknown keys are refused.

Example (amounts in minor units)::

    [budget]
    per_hour = 500
    per_day = 3000
    per_session = 200

    [vendors]
    allow = []                 # empty: any vendor
    deny = ["shady-meter"]
    max_per_day = 1000         # per vendor

    [categories]
    allow = ["parking", "ev"]  # empty: any category
    deny = []
    max_per_day = 2000         # per category

    [price]
    max_per_unit = 10          # default ceiling
    per_category = { parking = 5 }

    [deadline]
    max_ahead = 3600           # refuse a T further ahead than this
    clock_skew = 30            # tolerance when comparing the vendor's T with our clock

    [coins]
    strategy = "best_fit"      # best_fit | drain_partial | largest_first | fresh_per_vendor

    [refill]
    below = 200                # withdraw when the wallet holds less than this
    coins = 2
    daily_cap = 5000
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

__all__ = ["STRATEGIES", "PolicyConfig", "PolicyError"]

STRATEGIES = ("best_fit", "drain_partial", "largest_first", "fresh_per_vendor")


class PolicyError(ValueError):
    """A policy file that does not describe a policy."""


@dataclass(frozen=True, slots=True)
class Budget:
    per_hour: int = 10**9
    per_day: int = 10**9
    per_session: int = 10**9


@dataclass(frozen=True, slots=True)
class Lists:
    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()
    max_per_day: int = 10**9


@dataclass(frozen=True, slots=True)
class Price:
    max_per_unit: int = 10**9
    per_category: dict[str, int] = field(default_factory=dict)

    def ceiling(self, category: str) -> int:
        return self.per_category.get(category, self.max_per_unit)


@dataclass(frozen=True, slots=True)
class Deadline:
    max_ahead: int = 3600
    clock_skew: int = 30


@dataclass(frozen=True, slots=True)
class Coins:
    strategy: str = "best_fit"


@dataclass(frozen=True, slots=True)
class Refill:
    below: int = 0
    coins: int = 1
    daily_cap: int = 0


_TABLES: dict[str, type[Any]] = {"budget": Budget, "vendors": Lists, "categories": Lists, "price": Price,
                                 "deadline": Deadline, "coins": Coins, "refill": Refill}


def _table(cls: type[Any], raw: Any, name: str) -> Any:
    if not isinstance(raw, dict):
        raise PolicyError(f"[{name}] must be a table")
    known = {f.name for f in fields(cls)}
    unknown = set(raw) - known
    if unknown:
        raise PolicyError(f"[{name}] unknown key {sorted(unknown)[0]!r}")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        default = getattr(cls(), key)
        if isinstance(default, tuple):
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise PolicyError(f"[{name}] {key} must be a list of names")
            value = tuple(value)
        elif isinstance(default, dict):
            if not isinstance(value, dict) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                                      for v in value.values()):
                raise PolicyError(f"[{name}] {key} must map names to amounts")
        elif isinstance(default, bool) or not isinstance(value, type(default)) or isinstance(value, bool):
            raise PolicyError(f"[{name}] {key} must be {type(default).__name__}")
        elif isinstance(value, int) and value < 0:
            raise PolicyError(f"[{name}] {key} must not be negative")
        values[key] = value
    return cls(**values)


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    """The whole policy of one device."""

    budget: Budget = field(default_factory=Budget)
    vendors: Lists = field(default_factory=Lists)
    categories: Lists = field(default_factory=Lists)
    price: Price = field(default_factory=Price)
    deadline: Deadline = field(default_factory=Deadline)
    coins: Coins = field(default_factory=Coins)
    refill: Refill = field(default_factory=Refill)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PolicyConfig:
        unknown = set(data) - set(_TABLES)
        if unknown:
            raise PolicyError(f"unknown table [{sorted(unknown)[0]}]")
        config = cls(**{name: _table(kind, data[name], name) for name, kind in _TABLES.items() if name in data})
        if config.coins.strategy not in STRATEGIES:
            raise PolicyError(f"[coins] strategy must be one of {', '.join(STRATEGIES)}")
        return config

    @classmethod
    def load(cls, path: Path) -> PolicyConfig:
        try:
            return cls.from_dict(tomllib.loads(path.read_text()))
        except tomllib.TOMLDecodeError as exc:
            raise PolicyError(f"{path}: {exc}") from exc
