"""Prices are money: one function of the core says how many tokens a number of units costs.

The vendor asks for what :func:`~m2mpay.protocol.rules.pricing.tokens_owed` says after each metered unit
and the wallet pays exactly that much for the units it buys; the blocking token is the first
token owed. Pure: the vendor's session and the bank's rules back to back, no I/O.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import given
from hypothesis import strategies as st

from m2mpay.protocol.errors import LocalProtocolError
from m2mpay.protocol.rules import wallet
from m2mpay.protocol.rules.pricing import tokens_owed, units_paid
from m2mpay.protocol.rules.vendor import VendorSession

from .flows import authorize, block, make_offer, settle, withdraw
from .world import NOW, LocalBank, make_keyset

OWED = [
    # (units, price in minor units, token value in minor units, tokens owed)
    (2, 2, 1, 4),  # the blocking token counts toward what is owed: 4, not 5
    (1, 1, 1, 1),
    (1, 2, 10, 1),  # rounded up to a whole token
    (5, 2, 10, 1),
    (6, 2, 10, 2),
    (10, 3, 10, 3),
    (0, 7, 1, 1),  # a session owes its blocking token, however little it is used
    (0, 7, 1000, 1),
    (65_536, 1 << 20, 1, 65_536 << 20),  # large values: exact integers, no float rounding
    ((1 << 53) + 1, 1, 1 << 53, 2),
    (3, 1 << 20, 1 << 53, 1),
]


@pytest.mark.parametrize(("units", "price", "token_value", "tokens"), OWED,
                         ids=[f"{u}x{p}/{v}" for u, p, v, _ in OWED])
def test_tokens_owed_is_one_shared_function(units: int, price: int, token_value: int, tokens: int) -> None:
    assert tokens_owed(units, price, token_value) == tokens
    assert units_paid(tokens, price, token_value) >= units  # what is owed pays for every unit
    if units:
        assert units_paid(tokens - 1, price, token_value) < units  # and one token less does not


@pytest.mark.parametrize(("units", "price", "token_value"), [(-1, 1, 1), (1, 0, 1), (1, 1, 0), (1, -2, 1)])
def test_tokens_owed_refuses_what_is_not_a_price(units: int, price: int, token_value: int) -> None:
    with pytest.raises(LocalProtocolError):
        tokens_owed(units, price, token_value)


@given(units=st.integers(0, 1 << 24), price=st.integers(1, 1 << 20), token_value=st.integers(1, 1 << 53))
def test_tokens_owed_rounds_up_to_whole_tokens(units: int, price: int, token_value: int) -> None:
    """The fewest tokens (at least one) whose money covers ``units × price``."""
    owed = tokens_owed(units, price, token_value)
    assert owed >= 1 and owed * token_value >= units * price
    assert owed == 1 or (owed - 1) * token_value < units * price
    assert tokens_owed(units + 1, price, token_value) >= owed  # never cheaper for more


# --- the vendor's meter and the wallet agree --------------------------------------------------

@pytest.fixture(scope="module")
def rsa_keys() -> list[rsa.RSAPrivateKey]:
    return [rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(2)]


@pytest.fixture
def bank(rsa_keys: list[rsa.RSAPrivateKey]) -> Iterator[LocalBank]:
    """Two keysets whose tokens are worth 1 and 10."""
    ones = make_keyset(rsa_keys[0], value=100, n=100)
    tens = make_keyset(rsa_keys[1], value=1000, n=100)
    world = LocalBank(keysets={ones.info.id: ones, tens.info.id: tens})
    try:
        yield world
        world.audit()
    finally:
        world.close()


def _metered(bank: LocalBank, token_value: int, price: int, units: int) -> tuple[int, int]:
    """A session at ``price`` metered ``units`` times, each ask paid as it comes.

    Returns the tokens the session holds and the money the bank credited its vendor.
    """
    keyset = next(k for k, ks in bank.keysets.items() if ks.info.token_value == token_value)
    (wc,) = withdraw(bank, keyset=keyset, seed=token_value * 1000 + price * 10 + units)
    vendor = bank.enroll(f"meter-{token_value}-{price}-{units}", "parking")
    keyring = bank.keyring()
    session = VendorSession(dataclasses.replace(make_offer(vendor, keyring), price=price), keyring, vendor.name)
    wc, request = authorize(bank, wc, session.offer)
    session.blocked(block(bank, vendor, session.open(request, os.urandom(16), NOW), NOW))
    for _ in range(units):
        due = session.due(1, "metered")
        if due.tokens:
            wc, message = wallet.reveal(wc, due.tokens)
            session.pay(message, NOW)
    assert session.owed == 0
    credited = settle(bank, vendor, session).credited
    assert bank.balances[vendor.account] == credited
    return session.paid, credited


@pytest.mark.parametrize(("token_value", "price", "units"), [(1, 2, 2), (1, 3, 5), (10, 2, 1), (10, 2, 6),
                                                              (10, 7, 9), (1, 1, 0)])
def test_vendor_meter_asks_what_the_wallet_pays(bank: LocalBank, token_value: int, price: int, units: int) -> None:
    """After each unit the vendor asks ``tokens_owed(units so far) − paid``; the session ends holding
    exactly what the wallet pays for the units, and the bank credits that many tokens' money."""
    tokens, credited = _metered(bank, token_value, price, units)
    assert tokens == tokens_owed(units, price, token_value)
    assert credited == tokens * token_value


def test_blocking_token_is_the_first_token_owed(bank: LocalBank) -> None:
    """2 units at price 2 with tokens of 1: 4 tokens, not 5 (the blocking token was an extra charge)."""
    assert _metered(bank, 1, 2, 2) == (4, 4)


def test_what_is_owed_never_exceeds_the_coin(bank: LocalBank) -> None:
    """At the highest price an offer carries, one unit owes more tokens than a coin has: the vendor
    asks for what is left on the coin, a number a ``Due`` can carry."""
    (wc,) = withdraw(bank, keyset=next(k for k, ks in bank.keysets.items() if ks.info.token_value == 1))
    vendor = bank.enroll("dear", "parking")
    keyring = bank.keyring()
    session = VendorSession(dataclasses.replace(make_offer(vendor, keyring), price=1 << 20), keyring, vendor.name)
    wc, request = authorize(bank, wc, session.offer)
    session.blocked(block(bank, vendor, session.open(request, os.urandom(16), NOW), NOW))
    assert session.due(1000, "metered").tokens == session.position == 99
