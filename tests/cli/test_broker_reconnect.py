"""The broker rule once running: a broker that comes back is reconnected to, one that comes back
refusing our certificate ends the agent at once with one line and exit status 5.

Real processes throughout: ``broker run`` (Mosquitto), ``bank serve``, ``vendor serve`` and the
user's commands. The broker is stopped and started again on the same port and data directory;
refusing is done the operator's way, ``broker pki revoke`` and a restart (Mosquitto reads its CRL
when it starts).
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from m2mpay.broker.launcher import free_port, free_udp_port
from m2mpay.agents.mqtt import TlsLogin
from m2mpay.agents.reach import wait_for_broker
from m2mpay.broker.pki import make_pki, revoke
from tests.waiting import wait_until

from tests.commands import m2mpay
from tests.processes import BROKER_REFUSED, start, stop, wait_for_text

pytestmark = pytest.mark.network

_BANK = "bank-again"


@dataclass
class Running:
    """A broker, a bank and a vendor, each its own process, and how to restart the broker."""

    tmp: Path
    url: str
    port: int
    pki: Path | None
    bank_data: Path
    bank_log: Path
    vendor_log: Path
    coap: str
    processes: dict[str, subprocess.Popen[bytes]]
    restarts: int = 0

    def restart_broker(self) -> None:
        """Stop the broker and start it again on the same port, data and PKI (its CRL read anew)."""
        stop(self.processes["broker"])
        self.restarts += 1
        log = self.tmp / f"broker-{self.restarts}.log"
        self.processes["broker"] = _broker(log, self.tmp, self.port, self.pki)
        wait_for_text(log, "listening")

    def exited(self, role: str, seconds: float = 30.0) -> int:
        """The status ``role`` exited with; fails the test if it is still running after ``seconds``."""
        process = self.processes[role]
        wait_until(lambda: process.poll() is not None, timeout=seconds, what=f"{role} exiting")
        return int(process.returncode)


def _broker(log: Path, tmp: Path, port: int, pki: Path | None) -> subprocess.Popen[bytes]:
    tls = ["--bank", _BANK, "--tls", str(pki)] if pki is not None else []
    return start(log, "broker", "run", "--data", tmp / "mq", "--port", str(port), *tls)


@pytest.fixture
def running(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Running]:
    """Broker, bank and vendor serving and connected: with certificate logins (``bank``,
    ``meter``) when the test's indirect parameter is true, with plain logins otherwise."""
    tls: bool = request.param
    pki = tmp_path / "pki" if tls else None
    if pki is not None:
        make_pki(pki, ("bank", "meter"))
    port = free_port()
    url = f"{'mqtts' if tls else 'mqtt'}://127.0.0.1:{port}"
    data = tmp_path / "bank"
    m2mpay("bank", "init", "--data", data, "--bank", _BANK)
    m2mpay("bank", "vendor", "enroll", "--data", data, "meter", "--category", "parking", "--out", tmp_path / "v.json")
    coap_port = free_udp_port()
    (tmp_path / "vendor.toml").write_text("[pricing]\nprice = 1\nmeter_interval = 0.05\n")
    processes: dict[str, subprocess.Popen[bytes]] = {}
    login = ["--tls", str(pki)] if pki is not None else []
    try:
        processes["broker"] = _broker(tmp_path / "broker-0.log", tmp_path, port, pki)
        wait_for_text(tmp_path / "broker-0.log", "listening")
        processes["bank"] = start(tmp_path / "bank.log", "bank", "serve", "--data", data, "--broker", url, *login)
        processes["vendor"] = start(tmp_path / "vendor.log", "vendor", "serve", "--credentials", tmp_path / "v.json",
                                     "--broker", url, "--coap-port", str(coap_port), "--config",
                                     tmp_path / "vendor.toml", "--data", tmp_path / "vendor", *login)
        wait_for_text(tmp_path / "bank.log", "serving on", seconds=30)
        wait_for_text(tmp_path / "vendor.log", "serving CoAP", seconds=30)
        yield Running(tmp=tmp_path, url=url, port=port, pki=pki, bank_data=data, bank_log=tmp_path / "bank.log",
                      vendor_log=tmp_path / "vendor.log", coap=f"coap://[::1]:{coap_port}", processes=processes)
    finally:
        stop(*reversed(processes.values()))


def _last_line(log: Path) -> str:
    text = log.read_text()
    assert "Traceback" not in text, text
    return text.strip().splitlines()[-1]


@pytest.mark.parametrize("running", [True], indirect=True)
def test_a_running_vendor_whose_certificate_is_revoked_stops_with_one_line(running: Running) -> None:
    assert running.pki is not None
    revoke(running.pki, "meter")
    started = time.monotonic()
    running.restart_broker()
    assert running.exited("vendor") == 5, running.vendor_log.read_text()
    elapsed = time.monotonic() - started
    assert elapsed < 15, elapsed  # the first refused attempt (its CONNACK wait, 5 s), then one probe
    assert _last_line(running.vendor_log) == (
        f"m2mpay: vendor: the broker at 127.0.0.1:{running.port} "
        + BROKER_REFUSED.format(login=running.pki, name="meter", why="certificate revoked"))
    # The bank's certificate is still good: it reconnected and keeps serving.
    wait_until(lambda: running.bank_log.read_text().count("serving on") == 2, what="the bank serving again")
    assert running.processes["bank"].poll() is None


