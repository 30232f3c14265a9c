"""What stops a user command, and the one table from errors to exit statuses.

::

    UserError                   (abstract)
    ├── UsageError           2  a wrong argument or file: nothing was spent
    │   ├── WalletBusy       2  another process holds this wallet
    │   └── NoWallet         2  a reading command on a path that holds no wallet
    ├── PolicyRefusal        3  the policy said no (or no coin fits): the wallet is unchanged
    ├── Refused              4  the bank or a vendor refused, said in the words of the command
    ├── VendorUnreachable    5  the vendor did not answer in time (CoAP errors translated here)
    └── PaymentIncomplete 3/4/5 a session ran but stopped early; the status is its Stop's

Errors of other layers are mapped in :func:`exit_status` too: a refusal by the bank or a vendor
(:class:`~m2mpay.protocol.errors.RemoteProtocolError`) is 4, except ``unavailable`` (5); the bank's
MQTT transport failing (:class:`~m2mpay.agents.mqtt.TransportError`) is 5; an interrupt is 130; a bad
policy or configuration file is 2; anything else is a bug: 70.
"""

from __future__ import annotations

from pathlib import Path

from m2mpay.protocol.errors import ErrorCode, RemoteProtocolError

from ..mqtt import TransportError
from ..policy.config import PolicyError
from ..policy.engine import Decision
from ..reach import BrokerRefused
from .outcome import PaymentResult

__all__ = ["EXIT", "NoWallet", "PaymentIncomplete", "PolicyRefusal", "Refused", "UsageError", "UserError",
           "VendorUnreachable", "WalletBusy", "describe", "exit_status"]

EXIT = {"usage": 2, "policy": 3, "refused": 4, "unreachable": 5, "internal": 70, "interrupted": 130}


class UserError(Exception):
    """Base of the user device's own errors. Abstract: raise a subclass."""

    status: int = EXIT["internal"]


class UsageError(UserError):
    """A wrong argument or file; nothing was spent."""

    status = EXIT["usage"]


class WalletBusy(UsageError):
    """Another process holds the wallet: one process per wallet keeps budgets and coins exact."""


class NoWallet(UsageError):
    """A command that only reads a wallet was pointed at a path holding none (a typo, most
    likely): said so rather than shown as an empty wallet, and nothing is created there."""

    def __init__(self, directory: Path) -> None:
        super().__init__(f"user: no wallet at {directory} (user init creates one)")
        self.directory = directory


class PolicyRefusal(UserError):
    """The policy said no; the wallet is unchanged."""

    status = EXIT["policy"]

    def __init__(self, decision: Decision) -> None:
        super().__init__(decision.message)
        self.decision = decision


class Refused(UserError):
    """The bank or a vendor refused a request (the peer's refusal is the cause)."""

    status = EXIT["refused"]


class VendorUnreachable(UserError):
    """The vendor did not answer in time, or the network said it cannot be reached."""

    status = EXIT["unreachable"]


class PaymentIncomplete(UserError):
    """A session ran but did not deliver every unit asked for."""

    def __init__(self, result: PaymentResult) -> None:
        super().__init__(result.why())
        self.result = result
        self.status = result.stop.exit_status


_HINTS = {
    "no_coin": "; withdraw coins with 'm2mpay user withdraw' ('m2mpay user status' shows what the wallet holds)",
}
"""What the user can do about a refusal, said after it."""


def exit_status(exc: BaseException) -> int:
    """The exit status for an error that ended a user command."""
    if isinstance(exc, UserError):
        return exc.status
    if isinstance(exc, KeyboardInterrupt):
        return EXIT["interrupted"]
    if isinstance(exc, RemoteProtocolError):
        return EXIT["unreachable"] if exc.code is ErrorCode.UNAVAILABLE else EXIT["refused"]
    if isinstance(exc, TransportError):
        return EXIT["unreachable"]
    if isinstance(exc, (PolicyError, FileNotFoundError, ValueError, KeyError)):
        return EXIT["usage"]
    return EXIT["internal"]


def describe(exc: BaseException) -> str:
    """One line for the user about an error that ended a command."""
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    if isinstance(exc, PolicyRefusal):
        return f"refused by policy: {exc.decision.reason}: {exc.decision.message}{_HINTS.get(exc.decision.reason, '')}"
    if isinstance(exc, RemoteProtocolError):
        return f"refused: {exc.code.wire}: {exc.message}"
    if isinstance(exc, BrokerRefused):  # says itself what refused what
        return str(exc)
    if isinstance(exc, TransportError):
        return f"bank unreachable: {exc}"
    if isinstance(exc, VendorUnreachable):
        return f"vendor unreachable: {exc}"
    if isinstance(exc, PaymentIncomplete):
        return f"payment incomplete: {exc}"
    if isinstance(exc, UserError):
        return str(exc)
    if exit_status(exc) == EXIT["usage"]:
        return f"{type(exc).__name__}: {exc}" if isinstance(exc, KeyError) else str(exc)
    return f"internal error: {type(exc).__name__}: {exc}"
