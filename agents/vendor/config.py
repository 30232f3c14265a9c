"""A vendor's pricing and session policy, from TOML, read by the strict loader (:mod:`m2mpay.agents.config`).

``service`` must be the category the bank enrolled the vendor for (its certificate says it):
``vendor serve`` refuses to start otherwise, and takes the certificate's category when the file
leaves it out. The device's own settings (credentials, broker, CoAP address, data directory,
TLS) may be written at the top of the same file; the command line and ``M2MPAY_*`` variables
override them (docs/OPERATOR.md, "Configuration"). Example::

    credentials = "meter-1.json"   # optional: paths are relative to this file
    broker = "mqtts://bank.example.org:8883"

    [pricing]
    service = "parking"
    unit = "minute"
    price = 2                 # money per unit: minor units of the keysets' currency
    meter_interval = 60.0     # seconds per unit delivered

    [session]
    block_window = 900        # seconds: T = now + block_window
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

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import ClassVar

from m2mpay.protocol import cose
from m2mpay.protocol.errors import ProtocolError
from m2mpay.protocol.messages import CertificateBody

from ..config import ConfigError, build, read_toml

__all__ = ["ConfigError", "Pricing", "SessionPolicy", "SettlementPolicy", "VendorConfig", "VendorFile",
           "certified_category"]

_MAX_PRICE = 1 << 20
"""The largest price an offer carries (``Offer.price``)."""


@dataclass(frozen=True, slots=True)
class Pricing:
    """What is sold and at what price.

    ``price`` is money per unit (minor units); each coin pays it in its own tokens, rounded up
    to a whole token (:func:`m2mpay.protocol.rules.pricing.tokens_owed`). ``service`` is the
    category the vendor is enrolled for (see :meth:`VendorConfig.for_category`).
    """

    service: str = "service"
    unit: str = "unit"
    price: int = field(default=1, metadata={"min": 1, "max": _MAX_PRICE})
    meter_interval: float = 1.0

    def __post_init__(self) -> None:
        if not 1 <= self.price <= _MAX_PRICE:
            raise ConfigError(f"must be 1 to {_MAX_PRICE} minor units (got {self.price})", key="price")
        if self.meter_interval <= 0:
            raise ConfigError(f"must be more than 0 seconds (got {self.meter_interval})", key="meter_interval")


@dataclass(frozen=True, slots=True)
class SessionPolicy:
    """How long coins are blocked, when to checkpoint and when to settle."""

    REMOVED: ClassVar[dict[str, str]] = {"min_remaining": "it never had an effect: delete the line"}

    block_window: int = field(default=900, metadata={"min": 30})
    checkpoint_every: int = field(default=100, metadata={"min": 1})
    settle_margin: int = 60
    idle_timeout: int = field(default=120, metadata={"min": 1})

    def __post_init__(self) -> None:
        if self.block_window < 30:
            raise ConfigError(f"must be at least 30 seconds (got {self.block_window})", key="block_window")
        if self.settle_margin >= self.block_window:
            raise ConfigError(f"must be less than block_window ({self.block_window})", key="settle_margin")
        if self.checkpoint_every < 1 or self.idle_timeout < 1:
            raise ConfigError("checkpoint_every and idle_timeout must be at least 1")


@dataclass(frozen=True, slots=True)
class SettlementPolicy:
    """How settlements reach the bank: nothing the network does ends one, only the bank's answer."""

    answer_timeout: float = 5.0
    attempts: int = field(default=3, metadata={"min": 1})
    retry_first: float = 1.0
    retry_cap: float = 60.0
    urgent_cap: float = 5.0
    close_wait: float = 15.0
    in_flight: int = field(default=32, metadata={"min": 1})

    def __post_init__(self) -> None:
        if self.answer_timeout <= 0 or self.attempts < 1 or self.close_wait < 0 or self.in_flight < 1:
            raise ConfigError("answer_timeout must be > 0, attempts and in_flight >= 1, close_wait >= 0")
        if not 0 < self.retry_first <= self.retry_cap:
            raise ConfigError(f"must be more than 0 and at most retry_cap ({self.retry_cap})", key="retry_first")
        if self.urgent_cap <= 0:
            raise ConfigError("must be more than 0", key="urgent_cap")


@dataclass(frozen=True, slots=True)
class VendorConfig:
    """A vendor's whole policy."""

    pricing: Pricing = field(default_factory=Pricing)
    session: SessionPolicy = field(default_factory=SessionPolicy)
    settlement: SettlementPolicy = field(default_factory=SettlementPolicy)

    @classmethod
    def from_dict(cls, data: dict[str, object], file: Path | None = None) -> VendorConfig:
        """A config from parsed TOML (a whole ``vendor.toml``); unknown tables and keys are refused."""
        return build(VendorFile, data, file=file, base=file.parent if file else None).config

    @classmethod
    def load(cls, path: Path, category: str | None = None) -> VendorConfig:
        """Read a vendor.toml; with ``category`` (the certificate's), check it as :meth:`for_category` does."""
        data = read_toml(path, "a vendor.toml")
        config = cls.from_dict(data, path)
        if category is None:
            return config
        written = isinstance(data.get("pricing"), dict) and "service" in data["pricing"]
        try:
            return config.for_category(category, written=written)
        except ConfigError as exc:
            raise exc.located(path) from None

    def for_category(self, category: str, *, written: bool = True) -> VendorConfig:
        """This config for a vendor the bank enrolled for ``category``.

        A ``service`` left out (``written=False``) becomes the category; another one is refused:
        wallets judge the certificate's category, so an offer naming another would mislead the
        person reading it and the vendor's own records.
        """
        if not written:
            return replace(self, pricing=replace(self.pricing, service=category))
        if self.pricing.service != category:
            raise ConfigError(f"{self.pricing.service!r}, but the vendor is enrolled for {category!r}", table="pricing",
                              key="service", hint=f'write service = "{category}", or enrol the vendor for '
                                                  f"{self.pricing.service}")
        return self


@dataclass(frozen=True, slots=True)
class VendorFile:
    """The whole of a ``vendor.toml``: the device's settings at the top (all optional: the command
    line and the environment may give them) and the policy tables."""

    credentials: Path | None = None
    broker: str | None = None
    coap_host: str | None = None
    coap_port: int | None = field(default=None, metadata={"max": 65535})  # 0: any free port
    data: Path | None = None
    tls: Path | None = None
    pricing: Pricing = field(default_factory=Pricing)
    session: SessionPolicy = field(default_factory=SessionPolicy)
    settlement: SettlementPolicy = field(default_factory=SettlementPolicy)

    @property
    def config(self) -> VendorConfig:
        """The policy tables, as the vendor agent takes them."""
        return VendorConfig(pricing=self.pricing, session=self.session, settlement=self.settlement)


def certified_category(cert: bytes) -> str:
    """The category in the vendor's own certificate (read, not verified: it is our own bundle)."""
    try:
        return CertificateBody.decode(cose.decode_sign1(cert).payload).category
    except ProtocolError as exc:
        raise ConfigError(f"the certificate does not decode: {exc.message}", key="cert") from exc
