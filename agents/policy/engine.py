"""The spending policy engine: pure decisions with reasons, no I/O.

The wallet asks before it spends: which offer to take (:meth:`PolicyEngine.choose_offer`), whether
an offer is acceptable at all (:meth:`check_offer`), which coin to block for it
(:meth:`select_coin`), whether to pay the next tokens a vendor asks for (:meth:`may_pay`), and
whether to refill (:meth:`refill`). Past spending comes in as a list of :class:`Spend`, and what
the wallet spends meanwhile is added with :meth:`record`; every answer is a :class:`Decision`
with a stable ``reason`` code, a human sentence and the figures behind it, ready to append to
the decision log as one JSON line.

Money is judged in the coin actually paid with. An offer's price is money per unit, so the price
ceiling is the same for every coin; what a session costs is its tokens
(:func:`~m2mpay.protocol.rules.pricing.tokens_owed`, rounded up to whole tokens of the coin, the blocking
token included) times that coin's token value, which an :class:`OfferView` carries.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from m2mpay.protocol.rules.pricing import tokens_owed

from .config import PolicyConfig

__all__ = ["CoinView", "Decision", "OfferView", "PolicyEngine", "Spend"]

HOUR, DAY = 3600, 86400


@dataclass(frozen=True, slots=True)
class Spend:
    """Money that left the wallet: when, to whom, how much (minor units)."""

    ts: int
    vendor: str
    category: str
    amount: int


@dataclass(frozen=True, slots=True)
class OfferView:
    """What the policy needs to know of a vendor's offer."""

    vendor: str
    category: str
    price: int
    """Money per unit of service (minor units)."""
    token_value: int
    """Minor units per token of the coin this view is judged for."""
    deadline: int

    def tokens(self, units: int) -> int:
        """Tokens of this view's coin a session of ``units`` units costs, the blocking token included."""
        return tokens_owed(units, self.price, self.token_value)

    def cost(self, units: int) -> int:
        """Money a session of ``units`` units moves with this view's coin: whole tokens, rounded up."""
        return self.tokens(units) * self.token_value


@dataclass(frozen=True, slots=True)
class CoinView:
    """What the policy needs to know of a wallet coin."""

    tip: bytes
    remaining: int
    token_value: int
    n: int
    position: int
    vendors: frozenset[str] = frozenset()
    """Vendors this coin has already been shown to."""

    @property
    def fresh(self) -> bool:
        """Never shown to any vendor."""
        return self.position == self.n


@dataclass(frozen=True, slots=True)
class Decision:
    """A policy answer: allowed or not, a stable reason code, a sentence, and the figures."""

    allowed: bool
    reason: str
    message: str
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self, action: str, ts: int) -> str:
        """One line of the decision log."""
        return json.dumps({"ts": ts, "action": action, "allowed": self.allowed, "reason": self.reason,
                           "message": self.message, **self.details}, sort_keys=True, default=str)


def _no(reason: str, message: str, **details: Any) -> Decision:
    return Decision(False, reason, message, details)


def _yes(reason: str, message: str, **details: Any) -> Decision:
    return Decision(True, reason, message, details)


