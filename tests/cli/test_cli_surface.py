"""The operating command line's smaller promises, each as a user meets it: one line and an exit
status for a mistake, money with its decimals, machine output with stable keys, one vendor per
data directory and per CoAP port."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from m2mpay.broker.launcher import free_udp_port

from tests.commands import CLI, m2mpay, one_line
from tests.processes import wait_for_text


@pytest.fixture()
def bank(tmp_path: Path, bank_id: str) -> Path:
    data = tmp_path / "bank"
    m2mpay("bank", "init", "--data", data, "--bank", bank_id)
    m2mpay("bank", "account", "open", "--data", data, "alice", "--out", tmp_path / "alice.json")
    m2mpay("bank", "vendor", "enroll", "--data", data, "meter", "--category", "parking", "--out", tmp_path / "v.json")
    return data


@pytest.mark.parametrize("args, line", [
    (["bank", "balance", "--data", "{bank}", "nobody"],
     "m2mpay: bank: no account or vendor named 'nobody' in this bank"),
    (["bank", "account", "deposit", "--data", "{bank}", "nobody", "5"],
     "m2mpay: bank: no account named 'nobody' in this bank"),
    (["bank", "vendor", "revoke", "--data", "{bank}", "nobody"], "m2mpay: bank: no vendor named 'nobody' in this bank"),
])
def test_unknown_names_are_one_line_not_a_key_error(bank: Path, args: list[str], line: str) -> None:
    result = m2mpay(*[a.format(bank=bank) for a in args], check=False)
    assert (result.returncode, one_line(result.stderr)) == (2, line)


def test_user_credentials_given_to_vendor_serve(bank: Path, tmp_path: Path) -> None:
    result = m2mpay("vendor", "serve", "--credentials", tmp_path / "alice.json", "--broker", "mqtt://127.0.0.1:1",
                    "--data", tmp_path / "vendor", check=False)
    assert result.returncode == 2
    assert one_line(result.stderr) == (f"m2mpay: vendor: {tmp_path / 'alice.json'} is not a vendor's credentials "
                                        "(no 'vendor' field): give the file 'm2mpay bank vendor enroll --out' wrote")
    assert not (tmp_path / "vendor").exists()  # refused before anything was made


def test_bank_keys_shows_money_with_its_decimals(bank: Path) -> None:
    lines = m2mpay("bank", "keys", "--data", bank).stdout.splitlines()
    shown = [re.sub(r"ks-[0-9a-f]+", "ID", line).strip() for line in lines[1:]]
    # The coins to withdraw first (the wallets' default marked), then the change for exchanges.
    assert shown == [
        "to withdraw (2):",
        "ID  coin 1.00 EUR in 100 tokens of 0.01 EUR  (wallets' default)",
        "ID  coin 10.00 EUR in 1000 tokens of 0.01 EUR",
        "change, for exchanges (10): 1, 2, 4, 8, 16, 32, 64, 128, 256, 512 tokens of 0.01 EUR",
        "ID  coin 0.01 EUR in 1 token of 0.01 EUR",
        *(f"ID  coin {n // 100}.{n % 100:02d} EUR in {n} tokens of 0.01 EUR"
          for n in (2, 4, 8, 16, 32, 64, 128, 256, 512)),
    ]


def test_balance_and_audit_as_json(bank: Path) -> None:
    m2mpay("bank", "account", "deposit", "--data", bank, "alice", "700")
    assert json.loads(m2mpay("bank", "balance", "--data", bank, "alice", "--json").stdout) == {
        "name": "alice", "balance": 700}
    assert json.loads(m2mpay("bank", "audit", "--data", bank, "--json").stdout) == {
        "ok": True, "withdrawn": 0, "credited": 0, "outstanding": 0, "coins": 0, "problems": []}


def test_audit_json_exits_1_with_its_problems(bank: Path) -> None:
    import sqlite3

    m2mpay("bank", "account", "deposit", "--data", bank, "alice", "700")
    with sqlite3.connect(bank / "bank.sqlite3") as db:  # money from nowhere
        db.execute("UPDATE accounts SET balance = balance + 1 WHERE name = 'alice'")
    result = m2mpay("bank", "audit", "--data", bank, "--json", check=False)
    report = json.loads(result.stdout)
    assert result.returncode == 1 and report["ok"] is False and len(report["problems"]) == 1
    assert "alice" in report["problems"][0]


def _vendor(tmp_path: Path, broker: str, data: Path, port: int) -> list[str]:
    return [*CLI, "vendor", "serve", "--credentials", str(tmp_path / "v.json"), "--broker", broker,
            "--coap-port", str(port), "--data", str(data)]


def _wait_for_lock(data: Path, pid: int) -> None:
    deadline = time.monotonic() + 15
    lock = data / "serve.lock"
    while not (lock.exists() and lock.read_text().strip() == str(pid)):
        assert time.monotonic() < deadline, "the first vendor never locked its directory"
        time.sleep(0.05)


def test_second_vendor_serve_on_one_data_directory_refused(bank: Path, tmp_path: Path, mosquitto: str) -> None:
    """No bank answers here, so the first vendor waits for the keys with its directory locked."""
    data = tmp_path / "vendor"
    first = subprocess.Popen(_vendor(tmp_path, mosquitto, data, free_udp_port()), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        _wait_for_lock(data, first.pid)
        second = m2mpay(*_vendor(tmp_path, mosquitto, data, free_udp_port())[3:], check=False)
        assert second.returncode == 2
        assert one_line(second.stderr) == (f"m2mpay: vendor: {data} is in use by another vendor serve "
                                            f"(pid {first.pid}): one process per data directory")
    finally:
        first.send_signal(signal.SIGINT)
        first.wait(15)


@pytest.mark.network  # vendor serve binds a CoAP socket
def test_vendor_serve_on_a_coap_port_in_use_refused(bank: Path, tmp_path: Path) -> None:
    """aiocoap binds with SO_REUSEPORT, and so would a second server on the port: the kernel then
    spreads payments over both. The port is held here the way a serving vendor holds it."""
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as held:
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        held.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        held.bind(("::1", 0))
        port = held.getsockname()[1]
        result = m2mpay(*_vendor(tmp_path, "mqtt://127.0.0.1:1", tmp_path / "vendor", port)[3:], check=False)
    assert result.returncode == 2
    assert one_line(result.stderr) == (f"m2mpay: vendor: CoAP port [::1]:{port} is in use by another process: "
                                        "give another --coap-port")
    assert not (tmp_path / "vendor" / "vendor.sqlite3").exists()


def test_bench_help_has_no_raw_markup() -> None:
    text = m2mpay("bench", "--help").stdout
    assert "``" not in text and "[bold" not in text
    assert "Sections (--only picks some): protocol (hash-chain traversal" in " ".join(text.split())


def test_every_help_text_is_plain() -> None:
    """reST quotes or rich markup in a description show up raw in ``--help``."""
    import argparse

    from m2mpay.agents.cli import build_parser

    def texts(parser: argparse.ArgumentParser) -> list[str]:
        found = [parser.description or ""]
        for action in parser._actions:
            found.append(action.help or "")
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    found += texts(sub)
        return found

    raw = [t for t in texts(build_parser()) if "``" in t or re.search(r"\[/?(bold|red|green|yellow)\]", t)]
    assert raw == []


def test_python_m_m2mpay_is_the_same_command() -> None:
    result = subprocess.run([sys.executable, "-m", "m2mpay", "--version"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.startswith("m2mpay ")


@pytest.mark.parametrize("line, words", [
    ("m2mpay user st", ["status"]),
    ("m2mpay broker pki ", ["add-client", "revoke"]),
    ("m2mpay user pay --q", ["--quiet"]),
])
def test_bash_completion_is_generated_from_the_parser(tmp_path: Path, line: str, words: list[str]) -> None:
    script = tmp_path / "m2mpay.bash"
    script.write_text(m2mpay("completion", "bash").stdout)
    typed = line.split(" ")
    probe = (f"source {script}\nCOMP_WORDS=({' '.join(repr(w) for w in typed)})\nCOMP_CWORD={len(typed) - 1}\n"
             f"COMP_LINE={line!r}\nCOMP_POINT=${{#COMP_LINE}}\n"
             f"_shtab_m2mpay m2mpay {typed[-1]!r} {typed[-2]!r}\nprintf '%s\\n' \"${{COMPREPLY[@]}}\"\n")
    result = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, timeout=30)
    assert sorted(result.stdout.split()) == words, result.stderr


@pytest.mark.parametrize("minor, currency, shown", [
    (1000, "EUR", "10.00 EUR"), (1, "EUR", "0.01 EUR"), (0, "EUR", "0.00 EUR"), (-250, "EUR", "-2.50 EUR"),
    (1000, "JPY", "1000 JPY"), (1234, "KWD", "1.234 KWD"), (10**20 + 7, "EUR", "1000000000000000000.07 EUR"),
])
def test_money_is_shown_with_its_currencys_decimals(minor: int, currency: str, shown: str) -> None:
    from m2mpay.agents.money import format_money

    assert format_money(minor, currency) == shown


def test_progress_lines_off_a_terminal() -> None:
    """The figures of a payment as the wallet's decisions give them, with the clock injected."""
    import io

    from m2mpay.agents.policy.engine import Decision
    from m2mpay.agents.user.progress import PaymentProgress

    now = [100.0]
    out = io.StringIO()
    progress = PaymentProgress(out, 3, 60, "EUR", terminal=False, clock=lambda: now[0])
    progress("offer", Decision(True, "within_policy", "", {"vendor": "charger", "amount": 9, "unit_price": 3}))
    progress("coin", Decision(True, "best_fit", "", {"tokens": 3, "token_value": 3, "remaining": 300}))
    now[0] += 10
    progress("pay", Decision(True, "within_policy", "", {"vendor": "charger", "amount": 3, "unit_price": 3}))
    progress("pay", Decision(False, "hourly_budget", "3 more would exceed the hourly budget", {}))
    progress("close", Decision(False, "policy", "2 of 3 unit(s) delivered; stopped: policy", {}))
    assert out.getvalue().splitlines() == [
        "offer: charger, 3 per unit; 3 unit(s) within policy",
        "session: 3 token(s) of 0.03 EUR owed; blocking token sent: 1/3 unit(s), 1/3 token(s), 0.03 EUR, 60 s left",
        "paid 1 token(s): 2/3 unit(s), 2/3 token(s), 0.06 EUR, 50 s left",
        "policy stopped the payment: hourly_budget: 3 more would exceed the hourly budget",
        "closed: 2 of 3 unit(s) delivered; stopped: policy",
    ]


@pytest.mark.network  # starts Mosquitto
def test_second_broker_run_on_one_data_directory_refused(tmp_path: Path) -> None:
    from m2mpay.broker.launcher import free_port


    out = tmp_path / "first.out"
    with out.open("w") as sink:
        first = subprocess.Popen([*CLI, "broker", "run", "--data", str(tmp_path / "mq"), "--port", str(free_port())],
                                 stdout=sink, stderr=subprocess.STDOUT)
    try:
        wait_for_text(out, "listening")
        second = m2mpay("broker", "run", "--data", tmp_path / "mq", "--port", str(free_port()), check=False)
        assert second.returncode == 2
        assert one_line(second.stderr) == (f"m2mpay: broker: {tmp_path / 'mq'} is in use by another broker run "
                                            f"(pid {first.pid}): one process per data directory")
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(10)
