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
                                 "--broker", url], stderr=subprocess.DEVNULL)
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


@pytest.mark.network
def test_every_role_as_its_own_process(tmp_path: Path) -> None:
    """broker run, bank serve, vendor serve as processes; user withdraw / pay / wallet as commands."""
    import re
    import signal
    import socket
    import time

    data = tmp_path / "bank"
    m2mpay("bank", "init", "--data", data, "--bank", "bank-e")
    m2mpay("bank", "account", "open", "--data", data, "alice", "--out", tmp_path / "alice.json")
    m2mpay("bank", "account", "deposit", "--data", data, "alice", "1000")
    m2mpay("bank", "vendor", "enroll", "--data", data, "meter", "--category", "parking", "--out", tmp_path / "v.json")
    (tmp_path / "vendor.toml").write_text("[pricing]\nprice = 1\nmeter_interval = 0.05\n")
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
        sock.bind(("::1", 0))
        coap_port = sock.getsockname()[1]
    processes: list[subprocess.Popen[str]] = []
    try:
        broker = subprocess.Popen([sys.executable, "-m", "agents.cli", "broker", "run", "--data", str(tmp_path / "mq")],
                                  stdout=subprocess.PIPE, text=True)
        processes.append(broker)
        assert broker.stdout is not None
        url = re.search(r"mqtt://\S+", broker.stdout.readline()).group(0)  # type: ignore[union-attr]
        processes.append(subprocess.Popen([sys.executable, "-m", "agents.cli", "bank", "serve", "--data", str(data),
                                           "--broker", url], stderr=subprocess.DEVNULL, text=True))
        processes.append(subprocess.Popen([sys.executable, "-m", "agents.cli", "vendor", "serve", "--credentials",
                                           str(tmp_path / "v.json"), "--broker", url, "--coap-port", str(coap_port),
                                           "--config", str(tmp_path / "vendor.toml"), "--data",
                                           str(tmp_path / "vendor")], stderr=subprocess.DEVNULL, text=True))
        wallet = tmp_path / "wallet"
        assert "withdrew 1 coin" in m2mpay("user", "withdraw", "--wallet", wallet, "--credentials",
                                           tmp_path / "alice.json", "--broker", url, "--coins", "1").stdout
        deadline = time.monotonic() + 20
        while True:  # the vendor announces itself on CoAP once it has the bank's keys
            result = m2mpay("user", "pay", "--wallet", wallet, f"coap://[::1]:{coap_port}", "--units", "4", check=False)
            if result.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert "paid meter 5 token(s); credited 5" in result.stdout, result.stdout + result.stderr
        coins = json.loads(m2mpay("user", "wallet", "--wallet", wallet, "--json").stdout)
        assert [c["remaining"] for c in coins] == [95] and "seed" not in json.dumps(coins)
        assert m2mpay("bank", "balance", "--data", data, "meter").stdout.strip() == "5"
        assert '"reason": "within_policy"' in m2mpay("user", "decisions", "--wallet", wallet).stdout
    finally:
        for process in reversed(processes):
            process.send_signal(signal.SIGINT)
            process.wait(10)
    assert "audit passed" in m2mpay("bank", "audit", "--data", data).stdout


@pytest.mark.network
def test_user_killed_mid_session_never_reuses_a_token(tmp_path: Path) -> None:
    """kill -9 `user pay` mid-session; the next pay uses another coin; the books still balance."""
    import re
    import signal
    import socket
    import time

    data = tmp_path / "bank"
    m2mpay("bank", "init", "--data", data, "--bank", "bank-k")
    m2mpay("bank", "account", "open", "--data", data, "alice", "--out", tmp_path / "alice.json")
    m2mpay("bank", "account", "deposit", "--data", data, "alice", "1000")
    m2mpay("bank", "vendor", "enroll", "--data", data, "meter", "--category", "parking", "--out", tmp_path / "v.json")
    (tmp_path / "vendor.toml").write_text("[pricing]\nprice = 1\nmeter_interval = 0.05\n"
                                          "[session]\nidle_timeout = 1\n")
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
        sock.bind(("::1", 0))
        coap_port = sock.getsockname()[1]
    processes: list[subprocess.Popen[str]] = []
    wallet = tmp_path / "wallet"
    vendor_url = f"coap://[::1]:{coap_port}"
    try:
        broker = subprocess.Popen([sys.executable, "-m", "agents.cli", "broker", "run", "--data", str(tmp_path / "mq")],
                                  stdout=subprocess.PIPE, text=True)
        processes.append(broker)
        assert broker.stdout is not None
        url = re.search(r"mqtt://\S+", broker.stdout.readline()).group(0)  # type: ignore[union-attr]
        processes.append(subprocess.Popen([sys.executable, "-m", "agents.cli", "bank", "serve", "--data", str(data),
                                           "--broker", url], stderr=subprocess.DEVNULL, text=True))
        processes.append(subprocess.Popen([sys.executable, "-m", "agents.cli", "vendor", "serve", "--credentials",
                                           str(tmp_path / "v.json"), "--broker", url, "--coap-port", str(coap_port),
                                           "--config", str(tmp_path / "vendor.toml"), "--data",
                                           str(tmp_path / "vendor")], stderr=subprocess.DEVNULL, text=True))
        m2mpay("user", "withdraw", "--wallet", wallet, "--credentials", tmp_path / "alice.json", "--broker", url,
               "--coins", "2")
        deadline = time.monotonic() + 20
        while m2mpay("user", "pay", "--wallet", wallet, vendor_url, "--units", "1", check=False).returncode:
            assert time.monotonic() < deadline, "vendor never answered"
            time.sleep(0.2)
        victim = subprocess.Popen([sys.executable, "-m", "agents.cli", "user", "pay", "--wallet", str(wallet),
                                   vendor_url, "--units", "90"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.5)  # mid-session: some tokens paid at 20 per second
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
        coins = json.loads(m2mpay("user", "wallet", "--wallet", wallet, "--json").stdout)
        interrupted = next(c for c in coins if c["status"] == "in_session")
        result = m2mpay("user", "pay", "--wallet", wallet, vendor_url, "--units", "3")
        assert "paid meter 4 token(s)" in result.stdout  # with the other coin: the first stays blocked until T
        after = {c["tip"]: c for c in json.loads(m2mpay("user", "wallet", "--wallet", wallet, "--json").stdout)}
        assert after[interrupted["tip"]]["position"] == interrupted["position"]  # nothing reused
        time.sleep(2.5)  # the vendor settles the orphaned session once idle
    finally:
        for process in reversed(processes):
            process.send_signal(signal.SIGINT)
            process.wait(10)
    audit = m2mpay("bank", "audit", "--data", data).stdout
    assert "audit passed" in audit
    credited = int(re.search(r"credited (\d+)", audit).group(1))  # type: ignore[union-attr]
    lost = 100 - interrupted["position"] - 2  # written ahead by the killed session, beyond the first 2 tokens
    assert 2 + 4 + lost - 1 <= credited <= 2 + 4 + lost  # at most the token in flight is lost