class PolicyEngine:
    """A device's policy over its spending history."""

    def __init__(self, config: PolicyConfig, history: Sequence[Spend] = ()) -> None:
        self.config = config
        self.history = list(history)

    def record(self, spend: Spend) -> None:
        """Count money that has just left the wallet in every later decision."""
        self.history.append(spend)

    def _spent(self, now: int, window: int, *, vendor: str | None = None, category: str | None = None) -> int:
        return sum(s.amount for s in self.history if now - s.ts < window
                   and (vendor is None or s.vendor == vendor) and (category is None or s.category == category))

    def check_offer(self, offer: OfferView, units: int, now: int) -> Decision:
        """Is this vendor, category, price and deadline acceptable for ``units`` units?

        The price (money per unit) is held against the ceiling; the money judged against the
        budgets is the whole session's in the view's coin (:meth:`OfferView.cost`).
        """
        c = self.config
        if offer.vendor in c.vendors.deny or (c.vendors.allow and offer.vendor not in c.vendors.allow):
            return _no("vendor_denied", f"vendor {offer.vendor} is not allowed", vendor=offer.vendor)
        if offer.category in c.categories.deny or (c.categories.allow and offer.category not in c.categories.allow):
            return _no("category_denied", f"category {offer.category} is not allowed", category=offer.category)
        ceiling = c.price.ceiling(offer.category)
        if ceiling is not None and offer.price > ceiling:
            return _no("price_too_high", f"{offer.price} per unit exceeds {ceiling}",
                       unit_price=offer.price, ceiling=ceiling)
        if offer.deadline > now + c.deadline.max_ahead + c.deadline.clock_skew:
            allowed = c.deadline.max_ahead + c.deadline.clock_skew
            return _no("deadline_too_far", f"the vendor would block the coin for {offer.deadline - now} s; the policy "
                       f"allows at most {allowed} s (deadline.max_ahead {c.deadline.max_ahead} + clock_skew "
                       f"{c.deadline.clock_skew})", deadline=offer.deadline, now=now, max_ahead=allowed)
        if offer.deadline <= now + c.deadline.clock_skew:
            return _no("deadline_passed", "the offer's deadline has passed (or our clocks disagree)",
                       deadline=offer.deadline, now=now)
        return self.may_pay(offer, 0, offer.cost(units), now)

    def may_pay(self, offer: OfferView, session_spent: int, amount: int, now: int) -> Decision:
        """May ``amount`` more go to this vendor, ``session_spent`` already having gone in this session?

        A refusal says what was already spent against the limit and what the limit is, in money
        (minor units), so that the one line a user reads tells how far off the payment is.
        """
        c = self.config
        checks = (
            ("session_cap", session_spent, c.budget.per_session, "the cap per session"),
            ("hourly_budget", self._spent(now, HOUR), c.budget.per_hour, "the hourly budget"),
            ("daily_budget", self._spent(now, DAY), c.budget.per_day, "the daily budget"),
            ("vendor_limit", self._spent(now, DAY, vendor=offer.vendor), c.vendors.max_per_day,
             f"the daily limit for vendor {offer.vendor}"),
            ("category_limit", self._spent(now, DAY, category=offer.category), c.categories.max_per_day,
             f"the daily limit for {offer.category}"),
        )
        for reason, spent, limit, what in checks:
            if limit is not None and spent + amount > limit:
                return _no(reason, f"{amount} more would exceed {what}: {spent} spent of {limit} (minor units)",
                           total=spent + amount, spent=spent, limit=limit, vendor=offer.vendor, amount=amount)
        return _yes("within_policy", f"{amount} to {offer.vendor} is within policy", vendor=offer.vendor,
                    amount=amount, unit_price=offer.price)

    def choose_offer(self, offers: Sequence[OfferView], units: int, now: int) -> tuple[OfferView | None, Decision]:
        """The cheapest offer the policy allows (ties: the earlier in the list)."""
        refusals: list[tuple[OfferView, Decision]] = []
        allowed: list[tuple[OfferView, Decision]] = []
        for offer in offers:
            decision = self.check_offer(offer, units, now)
            (allowed if decision.allowed else refusals).append((offer, decision))
        if not allowed:
            reasons = sorted({d.reason for _, d in refusals}) or ["no_offers"]
            return None, _no("no_acceptable_offer", "no offer is acceptable", refused=reasons)
        best = min(allowed, key=lambda pair: pair[0].price)[0]
        return best, _yes("cheapest_allowed", f"{best.vendor} at {best.price} per unit",
                          vendor=best.vendor, unit_price=best.price, candidates=len(offers))

    def select_coin(self, coins: Sequence[CoinView], units: int, price: int,
                    vendor: str) -> tuple[CoinView | None, Decision]:
        """The coin to block for ``units`` units at ``price`` (money per unit) at ``vendor``, under
        the configured strategy.

        The caller passes only coins whose token value the policy accepts for this offer; a coin
        covers the session if it holds the tokens the session costs in that coin's tokens.
        """
        strategy = self.config.coins.strategy
        usable = [c for c in coins if c.remaining > 0]
        if strategy == "fresh_per_vendor":  # a coin shown to another vendor would link the sessions
            usable = [c for c in usable if c.fresh or c.vendors <= {vendor}]
        if not usable:
            return None, _no("no_coin", "no usable coin in the wallet", strategy=strategy)
        covering = [c for c in usable if c.position >= tokens_owed(units, price, c.token_value)]
        if strategy == "largest_first":
            choice = max(usable, key=lambda c: c.remaining)
        elif strategy == "drain_partial":
            partial = [c for c in usable if not c.fresh]
            choice = min(partial or covering or usable, key=lambda c: c.remaining)
        else:  # best_fit, and fresh_per_vendor after filtering
            choice = min(covering, key=lambda c: c.remaining) if covering else max(usable, key=lambda c: c.remaining)
        return choice, _yes(strategy, f"coin {choice.tip.hex()[:8]} with {choice.remaining} left",
                            remaining=choice.remaining, tokens=tokens_owed(units, price, choice.token_value),
                            token_value=choice.token_value)

    def refill(self, wallet_value: int, coin_value: int, online: bool, refilled_today: int) -> tuple[int, Decision]:
        """How many coins to withdraw now (0 when the policy says no).

        ``refilled_today`` is what the wallet withdrew since the start of the device's calendar
        day, as kept on disk: restarts do not reset it, midnight does.
        """
        r = self.config.refill
        if wallet_value >= r.below:
            return 0, _no("enough_value", f"wallet holds {wallet_value}, refill below {r.below}")
        if not online:
            return 0, _no("offline", "refill waits until the bank is reachable")
        if r.daily_cap is None:
            room = r.coins
        elif coin_value:
            room = (r.daily_cap - refilled_today) // coin_value
        else:
            room = 0
        count = min(r.coins, max(room, 0))
        if count <= 0:
            return 0, _no("refill_cap", f"daily refill cap {r.daily_cap} reached", refilled_today=refilled_today)
        return count, _yes("refill", f"withdraw {count} coin(s) of {coin_value}", count=count)
