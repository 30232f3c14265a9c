"""How a payment ended: the units delivered, the money moved, and why it stopped."""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["PaymentResult", "Stop"]


class Stop(enum.Enum):
    """Why a payment ended. The value is ``(code, exit status of `user pay`)``."""

    COMPLETE = ("complete", 0)
    POLICY = ("policy", 3)
    """The policy refused the next tokens (its reason is in the result's ``detail``)."""
    COIN_EXHAUSTED = ("coin_exhausted", 3)
    """The coin ran out before every unit was paid for."""
    VENDOR_STOPPED = ("vendor_stopped", 4)
    """The vendor refused a token, closed the session or ended the observation."""
    VENDOR_IDLE = ("vendor_idle", 4)
    """The vendor asked for nothing for the policy's ``max_idle``."""
    VENDOR_UNREACHABLE = ("vendor_unreachable", 5)
    """A token or a notification got no answer in time."""
    DEADLINE = ("deadline", 5)
    """The policy's ``max_duration`` (or the vendor's ``T``) passed."""

    @property
    def code(self) -> str:
        """The stable code, as in the decision log."""
        return self.value[0]

    @property
    def exit_status(self) -> int:
        """What ``m2mpay user pay`` exits with when a payment ends this way."""
        return self.value[1]


@dataclass(frozen=True, slots=True)
class PaymentResult:
    """One payment session, from the blocking token to the close."""

    vendor: str
    asked: int
    """Units asked for."""
    delivered: int
    """Units paid for in full by the tokens the vendor acknowledged, the blocking token included."""
    tokens: int
    """Tokens that left in this session, the blocking token and any unacknowledged one included."""
    spent: int
    """Money those tokens moved: tokens times the token value of the coin paid with."""
    credited: int | None
    """Money the vendor's signed receipt says the bank credited; ``None`` when the close failed or
    its receipt did not verify."""
    stop: Stop
    detail: str = ""

    @property
    def complete(self) -> bool:
        """Every unit asked for was delivered."""
        return self.stop is Stop.COMPLETE

    def summary(self) -> str:
        """One line for the user."""
        credited = "unconfirmed" if self.credited is None else str(self.credited)
        return f"paid {self.vendor} {self.tokens} token(s); credited {credited}"

    def why(self) -> str:
        """One line saying what was delivered and why the payment stopped."""
        because = f": {self.detail}" if self.detail else ""
        return f"{self.delivered} of {self.asked} unit(s) delivered; stopped: {self.stop.code}{because}"
