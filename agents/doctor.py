"""``m2mpay doctor``: can this device reach its bank, and does it trust what it hears?

Each check prints one line, ``ok`` or ``FAIL`` with the reason and what to do; the command exits
0 when every check passed and 5 (unreachable) otherwise. The checks, in order, each only if the
one before passed: the credentials file reads; the broker accepts a connection (over TLS with
``--tls``); the bank's retained keys announcement arrives; it verifies under the CA fingerprint
of the credentials (delegation, signature, validity now); its keysets are still spendable; and
this device's clock is not behind the bank's (an announcement signed "in the future").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from m2mpay.protocol import cose
from m2mpay.protocol.certificates import verify_announcement
from m2mpay.protocol.errors import ProtocolError
from m2mpay.protocol.messages import KeyDelegation, KeysAnnouncement

from .mqtt import BankClient, TlsLogin, TransportError

__all__ = ["add_doctor_command", "run_doctor"]

_SKEW_S = 60


@dataclass
class Report:
    """The lines said so far and whether all were ``ok``."""

    lines: list[str] = field(default_factory=list)
    ok: bool = True

    def check(self, passed: bool, what: str, detail: str) -> bool:
        self.lines.append(f"{'ok  ' if passed else 'FAIL'}  {what}: {detail}")
        self.ok = self.ok and passed
        return passed


def _credentials(path: Path) -> tuple[str, str, str]:
    """``(name, bank, CA fingerprint)`` of a user's or a vendor's credentials file."""
    data = json.loads(path.read_text())
    name = data.get("vendor") or data["account"]
    return str(name), str(data["bank"]), str(data["ca_fingerprint"])


def _fresh(announcement: KeysAnnouncement, now: int, report: Report) -> None:
    delegation = KeyDelegation.decode(cose.decode_sign1(announcement.delegation).payload)
    days = (delegation.exp - now) // 86400
    report.check(days >= 30, "announcement key", f"certified for {days} more days" if days >= 30 else
                 f"certified for only {days} more days: the operator must run 'm2mpay bank delegate'")
    spendable = [k for k in announcement.keysets if k.spend_until > now]
    report.check(bool(spendable), "keysets", f"{len(spendable)} of {len(announcement.keysets)} still spendable"
                 if spendable else "none still spendable: the bank must add a keyset")
    ahead = announcement.issued - now
    report.check(ahead <= _SKEW_S, "clock", f"the announcement was signed {-ahead} s ago" if ahead <= _SKEW_S else
                 f"the bank signed its announcement {ahead} s after this clock's now: set this device's time")


async def run_doctor(credentials: Path, broker: str, tls_dir: Path | None, now: int,
                     timeout: float = 5.0) -> Report:
    """Run every check; the report says what passed."""
    report = Report()
    try:
        name, bank, fingerprint = _credentials(credentials)
    except (OSError, ValueError, KeyError) as exc:
        report.check(False, "credentials", f"{credentials} cannot be read as credentials ({exc})")
        return report
    report.check(True, "credentials", f"{name} at bank {bank}")
    tls = TlsLogin.from_dir(tls_dir, name) if tls_dir is not None else None
    try:
        async with BankClient(broker, bank, f"doctor-{uuid.uuid4().hex[:8]}", timeout=timeout, tls=tls) as client:
            report.check(True, "broker", f"{broker} accepts this device{' over TLS' if tls else ''}")
            raw = await client.keys(timeout=timeout)
    except TransportError as exc:
        reached = any(line.startswith("ok    broker") for line in report.lines)
        what, hint = (("bank", "is bank serve running for this bank?") if reached else
                      ("broker", "is the broker running, and the URL (and --tls) right?"))
        report.check(False, what, f"{exc} ({hint})")
        return report
    except ValueError as exc:  # a malformed URL
        report.check(False, "broker", str(exc))
        return report
    try:
        announcement = verify_announcement(raw, fingerprint, now)
    except ProtocolError as exc:
        report.check(False, "announcement", f"{exc.message} (a bank with another CA, or keys to renew: "
                                            "'m2mpay bank delegate')")
        return report
    report.check(True, "announcement", f"signed by bank {announcement.bank}'s delegated key, valid now")
    _fresh(announcement, now, report)
    return report


def _doctor(args: argparse.Namespace) -> int:
    report = asyncio.run(run_doctor(args.credentials, args.broker, args.tls, int(time.time()), args.timeout))
    for line in report.lines:
        print(line, flush=True)
    return 0 if report.ok else 5


def add_doctor_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``m2mpay doctor --credentials FILE --broker URL [--tls DIR]``."""
    doctor = commands.add_parser("doctor", help="check that this device reaches its bank and trusts its keys")
    doctor.add_argument("--credentials", type=Path, required=True,
                        help="the device's credentials file (from bank account open or bank vendor enroll)")
    doctor.add_argument("--broker", required=True, help="mqtt://HOST:PORT or mqtts://HOST:PORT")
    doctor.add_argument("--tls", type=Path, help="PKI directory with ca.crt and this device's NAME.crt/NAME.key")
    doctor.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for each answer")
    doctor.set_defaults(handler=_doctor)
