"""What units of service cost in tokens: one rule, shared by the vendor and the wallet.

An offer's price is money: minor units of the keysets' currency per unit of service. A token of a
coin is worth that coin's ``M / n`` minor units, so the same service costs fewer tokens of a coin
of larger tokens, never more money (except for rounding up to a whole token)::

    tokens_owed(units, price, token_value) = max(1, ceil(units × price / token_value))

The blocking token is the first token of every session and counts toward what is owed: a session
owes at least that one token, and 2 units at price 2 with tokens of 1 are 4 tokens, not 5. The
vendor asks for ``tokens_owed(units metered so far) − tokens paid`` after each unit; the wallet
pays ``tokens_owed(units it buys)`` in all. Integer arithmetic only: no float rounds a large price.
"""

from __future__ import annotations

from ..errors import LocalProtocolError

__all__ = ["tokens_owed", "units_paid"]


def _check(price: int, token_value: int) -> None:
    if price < 1 or token_value < 1:
        raise LocalProtocolError("a price and a token value are at least one minor unit")


def tokens_owed(units: int, price: int, token_value: int) -> int:
    """Tokens owed for ``units`` units at ``price`` (money per unit), paid in tokens worth ``token_value``.

    The money rounded up to whole tokens, and at least the blocking token.
    """
    _check(price, token_value)
    if units < 0:
        raise LocalProtocolError("units of service are not negative")
    return max(1, -(-units * price // token_value))


def units_paid(tokens: int, price: int, token_value: int) -> int:
    """Whole units of service ``tokens`` tokens pay for: the most ``u`` with ``tokens_owed(u) <= tokens``."""
    _check(price, token_value)
    return max(tokens, 0) * token_value // price
