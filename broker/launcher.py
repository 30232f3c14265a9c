"""Start a private Mosquitto on a free loopback port, wait until it accepts, stop it cleanly.

Used by ``m2mpay broker run``, the demo and the tests. A ``listener`` line overrides ``-p`` and
port 0 is not "random" in Mosquitto, so the port is chosen here and written into the config.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from .config import BrokerConfig, render_acl, render_config
from .pki import bank_logins

__all__ = ["BrokerError", "Mosquitto", "find_mosquitto", "free_port"]


class BrokerError(RuntimeError):
    """Mosquitto is missing, would not start, or did not accept connections in time."""


def find_mosquitto() -> str:
    """Path of the mosquitto binary (Debian installs it in /usr/sbin)."""
    found = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        raise BrokerError("mosquitto not found: apt-get install -y mosquitto")
    return found


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def free_udp_port(host: str = "::1") -> int:
    """A UDP port free on ``host`` (IPv6 loopback: where the CoAP servers bind) right now."""
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _unblock_signals() -> None:
    signal.pthread_sigmask(signal.SIG_SETMASK, set())


def _port_free(host: str, port: int) -> bool:
    """Whether a TCP listener could bind ``host:port`` now."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Mosquitto binds: TIME_WAIT is no conflict
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


@dataclass
class Mosquitto:
    """A Mosquitto process owned by this one; use as a context manager."""

    data_dir: Path
    port: int = 0
    host: str = "127.0.0.1"
    bank: str | None = None
    start_timeout: float = 10.0
    tls_dir: Path | None = None
    """With a PKI from :func:`m2mpay.broker.pki.make_pki`: TLS with client certificates only."""
    insecure_acl: bool = False
    """Allow ``bank`` without ``tls_dir``: the ACL then trusts claimed usernames (tests only)."""
    bank_workers: int = 1
    """How many bank workers the ACL grants the bank's topics: certificates ``bank``, ``bank-2`` …"""
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``mqtt://host:port`` of the listener."""
        return f"mqtt://{self.host}:{self.port}"

    def start(self) -> Mosquitto:
        """Write the config, start the broker and wait until it accepts connections."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if not self.port:
            self.port = free_port(self.host)
        elif not _port_free(self.host, self.port):
            # Otherwise the check below would find the other broker and call this one started
            raise BrokerError(f"{self.host}:{self.port} is in use (another Mosquitto?): choose another --port")
        tls = self.tls_dir.resolve() if self.tls_dir is not None else None
        cfg = BrokerConfig(port=self.port, data_dir=self.data_dir, host=self.host, bank=self.bank,
                           run_as_root=hasattr(os, "geteuid") and os.geteuid() == 0,
                           tls_ca=tls / "ca.crt" if tls else None, tls_cert=tls / "broker.crt" if tls else None,
                           tls_key=tls / "broker.key" if tls else None, insecure_acl=self.insecure_acl,
                           bank_users=bank_logins(self.bank_workers))
        if self.bank is not None:
            (self.data_dir / "acl").write_text(render_acl(self.bank, cfg.bank_users))
        conf = self.data_dir / "mosquitto.conf"
        conf.write_text(render_config(cfg))
        log = open(self.data_dir / "mosquitto.log", "ab")  # noqa: SIM115 - owned by the process
        # The child gets an empty signal mask: `broker run` blocks SIGTERM to wait for it, and a
        # mask is inherited across exec (Mosquitto would then ignore our own SIGTERM).
        self.process = subprocess.Popen([find_mosquitto(), "-c", str(conf)], stdout=log, stderr=log,
                                        preexec_fn=_unblock_signals)  # noqa: PLW1509 - no threads yet matter here
        log.close()
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BrokerError(f"mosquitto exited with {self.process.returncode}; see {self.data_dir}/mosquitto.log")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    pass
            except OSError:
                time.sleep(0.02)
                continue
            if self.process.poll() is not None:  # what answered was not this broker
                raise BrokerError(f"mosquitto exited with {self.process.returncode}; see {self.data_dir}/mosquitto.log")
            return self
        self.stop()
        raise BrokerError(f"mosquitto did not accept connections within {self.start_timeout} s")

    def stop(self, timeout: float = 5.0) -> None:
        """Terminate the broker (SIGTERM, then SIGKILL) and reap it."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout)

    def __enter__(self) -> Mosquitto:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
