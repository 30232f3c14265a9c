"""One broker rule for ``bank serve`` and ``vendor serve``: wait for a broker that is not up yet,
stop at once (one line, exit 5) on a login it will never accept. Also the rule's parts (the probe,
the backoff, the running agents' :class:`~m2mpay.agents.reach.Reconnect`) and a wallet's refused
login; running agents and broker restarts are in ``test_broker_reconnect.py``."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from m2mpay.broker.launcher import free_port, free_udp_port
from m2mpay.broker.pki import make_pki, revoke

from tests.commands import m2mpay, one_line
from tests.processes import BROKER_REFUSED, start, stop, wait_for_text

pytestmark = pytest.mark.network


def _enrolled(tmp_path: Path, bank: str) -> Path:
    data = tmp_path / "bank"
    m2mpay("bank", "init", "--data", data, "--bank", bank)
    m2mpay("bank", "vendor", "enroll", "--data", data, "meter", "--category", "parking", "--out", tmp_path / "v.json")
    return data


def test_vendor_serve_waits_for_a_broker_that_starts_late(tmp_path: Path) -> None:
    """It used to give up after 5 s; now it retries with backoff and serves once the broker is up."""
    data = _enrolled(tmp_path, "bank-late")
    port = free_port()
    url = f"mqtt://127.0.0.1:{port}"
    vendor_log = tmp_path / "vendor.log"
    vendor = start(vendor_log, "vendor", "serve", "--credentials", tmp_path / "v.json", "--broker", url,
                    "--coap-port", str(free_udp_port()), "--data", tmp_path / "vendor")
    broker = bank = None
    try:
        wait_for_text(vendor_log, "broker not reachable yet")
        # The wait is the point: nothing may happen (the vendor must not give up) for longer than the
        # 5 s it used to give up after; there is no event to poll for.
        time.sleep(6)
        assert vendor.poll() is None, vendor_log.read_text()
        broker = start(tmp_path / "broker.log", "broker", "run", "--data", tmp_path / "mq", "--port", str(port))
        bank = start(tmp_path / "bank.log", "bank", "serve", "--data", data, "--broker", url)
        wait_for_text(vendor_log, "serving CoAP", seconds=60)
    finally:
        stop(vendor, bank, broker)
    retries = re.findall(r"broker not reachable yet \(cannot connect to 127\.0\.0\.1:\d+: Connection refused\); "
                         r"trying again in (\d+\.\d) s", vendor_log.read_text())
    assert len(retries) >= 3 and float(retries[-1]) > float(retries[0])  # backing off


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, Path]]:
    """A TLS broker with the bank's ACL; its PKI (bank, meter, and a revoked 'stolen') and another CA's."""
    tmp = tmp_path_factory.mktemp("tls-broker")
    pki, other = tmp / "pki", tmp / "other"
    make_pki(pki, ("bank", "meter", "stolen"))
    revoke(pki, "stolen")
    make_pki(other, ("bank", "meter"))
    port = free_port()
    broker = start(tmp / "broker.log", "broker", "run", "--data", tmp / "mq", "--port", str(port),
                    "--bank", "bank-tls", "--tls", pki)
    try:
        wait_for_text(tmp / "broker.log", "listening")
        yield f"mqtts://127.0.0.1:{port}", pki, other
    finally:
        stop(broker)


def _mixed(tmp_path: Path, ca_from: Path, cert_from: Path, name: str) -> Path:
    """A login directory with one PKI's CA and another's (or the same) certificate."""
    login = tmp_path / "login"
    login.mkdir()
    (login / "ca.crt").write_bytes((ca_from / "ca.crt").read_bytes())
    for suffix in (".crt", ".key"):
        (login / f"{name}{suffix}").write_bytes((cert_from / f"{name}{suffix}").read_bytes())
    return login


_UNTRUSTED = "is not the one {login}/ca.crt vouches for (self-signed certificate in certificate chain): check the " \
    "broker's certificate and the name in the URL"


@pytest.mark.parametrize("role, source, rest", [
    ("bank", "client-of-another-ca", BROKER_REFUSED.replace("{why}", "unknown ca")),
    ("bank", "broker-of-another-ca", _UNTRUSTED),
    ("vendor", "client-of-another-ca", BROKER_REFUSED.replace("{why}", "unknown ca")),
    ("vendor", "revoked", BROKER_REFUSED.replace("{why}", "certificate revoked")),
])
def test_a_login_the_broker_never_accepts_ends_at_once(tls_broker: tuple[str, Path, Path], tmp_path: Path,
                                                       role: str, source: str, rest: str) -> None:
    url, pki, other = tls_broker
    data = _enrolled(tmp_path, "bank-tls")
    name = "bank" if role == "bank" else "stolen" if source == "revoked" else "meter"
    if name == "stolen":  # enrolled at the bank; its broker certificate was revoked
        m2mpay("bank", "vendor", "enroll", "--data", data, "stolen", "--category", "parking", "--out",
               tmp_path / "v.json")
    ca_from, cert_from = {"client-of-another-ca": (pki, other), "broker-of-another-ca": (other, pki),
                          "revoked": (pki, pki)}[source]
    login = _mixed(tmp_path, ca_from, cert_from, name)
    args: list[str | Path] = (["bank", "serve", "--data", data] if role == "bank" else
            ["vendor", "serve", "--credentials", tmp_path / "v.json", "--coap-port", str(free_udp_port()),
             "--data", tmp_path / "vendor"])
    started = time.monotonic()
    result = m2mpay(*args, "--broker", url, "--tls", login, check=False)
    assert result.returncode == 5, result.stdout + result.stderr
    port = url.rsplit(":", 1)[1]
    assert one_line(result.stderr) == (f"m2mpay: {role}: the broker at 127.0.0.1:{port} "
                                        + rest.format(login=login, name=name))
    assert time.monotonic() - started < 15  # no retrying


class _Answering:
    """A TCP listener that reads one CONNECT per connection and answers with the next canned bytes."""

    def __init__(self, answers: list[bytes]) -> None:
        import socket
        import threading

        self.answers = answers
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"mqtt://127.0.0.1:{self.server.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        for answer in self.answers:
            try:
                conn, _ = self.server.accept()
            except OSError:  # closed by close() before every canned answer was asked for
                return
            with conn:
                conn.recv(1024)
                conn.sendall(answer)

    def close(self) -> None:
        self.server.close()


def test_probe_reads_the_brokers_verdict() -> None:
    import asyncio

    from m2mpay.agents.reach import BrokerRefused, probe_login, wait_for_broker

    refusing = _Answering([b"\x20\x03\x00\x87\x00"])  # CONNACK: not authorised
    try:
        with pytest.raises(BrokerRefused, match=r"refused the login 'probe': not authorised$"):
            probe_login(refusing.url, None, "probe")
    finally:
        refusing.close()

    hostile = _Answering([b"\x20\xff\xff\xff\x7f"])  # a CONNACK claiming 256 MiB: refused, nothing allocated
    try:
        started = time.monotonic()
        with pytest.raises(BrokerRefused, match="does not answer as an MQTT v5 broker"):
            probe_login(hostile.url, None, "probe")
        assert time.monotonic() - started < 2
    finally:
        hostile.close()

    waits: list[float] = []

    async def no_sleep(seconds: float) -> None:
        waits.append(seconds)

    busy_then_ok = _Answering([b"\x20\x03\x00\x89\x00", b"\x20\x03\x00\x88\x00", b"\x20\x03\x00\x00\x00"])
    try:  # server busy, server unavailable: tried again; then accepted
        asyncio.run(wait_for_broker(busy_then_ok.url, None, what="test", sleep=no_sleep))
    finally:
        busy_then_ok.close()
    assert len(waits) == 2 and 0.25 <= waits[0] <= 0.75 and 0.5 <= waits[1] <= 1.5  # jittered, doubling


def test_the_running_rule_judges_a_failed_attempt_by_the_probe(caplog: pytest.LogCaptureFixture) -> None:
    """Once running, a failed attempt is judged the way the start-up probe judges it; a connection
    that was up is not judged (the next attempt is), and only one that held resets the backoff."""
    import asyncio
    import logging

    from m2mpay.agents.reach import BrokerRefused, Reconnect

    waits: list[float] = []
    now = [0.0]

    async def no_sleep(seconds: float) -> None:
        waits.append(seconds)

    def rule(url: str) -> Reconnect:
        return Reconnect(url, None, "agent", sleep=no_sleep, clock=lambda: now[0])

    refusing = _Answering([b"\x20\x03\x00\x87\x00"] * 2)  # not authorised, for every login
    try:
        with pytest.raises(BrokerRefused, match=r"refused the login '.*': not authorised$"):
            asyncio.run(rule(refusing.url).after("connection refused by aiomqtt"))
        assert waits == []  # no wait: the agent ends

        # A connection that was up and is lost is made again without judging (the broker would refuse).
        up = rule(refusing.url)
        up.connected()
        with caplog.at_level(logging.WARNING, logger="m2mpay.agents.reach"):
            asyncio.run(up.after("Disconnected during message iteration"))
        assert len(waits) == 1 and 0.1 <= waits[0] <= 0.3
        assert caplog.messages == [f"agent: broker connection lost (Disconnected during message iteration); "
                                   f"reconnecting in {waits[0]:.1f} s"]
    finally:
        refusing.close()

    busy = _Answering([b"\x20\x03\x00\x89\x00", b"\x20\x03\x00\x00\x00"])  # server busy; then accepted
    caplog.clear()
    waits.clear()
    try:
        again = rule(busy.url)
        with caplog.at_level(logging.WARNING, logger="m2mpay.agents.reach"):
            asyncio.run(again.after("timed out"))
            asyncio.run(again.after("timed out"))  # the broker takes the login: the client's own error is said
        assert caplog.messages == [
            f"agent: broker not reachable (the broker at 127.0.0.1:{busy.url.rsplit(':', 1)[1]} answered reason code "
            f"0x89); trying again in {waits[0]:.1f} s",
            f"agent: broker not reachable (timed out); trying again in {waits[1]:.1f} s"]
        assert 0.1 <= waits[0] <= 0.3 and 0.2 <= waits[1] <= 0.6  # jittered, doubling
    finally:
        busy.close()

    # Only a connection that held resets the backoff; one that died within seconds does not.
    # Each connection after a loss is said once, at info: the first one is not.
    flapping = rule(busy.url)
    waits.clear()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="m2mpay.agents.reach"):
        for held in (1.0, 1.0, 11.0):
            flapping.connected()
            now[0] += held
            asyncio.run(flapping.after("session taken over"))
    assert 0.1 <= waits[0] <= 0.3 and 0.2 <= waits[1] <= 0.6 and 0.1 <= waits[2] <= 0.3, waits
    assert [m for m in caplog.messages if "restored" in m] == ["agent: broker connection restored"] * 2


def test_backoff_is_jittered_doubling_and_capped() -> None:
    from m2mpay.agents.reach import Backoff

    backoff = Backoff(1.0, 4.0)
    waits = [backoff.next() for _ in range(6)]
    for wait, step in zip(waits, (1.0, 2.0, 4.0, 4.0, 4.0, 4.0), strict=True):
        assert step / 2 <= wait <= min(step * 1.5, 4.0), waits
    backoff.reset()
    assert 0.5 <= backoff.next() <= 1.5
    for first, cap in ((0.0, 1.0), (2.0, 1.0), (-1.0, 1.0)):
        with pytest.raises(ValueError, match=r"^backoff needs 0 < first <= cap"):
            Backoff(first, cap)


def test_a_wallet_whose_certificate_the_broker_refuses_says_so(tls_broker: tuple[str, Path, Path],
                                                               tmp_path: Path) -> None:
    """The wallet's connection follows the rule too: an attempt that fails is judged, and the line
    says what the broker refused instead of "cannot reach the broker"."""
    url, pki, _ = tls_broker
    data = _enrolled(tmp_path, "bank-tls")
    m2mpay("bank", "account", "open", "--data", data, "stolen", "--out", tmp_path / "stolen.json")
    login = _mixed(tmp_path, pki, pki, "stolen")  # its broker certificate was revoked
    started = time.monotonic()
    result = m2mpay("user", "withdraw", "--wallet", tmp_path / "wallet", "--credentials", tmp_path / "stolen.json",
                    "--broker", url, "--tls", login, "--coins", "1", check=False)
    assert result.returncode == 5, result.stdout + result.stderr
    port = url.rsplit(":", 1)[1]
    assert one_line(result.stderr) == (f"m2mpay: the broker at 127.0.0.1:{port} "
                                        + BROKER_REFUSED.format(login=login, name="stolen", why="certificate revoked"))
    elapsed = time.monotonic() - started
    assert elapsed < 10, elapsed  # the client's first wait (5 s), then one probe; no retrying
