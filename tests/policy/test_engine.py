"""Table-driven tests of the policy engine: no I/O, every decision has its reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from m2mpay.agents.policy.config import PolicyConfig, PolicyError
from m2mpay.agents.policy.engine import CoinView, OfferView, PolicyEngine, Spend

NOW = 1_800_000_000
POLICY = PolicyConfig.from_dict({
    "budget": {"per_hour": 500, "per_day": 1000, "per_session": 200},
    "vendors": {"deny": ["shady"], "max_per_day": 600},
    "categories": {"allow": ["parking", "ev"], "max_per_day": 800},
    "price": {"max_per_unit": 10, "per_category": {"parking": 5}},
    "deadline": {"max_ahead": 3600, "clock_skew": 30},
    "refill": {"below": 200, "coins": 2, "daily_cap": 300},
})


def offer(vendor: str = "meter", category: str = "parking", price: int = 1, token_value: int = 1,
          deadline: int = NOW + 600) -> OfferView:
    return OfferView(vendor=vendor, category=category, price=price, token_value=token_value, deadline=deadline)


OFFER_CASES = [
    # (name, offer, units, history, allowed, reason)
    ("plain", offer(), 10, [], True, "within_policy"),
    ("denied vendor", offer(vendor="shady"), 1, [], False, "vendor_denied"),
    ("category not allowed", offer(category="vending"), 1, [], False, "category_denied"),
    ("price over category ceiling", offer(price=6), 1, [], False, "price_too_high"),
    ("price within default ceiling", offer(category="ev", price=6), 1, [], True, "within_policy"),
    ("price ceiling is money, whatever the coin", offer(price=5, token_value=100), 1, [], True, "within_policy"),
    ("a coin's token rounds the session up", offer(price=1, token_value=201), 1, [], False, "session_cap"),
    ("a coin's token within the cap", offer(price=1, token_value=200), 1, [], True, "within_policy"),
    ("deadline too far", offer(deadline=NOW + 4000), 1, [], False, "deadline_too_far"),
    ("deadline within skew", offer(deadline=NOW + 3620), 1, [], True, "within_policy"),
    ("deadline passed", offer(deadline=NOW + 10), 1, [], False, "deadline_passed"),
    ("session cap", offer(), 201, [], False, "session_cap"),
    ("session cap, blocking token included", offer(), 200, [], True, "within_policy"),
    ("hourly budget", offer(), 100, [Spend(NOW - 60, "x", "ev", 450)], False, "hourly_budget"),
    ("hour passed", offer(), 100, [Spend(NOW - 3601, "x", "ev", 450)], True, "within_policy"),
    ("daily budget", offer(), 100, [Spend(NOW - 7200, "x", "ev", 950)], False, "daily_budget"),
    ("vendor limit", offer(), 100, [Spend(NOW - 7200, "meter", "ev", 550)], False, "vendor_limit"),
    ("category limit", offer(), 100, [Spend(NOW - 7200, "a", "parking", 400), Spend(NOW - 9000, "b", "parking", 350)],
     False, "category_limit"),
]


@pytest.mark.parametrize(("name", "view", "units", "history", "allowed", "reason"), OFFER_CASES,
                         ids=[c[0] for c in OFFER_CASES])
def test_check_offer(name: str, view: OfferView, units: int, history: list[Spend], allowed: bool, reason: str) -> None:
    decision = PolicyEngine(POLICY, history).check_offer(view, units, NOW)
    assert (decision.allowed, decision.reason) == (allowed, reason), decision.message
    line = json.loads(decision.to_json("offer", NOW))
    assert line["reason"] == reason and line["allowed"] is allowed and line["ts"] == NOW


def test_choose_cheapest_allowed_offer() -> None:
    offers = [offer("a", price=4), offer("shady", price=1), offer("b", price=2), offer("c", price=9)]
    best, decision = PolicyEngine(POLICY).choose_offer(offers, 5, NOW)
    assert best is not None and best.vendor == "b" and decision.reason == "cheapest_allowed"
    none, refused = PolicyEngine(POLICY).choose_offer([offer("shady"), offer(price=50)], 5, NOW)
    assert none is None and refused.details["refused"] == ["price_too_high", "vendor_denied"]


def coin(tip: int, remaining: int, n: int = 100, vendors: frozenset[str] = frozenset()) -> CoinView:
    return CoinView(tip=bytes([tip]) * 32, remaining=remaining, token_value=1, n=n, position=remaining,
                    vendors=vendors)


WALLET = [coin(1, 100), coin(2, 30, vendors=frozenset({"other"})), coin(3, 12, vendors=frozenset({"meter"})),
          coin(4, 0)]
COIN_CASES = [
    # (strategy, amount, expected tip byte or None)
    ("best_fit", 10, 3),  # smallest coin that covers
    ("best_fit", 50, 1),
    ("best_fit", 500, 1),  # nothing covers: the largest
    ("largest_first", 10, 1),
    ("drain_partial", 50, 3),  # partly spent coins first, smallest first
    ("fresh_per_vendor", 20, 1),  # coin 2 was shown to another vendor, coin 3 covers too little
    ("fresh_per_vendor", 10, 3),  # coin 3 was shown to this same vendor only
]


@pytest.mark.parametrize(("strategy", "amount", "expected"), COIN_CASES,
                         ids=[f"{s}-{a}" for s, a, _ in COIN_CASES])
def test_select_coin(strategy: str, amount: int, expected: int) -> None:
    engine = PolicyEngine(PolicyConfig.from_dict({"coins": {"strategy": strategy}}))
    chosen, decision = engine.select_coin(WALLET, amount, 1, "meter")  # a unit is a token here
    assert chosen is not None and chosen.tip[0] == expected and decision.reason == strategy


def test_no_usable_coin() -> None:
    chosen, decision = PolicyEngine(POLICY).select_coin([coin(4, 0)], 1, 1, "meter")
    assert chosen is None and not decision.allowed and decision.reason == "no_coin"


REFILL_CASES = [
    # (wallet value, online, refilled today, expected count, reason)
    (500, True, 0, 0, "enough_value"),
    (100, False, 0, 0, "offline"),
    (100, True, 0, 2, "refill"),
    (100, True, 200, 1, "refill"),  # the daily cap leaves room for one coin of 100
    (100, True, 300, 0, "refill_cap"),
]


@pytest.mark.parametrize(("value", "online", "today", "count", "reason"), REFILL_CASES,
                         ids=[r[4] + f"-{r[2]}" for r in REFILL_CASES])
def test_refill(value: int, online: bool, today: int, count: int, reason: str) -> None:
    got, decision = PolicyEngine(POLICY).refill(value, 100, online, today)
    assert (got, decision.reason) == (count, reason)


@pytest.mark.parametrize("text", [
    '[budget]\nper_hour = "lots"\n', '[budget]\nperhour = 1\n', '[coins]\nstrategy = "random"\n',
    '[vendors]\ndeny = "shady"\n', '[price]\nper_category = { parking = -1 }\n', '[nonsense]\n',
    '[budget]\nper_day = -5\n', '[budget]\nper_day = true\n',
], ids=["wrong-type", "unknown-key", "unknown-strategy", "list-expected", "negative-price", "unknown-table",
        "negative", "bool"])
def test_policy_file_refusals(tmp_path: Path, text: str) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(text)
    with pytest.raises(PolicyError):
        PolicyConfig.load(path)


def test_money_judged_in_the_coin_paid_with() -> None:
    """7 units at 3 are 21 minor units: 21 tokens of 1, or 3 tokens of 10 (30: whole tokens, rounded up)."""
    engine = PolicyEngine(PolicyConfig.from_dict({"price": {"max_per_unit": 3}, "budget": {"per_session": 25}}))
    assert engine.check_offer(offer(price=3, token_value=1), 7, NOW).allowed
    refused = engine.check_offer(offer(price=3, token_value=10), 7, NOW)
    assert (refused.reason, refused.details["total"]) == ("session_cap", 30)
    assert engine.check_offer(offer(price=3, token_value=10), 6, NOW).allowed  # 18: 2 tokens of 10, 20
    dear = engine.check_offer(offer(price=4, token_value=1), 1, NOW)  # the ceiling is money, for any coin
    assert (dear.reason, dear.details["unit_price"]) == ("price_too_high", 4)


def test_coin_covers_the_session_in_its_own_tokens() -> None:
    """A coin covers a session if it holds the session's tokens *of its own value*."""
    tens = CoinView(tip=b"\x0a" * 32, remaining=50, token_value=10, n=100, position=5)
    ones = CoinView(tip=b"\x01" * 32, remaining=30, token_value=1, n=100, position=30)
    chosen, decision = PolicyEngine(POLICY).select_coin([tens, ones], 8, 5, "meter")  # 40: 4 tens or 40 ones
    assert chosen is tens and decision.details["tokens"] == 4


def test_recorded_spending_counts_at_once_and_unlimited_lifts_a_limit() -> None:
    engine = PolicyEngine(PolicyConfig.from_dict({"budget": {"per_hour": 10}}))
    assert engine.may_pay(offer(), 0, 10, NOW).allowed
    engine.record(Spend(NOW, "meter", "parking", 10))  # left without a receipt: still counted
    assert engine.may_pay(offer(), 0, 1, NOW).reason == "hourly_budget"
    free = PolicyEngine(PolicyConfig.from_dict({"budget": {"per_hour": "unlimited", "per_day": "unlimited"}}),
                        [Spend(NOW, "meter", "parking", 10**6)])
    assert free.may_pay(offer(), 0, 1, NOW).reason == "vendor_limit"  # the budgets lifted, the vendor's limit not
