"""The bank's commands as an operator runs them, in subprocesses, on a fresh data directory."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest


def m2mpay(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "agents.cli", *map(str, args)], capture_output=True, text=True,
                            timeout=120)
    if check and result.returncode != 0:
        raise AssertionError(f"m2mpay {args} failed: {result.stdout}{result.stderr}")
    return result


def test_operator_flow_and_audit(tmp_path: Path) -> None:
    data = tmp_path / "bank"
    assert "CA fingerprint" in m2mpay("bank", "init", "--data", data, "--bank", "bank-x").stdout
    assert m2mpay("bank", "init", "--data", data, check=False).returncode == 2  # never overwrite a bank
    keys = json.loads(m2mpay("bank", "keys", "--data", data, "--json").stdout)
    assert keys["bank"] == "bank-x" and sorted((k["value"], k["n"]) for k in keys["keysets"]) == [(100, 100), (1000, 1000)]
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
    assert new_id not in m2mpay("bank", "keys", "--data", data).stdout  # gone from the announcement
    assert m2mpay("bank", "keyset", "retire", "--data", data, new_id, check=False).returncode == 2
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


@pytest.mark.parametrize("args", [["bank", "balance", "--data", "{d}", "nobody"], ["bank", "audit", "--data", "{d}/none"]])
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

    from agents.mqtt import BankClient
    from protocol.certificates import verify_announcement

    data = tmp_path / "bank"
    m2mpay("bank", "init", "--data", data, "--bank", "bank-p")
    m2mpay("bank", "account", "open", "--data", data, "alice", "--out", tmp_path / "alice.json")
    broker = subprocess.Popen([sys.executable, "-m", "agents.cli", "broker", "run", "--data", tmp_path / "mq"],
                              stdout=subprocess.PIPE, text=True)
    bank = None
    try:
        assert broker.stdout is not None
        url = re.search(r"mqtt://\S+", broker.stdout.readline()).group(0)  # type: ignore[union-attr]
        bank = subprocess.Popen([sys.executable, "-m", "agents.cli", "bank", "serve", "--data", str(data),
                                 "--broker", url, "--log-json"], stderr=subprocess.PIPE, text=True)
        fingerprint = json.loads((tmp_path / "alice.json").read_text())["ca_fingerprint"]

        async def fetch_keys() -> str:
            async with BankClient(url, "bank-p", "alice") as client:
                return verify_announcement(await client.keys(timeout=30), fingerprint).bank

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
