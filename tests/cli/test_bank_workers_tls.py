"""`bank serve --workers N --tls DIR` behind a broker that takes a certificate's name as client id.

Issue 17: every worker logged in with the one ``bank`` certificate, so each new login took the
previous one's session over and the workers pushed each other off the broker in turn (measured
before the fix: 13 logins in 8 s, never two connected at once). Each worker now has its own
certificate (``bank``, ``bank-2`` …), names a device can never be issued.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from m2mpay.agents.bank.workers import worker_login
from m2mpay.broker.config import render_acl
from m2mpay.broker.launcher import Mosquitto
from m2mpay.broker.pki import add_client, make_pki
from m2mpay.protocol import wire
from tests.broker.clients import WAIT, TlsClient
from tests.waiting import wait_until

BANK = "b17"
REQUESTS = 20
PADDING = 600  # bytes of each request: far above what keepalives add to a connection in a few seconds


def m2mpay(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "m2mpay.agents.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=120)


def _connections(port: int, pids: set[int]) -> dict[int, list[tuple[int, int]]]:
    """Each of ``pids``' established connections to ``port``: (local port, bytes received)."""
    out = subprocess.run(["ss", "-tnpiH", "state", "established", f"( dport = :{port} )"], capture_output=True,
                         text=True, check=True, timeout=10).stdout
    found: dict[int, list[tuple[int, int]]] = {pid: [] for pid in pids}
    for record in re.split(r"\n(?=\S)", out.strip()):  # a socket's line, then its indented TCP info
        local = re.search(rf":(\d+)\s+\S+:{port}\b", record)
        owner = re.search(r"pid=(\d+)", record)
        received = re.search(r"bytes_received:(\d+)", record)
        if local and owner and int(owner.group(1)) in found:
            found[int(owner.group(1))].append((int(local.group(1)), int(received.group(1)) if received else 0))
    return found


def _both(port: int, pids: set[int]) -> dict[int, list[tuple[int, int]]]:
    """The connections when every one of ``pids`` holds exactly one, else nothing."""
    found = _connections(port, pids)
    return found if all(len(held) == 1 for held in found.values()) else {}


def _ports(found: dict[int, list[tuple[int, int]]]) -> dict[int, list[int]]:
    """Each process's connections by local port: a new login shows as a new port."""
    return {pid: [local for local, _ in held] for pid, held in found.items()}


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


