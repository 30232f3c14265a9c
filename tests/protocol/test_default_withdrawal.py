"""Which keyset a wallet withdraws from when not told: the cheapest coin that is not change."""

from __future__ import annotations

import hashlib
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from m2mpay.protocol.messages import KeysetInfo, keyset_id
from m2mpay.protocol.rules.keyring import default_withdrawal, is_change


def _keyset(value: int, n: int, spend_until: int = 10, salt: str = "") -> KeysetInfo:
    # The rule reads values, token counts, dates and ids only: a stand-in key keeps the tests quick.
    key = hashlib.sha256(f"{value}/{n}/{salt}".encode()).digest() * 7
    return KeysetInfo(id=keyset_id(value, n, "EUR", 0, spend_until, key), value=value, n=n, currency="EUR",
                      withdraw_until=0, spend_until=spend_until, public_key=key)


CHANGE = [_keyset(1 << i, 1 << i) for i in range(10)]
"""What ``bank init`` offers for exchanges: 1, 2, 4 … 512 tokens of 1."""


def _pick(*keysets: KeysetInfo) -> tuple[int, int] | None:
    chosen = default_withdrawal(keysets)
    return None if chosen is None else (chosen.value, chosen.n)


def test_change_is_never_the_default_while_a_coin_to_pay_with_is_open() -> None:
    """A bank's cheapest keyset (one token) would leave a wallet paying a coin per token."""
    assert _pick(_keyset(100, 100), _keyset(1000, 1000), *CHANGE) == (100, 100)
    assert _pick(*CHANGE, _keyset(1000, 1000)) == (1000, 1000)  # the only one left once the 100s are retired
    assert _pick(_keyset(1000, 100), _keyset(100, 100)) == (100, 100)  # the value decides, not the token value


def test_only_change_open_takes_the_cheapest_change() -> None:
    assert _pick(*reversed(CHANGE)) == (1, 1)
    assert _pick(_keyset(512, 512), _keyset(64, 64)) == (64, 64)


def test_nothing_open_is_none() -> None:
    assert default_withdrawal([]) is None
    assert default_withdrawal(iter(())) is None


@pytest.mark.parametrize("n, change", [(1, True), (2, True), (512, True), (1 << 16, True), (3, False),
                                       (100, False), (1000, False), ((1 << 16) - 1, False)])
def test_change_is_a_power_of_two_tokens(n: int, change: bool) -> None:
    assert is_change(_keyset(n, n)) is change


def test_equal_values_go_to_the_longest_lived_then_the_lowest_id() -> None:
    short, long_ = _keyset(100, 100, spend_until=10), _keyset(100, 100, spend_until=20)
    assert default_withdrawal([short, long_]) is long_
    assert default_withdrawal([long_, short]) is long_
    twins = [_keyset(100, 100, salt=str(i)) for i in range(5)]
    assert default_withdrawal(twins) is min(twins, key=lambda k: k.id)


_TOKENS = st.one_of(st.integers(0, 11).map(lambda i: 1 << i), st.integers(1, 2048))
_SETS = st.lists(st.builds(lambda tv, n, spend_until, salt: _keyset(tv * n, n, spend_until, salt),
                           st.integers(1, 10), _TOKENS, st.integers(1, 5), st.sampled_from("ab")), max_size=12)
"""Token values 1 to 10, change and other token counts alike, few dates: ties happen."""


@given(keysets=_SETS, seed=st.randoms())
def test_every_wallet_picks_the_same_keyset_whatever_the_order(keysets: list[KeysetInfo], seed: random.Random) -> None:
    shuffled = list(keysets)
    seed.shuffle(shuffled)
    assert default_withdrawal(shuffled) == default_withdrawal(keysets)


@given(keysets=_SETS)
def test_the_pick_is_the_cheapest_of_its_kind(keysets: list[KeysetInfo]) -> None:
    chosen = default_withdrawal(keysets)
    if chosen is None:
        assert keysets == []
        return
    to_pay = [k for k in keysets if not is_change(k)]
    assert is_change(chosen) is (not to_pay)
    assert chosen.value == min(k.value for k in (to_pay or keysets))
