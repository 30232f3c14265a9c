"""A small town of processes: broker, bank and one vendor, each started by its own ``m2mpay`` command,
and a user ``alice`` with 1000 at the bank; driven only as an operator and a user drive them."""

from __future__ import annotations

import contextlib
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.commands import m2mpay
from tests.processes import popen

__all__ = ["Town", "first_payment", "free_coap_port", "serve_bank", "stop_all", "town"]


@dataclass
class Town:
    """Where the town's parts are, and its processes (stopped when :func:`town` ends)."""

    bank: Path
    broker: str
    vendor: str
    wallet: Path
    credentials: Path
    vendor_data: Path
    processes: list[subprocess.Popen[str]]
    vendor_args: tuple[str | Path, ...]

    def start_vendor(self) -> subprocess.Popen[str]:
        """Start the vendor (again, after a test stopped it)."""
        process = popen(*self.vendor_args, stderr=subprocess.DEVNULL)
        self.processes.append(process)
        return process


def free_coap_port() -> int:
    """A UDP port free on ``[::1]`` now, for a vendor's CoAP server."""
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
        sock.bind(("::1", 0))
        port: int = sock.getsockname()[1]
        return port


def serve_bank(tmp_path: Path, data: Path, processes: list[subprocess.Popen[str]]) -> str:
    """Start ``broker run`` (its data in ``tmp_path/mq``) and ``bank serve --data DATA`` on it,
    appending both to ``processes``; the broker's URL."""
    broker = popen("broker", "run", "--data", tmp_path / "mq", stdout=subprocess.PIPE)
    processes.append(broker)
    assert broker.stdout is not None
    found = re.search(r"mqtt://\S+", broker.stdout.readline())
    assert found is not None, "the broker did not say its URL"
    url = found.group(0)
    processes.append(popen("bank", "serve", "--data", data, "--broker", url, stderr=subprocess.DEVNULL))
    return url


def stop_all(processes: list[subprocess.Popen[str]]) -> None:
    """Interrupt every process still running, last started first, and wait for each."""
    for process in reversed(processes):
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
        process.wait(10)


@contextlib.contextmanager
def town(tmp_path: Path, vendor_toml: str) -> Iterator[Town]:
    """A bank with alice (1000) and a parking meter; broker, bank and vendor serving as processes."""
    data = tmp_path / "bank"
    m2mpay("bank", "init", "--data", data, "--bank", "bank-t")
    m2mpay("bank", "account", "open", "--data", data, "alice", "--out", tmp_path / "alice.json")
    m2mpay("bank", "account", "deposit", "--data", data, "alice", "1000")
    m2mpay("bank", "vendor", "enroll", "--data", data, "meter", "--category", "parking", "--out", tmp_path / "v.json")
    (tmp_path / "vendor.toml").write_text(vendor_toml)
    coap_port = free_coap_port()
    processes: list[subprocess.Popen[str]] = []
    try:
        url = serve_bank(tmp_path, data, processes)
        t = Town(bank=data, broker=url, vendor=f"coap://[::1]:{coap_port}", wallet=tmp_path / "wallet",
                 credentials=tmp_path / "alice.json", vendor_data=tmp_path / "vendor", processes=processes,
                 vendor_args=("vendor", "serve", "--credentials", tmp_path / "v.json", "--broker", url,
                              "--coap-port", str(coap_port), "--config", tmp_path / "vendor.toml",
                              "--data", tmp_path / "vendor"))
        t.start_vendor()
        yield t
    finally:
        stop_all(processes)


def first_payment(t: Town, units: int) -> subprocess.CompletedProcess[str]:
    """Pay, retrying while the vendor is still starting (it serves once it has the bank's keys)."""
    deadline = time.monotonic() + 20
    while True:
        result = m2mpay("user", "pay", "--wallet", t.wallet, t.vendor, "--units", str(units), check=False)
        if result.returncode == 0 or time.monotonic() > deadline:
            return result
        time.sleep(0.2)  # a retry of a whole command: the vendor gives no signal that it now serves