@pytest.mark.network
def test_two_workers_stay_connected_over_tls_and_both_answer(tmp_path: Path) -> None:
    """Both workers hold one connection each, the same for seconds, and each receives requests."""
    from m2mpay.agents.bank.keys import load_bank
    from m2mpay.agents.mqtt import BankClient, TlsLogin
    from m2mpay.protocol import envelope
    from m2mpay.protocol.errors import ErrorCode, RemoteProtocolError
    from m2mpay.protocol.messages import StatusAnswer

    pki, data = tmp_path / "pki", tmp_path / "bank"
    make_pki(pki, ("alice",), bank_workers=2)
    assert m2mpay("bank", "init", "--data", data, "--bank", BANK).returncode == 0
    keys, store = load_bank(data, int(time.time()))
    store.close()
    with Mosquitto(tmp_path / "mq", bank=BANK, tls_dir=pki, bank_workers=2) as broker:
        url = f"mqtts://localhost:{broker.port}"
        bank = subprocess.Popen([sys.executable, "-m", "m2mpay.agents.cli", "bank", "serve", "--data", str(data),
                                 "--broker", url, "--workers", "2", "--tls", str(pki)],
                                stderr=open(tmp_path / "bank.log", "w"))  # noqa: SIM115 - the process owns it
        try:
            second = wait_until(lambda: _children(bank.pid), timeout=20, what="the second worker started")[0]
            pids = {bank.pid, second}
            first_seen = wait_until(lambda: _both(broker.port, pids), timeout=20, what="both workers connected")
            ports = _ports(first_seen)
            deadline = time.monotonic() + 4  # a takeover loop logs in again every 0.2-3 s
            while time.monotonic() < deadline:
                assert _ports(_connections(broker.port, pids)) == ports, "a worker lost its connection"
                time.sleep(0.2)

            async def ask() -> list[bytes]:
                async with BankClient(url, BANK, "ignored", tls=TlsLogin.from_dir(pki, "alice")) as device:
                    bodies = [b"\xff" + i.to_bytes(2, "big") * (PADDING // 2) for i in range(REQUESTS)]
                    answers = await asyncio.gather(*(device.request("status", body) for body in bodies))
                for body, answer in zip(bodies, answers, strict=True):
                    with pytest.raises(RemoteProtocolError) as refused:
                        envelope.open_answer(answer, keys.answer_key.public_key(), BANK, "status", StatusAnswer,
                                             request=body)
                    assert refused.value.code is ErrorCode.BAD_REQUEST
                return answers

            assert len(asyncio.run(ask())) == REQUESTS
            after = _connections(broker.port, pids)
            # the same single connection each, and each carried a share of the requests
            assert _ports(after) == ports
            for pid in pids:
                got = after[pid][0][1] - first_seen[pid][0][1]
                assert got >= 3 * PADDING, f"worker {pid} received {got} bytes: it answered no share of requests"
        finally:
            bank.send_signal(signal.SIGTERM)
            bank.wait(20)
    assert "connection lost" not in (tmp_path / "bank.log").read_text()


def test_a_missing_worker_certificate_in_a_copy_of_the_logins_points_to_the_pki(tmp_path: Path) -> None:
    """Deployed, the bank is handed copies of its logins (the systemd unit: /etc/m2mpay/bank-tls,
    linked into its state directory), never the PKI with the CA's key: a certificate cannot be
    issued there, so the line says where it can and where the copy goes."""
    pki, logins, data = tmp_path / "pki", tmp_path / "logins", tmp_path / "bank"
    make_pki(pki, (), bank_workers=1)
    logins.mkdir()
    for name in ("ca.crt", "bank.crt", "bank.key"):
        shutil.copy(pki / name, logins / name)
    assert m2mpay("bank", "init", "--data", data, "--bank", BANK).returncode == 0
    result = m2mpay("bank", "serve", "--data", data, "--broker", "mqtts://localhost:1", "--workers", "2",
                    "--tls", logins)
    assert result.returncode == 2
    assert result.stderr == (f"m2mpay: bank: --workers 2 needs certificates bank, bank-2 in {logins}: bank-2 "
                             "missing (issue it where the broker's PKI is kept: m2mpay broker pki add-client bank-2 "
                             "--role bank --dir PKI; then copy bank-2.crt and bank-2.key here, or, for the systemd "
                             "unit, run deploy/pi/install.sh again: docs/OPERATOR.md)\n")


def test_each_worker_has_its_own_login_on_every_machine() -> None:
    assert [worker_login(i) for i in range(3)] == ["bank", "bank-2", "bank-3"]
    assert [worker_login(i, first=5) for i in range(4)] == ["bank-5", "bank-6", "bank-7", "bank-8"]


def test_missing_worker_certificate_is_one_line_before_anything_starts(tmp_path: Path) -> None:
    pki, data = tmp_path / "pki", tmp_path / "bank"
    make_pki(pki, (), bank_workers=2)
    assert m2mpay("bank", "init", "--data", data, "--bank", BANK).returncode == 0
    before = sorted(p.name for p in data.iterdir())
    result = m2mpay("bank", "serve", "--data", data, "--broker", "mqtts://localhost:1", "--workers", "3",
                    "--tls", pki)
    assert result.returncode == 2
    assert result.stderr == (f"m2mpay: bank: --workers 3 needs certificates bank, bank-2, bank-3 in {pki}: "
                             f"bank-3 missing (m2mpay broker pki add-client bank-3 --role bank --dir {pki})\n")
    assert sorted(p.name for p in data.iterdir()) == before  # no lock, no log, no database journal
    (pki / "bank-2.key").unlink()
    result = m2mpay("bank", "serve", "--data", data, "--broker", "mqtts://localhost:1", "--workers", "2",
                    "--tls", pki)
    assert result.returncode == 2
    assert result.stderr == (f"m2mpay: bank: --workers 2 needs certificates bank, bank-2 in {pki}: "
                             f"bank-2.key missing (m2mpay broker pki add-client bank-2 --role bank --dir {pki})\n")
    # a second machine's workers: bank-3 and bank-4, none of the first machine's names
    result = m2mpay("bank", "serve", "--data", data, "--broker", "mqtts://localhost:1", "--workers", "2",
                    "--first-worker", "3", "--tls", pki)
    assert result.returncode == 2
    assert result.stderr == (f"m2mpay: bank: --workers 2 --first-worker 3 needs certificates bank-3, bank-4 in "
                             f"{pki}: bank-3 missing (m2mpay broker pki add-client bank-3 --role bank --dir {pki})\n")


def test_worker_certificates_issued_only_for_the_bank_role(tmp_path: Path) -> None:
    """A device can never be issued a bank worker's name; the bank role gets only those names."""
    pki = tmp_path / "pki"
    assert m2mpay("broker", "pki", "--dir", pki, "--bank-workers", "3", "--client", "meter-1").returncode == 0
    assert sorted(p.name for p in pki.glob("bank*.crt")) == ["bank-2.crt", "bank-3.crt", "bank.crt"]
    for name in ("bank-4", "bank-02", "bank"):
        refused = m2mpay("broker", "pki", "add-client", name, "--dir", pki)
        assert refused.returncode == 2
        assert refused.stderr == (f"m2mpay: broker: {name!r} is reserved for the bank's workers (bank, bank-2, "
                                  "bank-3 …): a device cannot have it; issue it for the bank with "
                                  "'broker pki add-client NAME --role bank'\n")
    assert not (pki / "bank-4.crt").exists() and not (pki / "bank-4.key").exists()
    assert not (pki / "bank-02.crt").exists()
    renewed = m2mpay("broker", "pki", "--dir", pki, "--client", "bank-2")  # nor as a device renewed
    assert renewed.returncode == 2 and "reserved for the bank's workers" in renewed.stderr
    wrong_role = m2mpay("broker", "pki", "add-client", "alice", "--role", "bank", "--dir", pki)
    assert wrong_role.returncode == 2
    assert wrong_role.stderr == ("m2mpay: broker: 'alice' is not a bank worker's name: the bank's workers are "
                                 "bank, bank-2, bank-3 …\n")
    assert not (pki / "alice.crt").exists()
    assert m2mpay("broker", "pki", "add-client", "bank-4", "--role", "bank", "--dir", pki).returncode == 0
    with pytest.raises(ValueError, match="reserved for the bank's workers"):
        add_client(pki, "bank-5")
    with pytest.raises(ValueError, match="not a bank worker's name"):
        render_acl(BANK, ("bank", "alice"))  # the bank's grants never go to a device's name


@pytest.mark.network
def test_device_gets_none_of_the_bank_grants(tmp_path: Path) -> None:
    """A device with a valid certificate reads no request and cannot replace the keys announcement;
    the second worker's certificate does both."""
    pki = tmp_path / "pki"
    make_pki(pki, ("alice", "mallory"), bank_workers=2)
    request = wire.request_topic(BANK, "status")
    with Mosquitto(tmp_path / "mq", bank=BANK, tls_dir=pki, bank_workers=2) as broker:
        acl = (tmp_path / "mq" / "acl").read_text()
        assert "user bank\n" in acl and "user bank-2\n" in acl and "user mallory" not in acl
        worker = TlsClient(broker, pki, "bank-2")
        alice = TlsClient(broker, pki, "alice")
        mallory = TlsClient(broker, pki, "mallory")
        try:
            worker.subscribe(wire.shared_request_filter(BANK))
            mallory.subscribe(wire.request_filter(BANK))
            mallory.subscribe(wire.response_filter(BANK))
            for i in range(4):
                alice.publish(request, b"req %d" % i)
                assert worker.inbox.get(timeout=WAIT) == (request, b"req %d" % i)
            assert worker.publish(wire.response_topic(BANK, "mallory"), b"after") is not None
            assert mallory.inbox.get(timeout=WAIT) == (wire.response_topic(BANK, "mallory"), b"after")
            assert mallory.drain(0.3) == []  # no request reached her
            mallory.publish(wire.keys_topic(BANK), b"forged keys", retain=True)  # dropped by the ACL
            worker.publish(wire.keys_topic(BANK), b"real keys", retain=True)
            alice.subscribe(wire.keys_topic(BANK))
            assert alice.inbox.get(timeout=WAIT) == (wire.keys_topic(BANK), b"real keys")
            mallory.publish(wire.keys_topic(BANK), b"forged again", retain=True)
            worker.publish(wire.keys_topic(BANK), b"real again", retain=True)
            assert alice.inbox.get(timeout=WAIT) == (wire.keys_topic(BANK), b"real again")  # nothing between
        finally:
            for client in (worker, alice, mallory):
                client.close()
