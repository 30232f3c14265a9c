"""A vendor's pricing and session policy, from TOML, with unknown keys refused.

Example::

    [pricing]
    service = "parking"
    unit = "minute"
    price = 2                 # money per unit: minor units of the keysets' currency
    meter_interval = 60.0     # seconds per unit delivered

    [session]
    block_window = 900        # seconds: T = now + block_window
    min_remaining = 10        # minor units a coin must still hold
    checkpoint_every = 100    # tokens between checkpoint settlements
    settle_margin = 60        # settle at the latest this many seconds before T
    idle_timeout = 120        # settle a session nobody paid in for this long

    [settlement]
    answer_timeout = 5.0      # seconds to wait for one answer of the bank before resending it
    attempts = 3              # sends of the same bytes in one try
    retry_first = 1.0         # seconds before trying an unanswered settlement again; it doubles
    retry_cap = 60.0          # the longest wait while T is far
    urgent_cap = 5.0          # the longest wait within settle_margin of T, and after T
    close_wait = 15.0         # how long a close waits for the bank before answering "pending"
                              # (one try of the bank client: answer_timeout × attempts)
    in_flight = 32            # settlements being sent at once
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["ConfigError", "Pricing", "SessionPolicy", "SettlementPolicy", "VendorConfig"]

C = TypeVar("C")
_MAX_PRICE = 1 << 20
"""The largest price an offer carries (``Offer.price``)."""


class ConfigError(ValueError):
    """A configuration file that does not describe a vendor."""


def _build(cls: type[C], table: Any, where: str) -> C:
    if not isinstance(table, dict):
        raise ConfigError(f"[{where}] must be a table")
    known = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(table) - set(known)
    if unknown:
        raise ConfigError(f"[{where}] unknown key {sorted(unknown)[0]!r}")
    values = {}
    for name, value in table.items():
        expected = known[name].type
        kind = {"int": int, "float": (int, float), "str": str}[str(expected)]
        if isinstance(value, bool) or not isinstance(value, kind):
            raise ConfigError(f"[{where}] {name} must be {expected}")
        values[name] = float(value) if expected == "float" else value
    return cls(**values)


@dataclass(frozen=True, slots=True)
class Pricing:
    """What is sold and at what price.

    ``price`` is money per unit (minor units); each coin pays it in its own tokens, rounded up
    to a whole token (:func:`m2mpay.protocol.rules.pricing.tokens_owed`).
    """

    service: str = "service"
    unit: str = "unit"
    price: int = 1
    meter_interval: float = 1.0

    def __post_init__(self) -> None:
        if not 1 <= self.price <= _MAX_PRICE or self.meter_interval <= 0:
            raise ConfigError(f"price must be 1 to {_MAX_PRICE} minor units and meter_interval > 0")


@dataclass(frozen=True, slots=True)
class SessionPolicy:
    """How long coins are blocked, when to checkpoint and when to settle."""

    block_window: int = 900
    min_remaining: int = 1
    checkpoint_every: int = 100
    settle_margin: int = 60
    idle_timeout: int = 120

    def __post_init__(self) -> None:
        if self.settle_margin >= self.block_window or self.block_window < 30:
            raise ConfigError("block_window must be >= 30 s and exceed settle_margin")
        if self.checkpoint_every < 1 or self.idle_timeout < 1 or self.min_remaining < 0:
            raise ConfigError("checkpoint_every and idle_timeout must be positive")


@dataclass(frozen=True, slots=True)
class SettlementPolicy:
    """How settlements reach the bank: nothing the network does ends one, only the bank's answer."""

    answer_timeout: float = 5.0
    attempts: int = 3
    retry_first: float = 1.0
    retry_cap: float = 60.0
    urgent_cap: float = 5.0
    close_wait: float = 15.0
    in_flight: int = 32

    def __post_init__(self) -> None:
        if self.answer_timeout <= 0 or self.attempts < 1 or self.close_wait < 0 or self.in_flight < 1:
            raise ConfigError("answer_timeout must be > 0, attempts and in_flight >= 1, close_wait >= 0")
        if not 0 < self.retry_first <= self.retry_cap or self.urgent_cap <= 0:
            raise ConfigError("retry_first must be > 0 and <= retry_cap, urgent_cap > 0")


@dataclass(frozen=True, slots=True)
class VendorConfig:
    """A vendor's whole policy."""

    pricing: Pricing = field(default_factory=Pricing)
    session: SessionPolicy = field(default_factory=SessionPolicy)
    settlement: SettlementPolicy = field(default_factory=SettlementPolicy)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VendorConfig:
        """A config from parsed TOML; unknown tables and keys are refused."""
        unknown = set(data) - {"pricing", "session", "settlement"}
        if unknown:
            raise ConfigError(f"unknown table [{sorted(unknown)[0]}]")
        return cls(pricing=_build(Pricing, data.get("pricing", {}), "pricing"),
                   session=_build(SessionPolicy, data.get("session", {}), "session"),
                   settlement=_build(SettlementPolicy, data.get("settlement", {}), "settlement"))

    @classmethod
    def load(cls, path: Path) -> VendorConfig:
        """Read a vendor.toml."""
        try:
            return cls.from_dict(tomllib.loads(path.read_text()))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: {exc}") from exc
