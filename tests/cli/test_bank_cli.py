"""The bank's commands as an operator runs them, in subprocesses, on a fresh data directory."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.commands import m2mpay


def test_operator_flow_and_audit(tmp_path: Path) -> None:
    data = tmp_path / "bank"
    assert "CA fingerprint" in m2mpay("bank", "init", "--data", data, "--bank", "bank-x").stdout
    assert m2mpay("bank", "init", "--data", data, check=False).returncode == 2  # never overwrite a bank
    keys = json.loads(m2mpay("bank", "keys", "--data", data, "--json").stdout)
    assert keys["bank"] == "bank-x"
    # the coins to withdraw, and change of 1, 2, 4 … 512 tokens for exchanges
    assert sorted((k["value"], k["n"]) for k in keys["keysets"]) == sorted(
        [(100, 100), (1000, 1000)] + [(1 << i, 1 << i) for i in range(10)])
    m2mpay("bank", "account", "open", "--data", data, "alice", "--out", tmp_path / "alice.json")
    creds = json.loads((tmp_path / "alice.json").read_text())
    assert creds["ca_fingerprint"] == keys["ca_fingerprint"] and creds["bank"] == "bank-x"
    assert m2mpay("bank", "account", "deposit", "--data", data, "alice", "500").stdout.strip() == "500"
    assert m2mpay("bank", "balance", "--data", data, "alice").stdout.strip() == "500"
    m2mpay("bank", "vendor", "enroll", "--data", data, "meter", "--category", "parking", "--out", tmp_path / "v.json")
    assert bytes.fromhex(json.loads((tmp_path / "v.json").read_text())["cert"])
    new_id = m2mpay("bank", "keyset", "add", "--data", data, "--value", "50", "--tokens", "50").stdout.strip()
    assert new_id in m2mpay("bank", "keys", "--data", data).stdout
    m2mpay("bank", "keyset", "retire", "--data", data, new_id)
    # Still announced until it closes (its coins are spent until spend_until); no withdrawals.
    listed = json.loads(m2mpay("bank", "keys", "--data", data, "--json").stdout)["keysets"]
    assert {k["id"]: k["phase"] for k in listed}[new_id] == "spend-only"
    assert f"{new_id}  coin 0.50 EUR in 50 tokens of 0.01 EUR  (spend-only)" in m2mpay("bank", "keys", "--data",
                                                                                        data).stdout
    again = m2mpay("bank", "keyset", "retire", "--data", data, new_id)
    assert again.stdout.startswith(f"keyset {new_id} was already retired at ")
    assert m2mpay("bank", "keyset", "retire", "--data", data, "ks-none", check=False).returncode == 2
    assert "audit passed" in m2mpay("bank", "audit", "--data", data).stdout


def test_audit_fails_on_tampered_books(tmp_path: Path) -> None:
    data = tmp_path / "bank"
    m2mpay("bank", "init", "--data", data)
    m2mpay("bank", "account", "open", "--data", data, "alice", "--out", tmp_path / "alice.json")
    m2mpay("bank", "account", "deposit", "--data", data, "alice", "500")
    with sqlite3.connect(data / "bank.sqlite3") as db:  # money from nowhere
        db.execute("UPDATE accounts SET balance = balance + 1 WHERE name = 'alice'")
    result = m2mpay("bank", "audit", "--data", data, check=False)
    assert result.returncode == 1 and "alice" in result.stderr


@pytest.mark.parametrize("args", [["bank", "balance", "--data", "{d}", "nobody"],
                                  ["bank", "audit", "--data", "{d}/none"]])
def test_errors_are_reported_not_raised(tmp_path: Path, args: list[str]) -> None:
    data = tmp_path / "bank"
    m2mpay("bank", "init", "--data", data)
    result = m2mpay(*[a.format(d=data) for a in args], check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr


@pytest.mark.network
def test_broker_run_and_bank_serve_as_processes(tmp_path: Path) -> None:
    """The operator's commands, each its own process: a device withdraws through them."""
    import asyncio
    import re
    import signal

    from m2mpay.agents.mqtt import BankClient
    from m2mpay.protocol.certificates import verify_announcement

    data = tmp_path / "bank"
    m2mpay("bank", "init", "--data", data, "--bank", "bank-p")
    m2mpay("bank", "account", "open", "--data", data, "alice", "--out", tmp_path / "alice.json")
    broker = subprocess.Popen([sys.executable, "-m", "m2mpay.agents.cli", "broker", "run", "--data", tmp_path / "mq"],
                              stdout=subprocess.PIPE, text=True)
    bank = None
    try:
        assert broker.stdout is not None
        url = re.search(r"mqtt://\S+", broker.stdout.readline()).group(0)  # type: ignore[union-attr]
        bank = subprocess.Popen([sys.executable, "-m", "m2mpay.agents.cli", "bank", "serve", "--data", str(data),
                                 "--broker", url, "--log-json"], stderr=subprocess.PIPE, text=True)
        fingerprint = json.loads((tmp_path / "alice.json").read_text())["ca_fingerprint"]

        async def fetch_keys() -> str:
            async with BankClient(url, "bank-p", "alice") as client:
                return verify_announcement(await client.keys(timeout=30), fingerprint, int(time.time())).bank

        assert asyncio.run(fetch_keys()) == "bank-p"
    finally:
        for process in (bank, broker):
            if process is not None:
                process.send_signal(signal.SIGINT)
                process.wait(10)
    assert broker.returncode == 0
    assert bank is not None and bank.stderr is not None
    lines = [json.loads(line) for line in bank.stderr.read().splitlines() if line.strip()]  # JSON lines only
    assert any("serving" in entry["message"] and entry["level"] == "info" for entry in lines)


