"""What ``user pay`` shows while a payment runs, built from the decisions the wallet logs.

On a terminal one line is redrawn in place: units paid for, tokens sent, money and the time left
under the policy's ``max_duration``. Anywhere else (a pipe, a file, a service's journal) each
event is one line, flushed at once, so a reader follows the payment as it happens. The figures
are the wallet's own: tokens count from the moment they may leave (written ahead), the blocking
token included, as the decision log counts them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TextIO

from m2mpay.protocol.rules.pricing import units_paid

from ..money import format_money
from ..policy.engine import Decision

__all__ = ["PaymentProgress", "RunProgress"]

_CLEAR = "\r\x1b[K"  # back to the start of the line, erase it


class PaymentProgress:
    """Called with each ``(action, decision)`` of one ``user pay``; writes to ``out``."""

    def __init__(self, out: TextIO, units: int, max_duration: float, currency: str | None, *,
                 terminal: bool, clock: Callable[[], float] = time.monotonic) -> None:
        self.out = out
        self.units = units
        self.max_duration = max_duration
        self.currency = currency
        self.terminal = terminal
        self.clock = clock
        self.started = clock()
        self.vendor = ""
        self.price = 0
        self.token_value = 0
        self.tokens = 0
        self.owed = 0
        self.money = 0
        self._drawn = False

    def _money(self, minor: int) -> str:
        return format_money(minor, self.currency) if self.currency else f"{minor} (minor units)"

    def _figures(self) -> str:
        left = max(0, round(self.max_duration - (self.clock() - self.started)))
        known = self.price > 0 and self.token_value > 0  # both come before the first token is paid
        delivered = min(self.units, units_paid(self.tokens, self.price, self.token_value)) if known else 0
        return (f"{delivered}/{self.units} unit(s), {self.tokens}/{self.owed} token(s), {self._money(self.money)}, "
                f"{left} s left")

    def _event(self, line: str) -> None:
        if self.terminal:
            self.out.write(f"{_CLEAR}{self.vendor}: {self._figures()}")
            self._drawn = True
        else:
            self.out.write(line + "\n")
        self.out.flush()

    def __call__(self, action: str, decision: Decision) -> None:
        """One decision of the payment (``offer``, ``coin``, ``pay``, ``close``)."""
        details = decision.details
        if action == "offer" and decision.allowed:
            self.vendor = str(details.get("vendor", ""))
            self.price = int(details.get("unit_price", 0))
            self._event(f"offer: {self.vendor}, {self.price} per unit; {self.units} unit(s) within policy")
        elif action == "coin" and decision.allowed:
            self.token_value = int(details["token_value"])
            self.owed = int(details["tokens"])
            self.tokens, self.money = 1, self.token_value  # the blocking token is the first one paid
            self._event(f"session: {self.owed} token(s) of {self._money(self.token_value)} owed; "
                        f"blocking token sent: {self._figures()}")
        elif action == "pay" and decision.allowed and self.token_value:
            amount = int(details["amount"])
            self.tokens += amount // self.token_value
            self.money += amount
            self._event(f"paid {amount // self.token_value} token(s): {self._figures()}")
        elif action == "pay":
            self._event(f"policy stopped the payment: {decision.reason}: {decision.message}")
        elif action == "close":
            self.finish()
            if not self.terminal:
                self.out.write(f"closed: {decision.message}\n")
                self.out.flush()

    def finish(self) -> None:
        """Erase the terminal's progress line, so what follows starts on a clean line."""
        if self._drawn:
            self.out.write(_CLEAR)
            self.out.flush()
            self._drawn = False


class RunProgress:
    """``user run``'s progress: each payment as :class:`PaymentProgress` shows it, and the agent's
    other decisions (``refill``, ``choose``) as one line each."""

    def __init__(self, out: TextIO, units: int, max_duration: float, currency: str | None, *,
                 terminal: bool) -> None:
        self.out = out
        self.terminal = terminal
        self.units, self.max_duration, self.currency = units, max_duration, currency
        self.payment = self._new()

    def _new(self) -> PaymentProgress:
        return PaymentProgress(self.out, self.units, self.max_duration, self.currency, terminal=self.terminal)

    def __call__(self, action: str, decision: Decision) -> None:
        """One decision of the agent."""
        if action in ("offer", "coin", "pay", "close"):
            if action == "offer":
                self.payment.finish()
                self.payment = self._new()  # a new payment: its own figures and clock
            self.payment(action, decision)
            return
        self.payment.finish()
        self.out.write(f"{action}: {decision.reason}: {decision.message}\n")
        self.out.flush()
