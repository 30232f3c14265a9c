"""Money as people read it: minor units shown with their currency's decimals.

Every amount in m2mpay is an integer of minor units (cents for EUR). A person reading ``1000 EUR``
takes it for a thousand euros; it is ten. Text output therefore shows ``10.00 EUR``; JSON output
keeps the integer, which is exact.
"""

from __future__ import annotations

__all__ = ["decimals", "format_money"]

# ISO 4217 minor-unit exponents that differ from the usual 2.
_EXPONENTS = {
    "BIF": 0, "CLP": 0, "DJF": 0, "GNF": 0, "ISK": 0, "JPY": 0, "KMF": 0, "KRW": 0, "PYG": 0, "RWF": 0,
    "UGX": 0, "UYI": 0, "VND": 0, "VUV": 0, "XAF": 0, "XOF": 0, "XPF": 0,
    "BHD": 3, "IQD": 3, "JOD": 3, "KWD": 3, "LYD": 3, "OMR": 3, "TND": 3,
    "CLF": 4, "UYW": 4,
}


def decimals(currency: str) -> int:
    """Digits after the decimal point for ``currency`` (ISO 4217; 2 when not listed otherwise)."""
    return _EXPONENTS.get(currency.upper(), 2)


def format_money(minor: int, currency: str) -> str:
    """``1000, "EUR"`` → ``"10.00 EUR"``; exact for any integer (no floating point)."""
    places = decimals(currency)
    sign = "-" if minor < 0 else ""
    whole, part = divmod(abs(minor), 10 ** places)
    return f"{sign}{whole}.{part:0{places}d} {currency}" if places else f"{sign}{whole} {currency}"