def test_broker_pki_and_production_config(tmp_path: Path) -> None:
    m2mpay("broker", "pki", "--dir", tmp_path / "pki", "--client", "bank", "--client", "meter-1")
    assert {p.name for p in (tmp_path / "pki").iterdir()} >= {"ca.crt", "broker.crt", "broker.key", "bank.crt",
                                                               "meter-1.key"}
    conf = m2mpay("broker", "config", "--data", tmp_path / "mq", "--bank", "bank-a", "--tls", tmp_path / "pki").stdout
    for line in ("listener 8883 0.0.0.0", "require_certificate true", "use_identity_as_username true",
                 "use_username_as_clientid true", "allow_anonymous false", "set_tcp_nodelay true"):
        assert line in conf
    assert "pattern read m2mpay/bank-a/resp/%u" in (tmp_path / "mq" / "acl").read_text()


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


@pytest.mark.network
def test_bank_serve_with_two_worker_processes(tmp_path: Path, mosquitto: str, bank_id: str) -> None:
    """`--workers 2`: two processes answer from one database; SIGTERM stops both, kill -9 of the
    first leaves no orphan; withdrawals spread over both debit exactly once each."""
    import asyncio
    import signal
    import time

    from m2mpay.agents.mqtt import BankClient
    from m2mpay.protocol.certificates import verify_announcement
    from m2mpay.protocol.messages import WithdrawAnswer
    from m2mpay.protocol.rules import wallet
    from tests.bank_world import Device
    from tests.waiting import wait_until

    data = tmp_path / "bank"
    m2mpay("bank", "init", "--data", data, "--bank", bank_id)
    m2mpay("bank", "account", "open", "--data", data, "alice", "--out", tmp_path / "alice.json")
    m2mpay("bank", "account", "deposit", "--data", data, "alice", "100000")
    creds = json.loads((tmp_path / "alice.json").read_text())

    def start() -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, "-m", "m2mpay.agents.cli", "bank", "serve", "--data", str(data),
                                 "--broker", mosquitto, "--workers", "2"], stderr=subprocess.DEVNULL, text=True)

    async def withdraw_many() -> int:
        from m2mpay.protocol import envelope
        from m2mpay.protocol.rules.keyring import Keyring, default_withdrawal

        key = Device.load(tmp_path / "alice.json").key
        async with BankClient(mosquitto, bank_id, f"alice-{time.monotonic_ns()}") as client:
            announcement = verify_announcement(await client.keys(timeout=30), creds["ca_fingerprint"],
                                               int(time.time()))
            keyring = Keyring.from_announcement(announcement)
            info = default_withdrawal(keyring.keysets.values())  # as a wallet's withdrawal picks it
            assert info is not None and info.value == 100
            public = keyring.rsa_keys[info.id]
            pendings = [wallet.prepare_withdrawal("alice", info, public, 2) for _ in range(12)]
            signed = [envelope.sign_request(p.request, key, "alice", bank_id, "withdraw") for p in pendings]
            raws = await asyncio.gather(*(client.request("withdraw", s) for s in signed))
            for pending, request, raw in zip(pendings, signed, raws, strict=True):
                answer = envelope.open_answer(raw, keyring.answer_key, bank_id, "withdraw", WithdrawAnswer,
                                              request=request)
                wallet.complete_withdrawal(pending, answer, info, public)
            return len(pendings) * 2 * info.value  # coins × what each is worth

    bank = start()
    try:
        deadline = time.monotonic() + 20
        while len(_children(bank.pid)) < 1:
            assert time.monotonic() < deadline, "the second worker never started"
            time.sleep(0.1)
        spent = asyncio.run(withdraw_many())
    finally:
        workers = _children(bank.pid)
        bank.send_signal(signal.SIGTERM)
        bank.wait(15)

    def running(pid: int) -> bool:
        try:
            return "zombie" not in Path(f"/proc/{pid}/status").read_text()
        except FileNotFoundError:
            return False

    assert workers
    wait_until(lambda: not any(running(w) for w in workers), timeout=10, what="SIGTERM has stopped every worker")
    balance = int(m2mpay("bank", "balance", "--data", data, "alice").stdout.strip())
    assert balance == 100000 - spent
    assert "audit passed" in m2mpay("bank", "audit", "--data", data).stdout

    bank = start()  # kill -9 of the first: its worker notices and stops
    deadline = time.monotonic() + 20
    while not _children(bank.pid):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    orphan = _children(bank.pid)[0]
    bank.send_signal(signal.SIGKILL)
    bank.wait(10)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{orphan}").exists() and "zombie" not in Path(f"/proc/{orphan}/status").read_text():
        assert time.monotonic() < deadline, "a worker outlived the first process"
        time.sleep(0.2)