@pytest.mark.parametrize("running", [True], indirect=True)
def test_a_running_bank_whose_certificate_is_revoked_stops_with_one_line(running: Running) -> None:
    assert running.pki is not None
    revoke(running.pki, "bank")
    started = time.monotonic()
    running.restart_broker()
    assert running.exited("bank") == 5, running.bank_log.read_text()
    elapsed = time.monotonic() - started
    assert elapsed < 20, elapsed  # the first refused attempt (its CONNACK wait, 10 s), then one probe
    assert _last_line(running.bank_log) == (
        f"m2mpay: bank: the broker at 127.0.0.1:{running.port} "
        + BROKER_REFUSED.format(login=running.pki, name="bank", why="certificate revoked"))
    # The vendor's certificate is still good: it reconnects (a second restart is then a second
    # lost connection, logged only for one that was up) and a missing bank is no reason to stop.
    wait_until(lambda: "broker connection restored" in running.vendor_log.read_text(), timeout=30,
               what="the vendor connected again")
    running.restart_broker()
    wait_until(lambda: running.vendor_log.read_text().count("broker connection lost") == 2, timeout=30,
               what="the vendor connected again, and losing that connection")
    assert running.processes["vendor"].poll() is None, running.vendor_log.read_text()


def _pay(running: Running, units: int) -> str:
    result = m2mpay("user", "pay", "--wallet", running.tmp / "wallet", running.coap, "--units", str(units))
    return result.stdout


@pytest.mark.parametrize("running", [False], indirect=True)
def test_a_broker_restart_is_survived_and_payments_continue(running: Running) -> None:
    m2mpay("bank", "account", "open", "--data", running.bank_data, "alice", "--out", running.tmp / "alice.json")
    m2mpay("bank", "account", "deposit", "--data", running.bank_data, "alice", "1000")
    withdraw = ("user", "withdraw", "--wallet", running.tmp / "wallet", "--credentials", running.tmp / "alice.json",
                "--broker", running.url, "--coins", "1")
    assert "withdrew 1 coin" in m2mpay(*withdraw).stdout
    assert "paid meter 3 token(s); credited 3" in _pay(running, 3)
    wait_until(lambda: m2mpay("bank", "balance", "--data", running.bank_data, "meter").stdout.strip() == "3",
               what="the first payment settled")

    running.restart_broker()
    wait_until(lambda: running.bank_log.read_text().count("serving on") == 2, timeout=30,
               what="the bank serving again")
    # Through the restarted broker: the bank answers a withdrawal, the vendor settles with it.
    assert "withdrew 1 coin" in m2mpay(*withdraw).stdout
    assert "paid meter 4 token(s); credited 4" in _pay(running, 4)
    wait_until(lambda: m2mpay("bank", "balance", "--data", running.bank_data, "meter").stdout.strip() == "7",
               timeout=30, what="the second payment settled")
    assert running.processes["bank"].poll() is None and running.processes["vendor"].poll() is None
    for log in (running.bank_log, running.vendor_log):
        text = log.read_text()
        assert "Traceback" not in text, text
        waits = [float(w) for w in re.findall(r"broker connection lost \(.*\); reconnecting in (\d+\.\d) s", text)]
        assert len(waits) == 1 and 0.1 <= waits[0] <= 0.3, text  # lost once; the first wait, jittered
    assert "audit passed" in m2mpay("bank", "audit", "--data", running.bank_data).stdout


@pytest.mark.parametrize("running", [True], indirect=True)
def test_a_twin_with_the_vendors_certificate_neither_stops_it_nor_makes_it_spin(running: Running) -> None:
    """A copy of the vendor's certificate and key logs in again and again: each login takes the
    vendor's session over (the broker names a session after its certificate). Losing a session is
    never a reason to stop, and a connection that dies within seconds does not reset the backoff,
    so the real vendor backs off instead of fighting its twin five times a second."""
    assert running.pki is not None
    twin = TlsLogin.from_dir(running.pki, "meter")

    def kicked() -> list[float]:
        text = running.vendor_log.read_text()
        return [float(w) for w in re.findall(r"broker connection lost \(.*\); reconnecting in (\d+\.\d) s", text)]

    deadline = time.monotonic() + 30
    while len(kicked()) < 5:
        assert time.monotonic() < deadline, running.vendor_log.read_text()
        asyncio.run(wait_for_broker(running.url, twin, what="twin"))  # one login, then out again
        time.sleep(0.05)  # the twin's pace, not a synchronisation
    waits = kicked()
    assert running.processes["vendor"].poll() is None, running.vendor_log.read_text()
    # Steps 0.2, 0.4, 0.8, 1.6, 3.2 s, each drawn from half to one and a half times the step (logged
    # to 0.1 s). Had each takeover reset the backoff, every wait would be at most 0.3 s.
    for wait, step in zip(waits[:5], (0.2, 0.4, 0.8, 1.6, 3.2), strict=True):
        assert step / 2 - 0.05 <= wait <= step * 1.5 + 0.05, waits
