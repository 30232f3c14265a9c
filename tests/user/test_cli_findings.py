"""``m2mpay user pay`` and ``user withdraw`` as a user runs them: what was done, why not, and the exit code.

One town for the module: Mosquitto, ``bank serve`` and ``vendor serve`` as processes. The vendor
charges 10 a unit (10 tokens of 1), asks every 0.2 s (50 tokens a second) and closes its sessions on its
own about 4 s after they open (its deadline is 45 s ahead, and it settles 41 s before it).
"""

from __future__ import annotations

import json
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cli.test_bank_cli import m2mpay
from tests.cli.test_processes import Town, town

pytestmark = pytest.mark.network

VENDOR = ("[pricing]\nprice = 10\nmeter_interval = 0.2\n"
          "[session]\nblock_window = 45\nsettle_margin = 41\nidle_timeout = 60\n")
UNLIMITED = "\n".join([
    '[budget]\nper_hour = "unlimited"\nper_day = "unlimited"\nper_session = "unlimited"',
    '[vendors]\nmax_per_day = "unlimited"', '[categories]\nmax_per_day = "unlimited"', ""])


@pytest.fixture(scope="module")
def cli_town(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Town]:
    tmp = tmp_path_factory.mktemp("cli-town")
    with town(tmp, VENDOR) as t:
        m2mpay("bank", "account", "deposit", "--data", t.bank, "alice", "9000")
        _withdraw(t, t.wallet, 2)
        deadline = time.monotonic() + 30
        while m2mpay("user", "pay", "--wallet", t.wallet, t.vendor, "--units", "1", check=False).returncode:
            assert time.monotonic() < deadline, "the vendor never served"
            time.sleep(0.3)
        yield t


def _withdraw(t: Town, wallet: Path, coins: int, value: int = 100) -> subprocess.CompletedProcess[str]:
    keys = json.loads(m2mpay("bank", "keys", "--data", t.bank, "--json").stdout)
    keyset = next(k["id"] for k in keys["keysets"] if k["value"] == value)
    return m2mpay("user", "withdraw", "--wallet", wallet, "--credentials", t.credentials, "--broker", t.broker,
                  "--coins", str(coins), "--keyset", keyset)


def _pay(t: Town, wallet: Path, units: int | str, *extra: str | Path) -> subprocess.CompletedProcess[str]:
    return m2mpay("user", "pay", "--wallet", wallet, t.vendor, "--units", str(units), *extra, check=False)


def _coins(wallet: Path) -> list[dict[str, object]]:
    return json.loads(m2mpay("user", "wallet", "--wallet", wallet, "--json").stdout)  # type: ignore[no-any-return]


def _left(wallet: Path) -> int:
    return sum(int(c["remaining"]) for c in _coins(wallet))  # type: ignore[call-overload]


def _one_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def _policy(tmp: Path, name: str, text: str) -> Path:
    path = tmp / f"{name}.toml"
    path.write_text(text)
    return path


def test_user_pay_outcomes_and_exit_codes(cli_town: Town, tmp_path: Path) -> None:
    t = cli_town
    before = _left(t.wallet)
    for units in ("0", "-3"):  # refused before anything is spent
        result = _pay(t, t.wallet, units)
        assert result.returncode == 2 and "positive" in _one_line(result)
    assert _left(t.wallet) == before

    done = _pay(t, t.wallet, 2)
    assert done.returncode == 0 and "paid meter 20 token(s); credited 20" in done.stdout, done.stdout + done.stderr
    assert _left(t.wallet) == before - 20

    strict = _pay(t, t.wallet, 1, "--policy", _policy(tmp_path, "strict", "[price]\nmax_per_unit = 5\n"))
    assert strict.returncode == 3 and "price_too_high" in _one_line(strict)
    bad = _pay(t, t.wallet, 1, "--policy", _policy(tmp_path, "bad", '[vendors]\ndeny = ["Casino"]\n'))
    assert bad.returncode == 2 and "'Casino'" in _one_line(bad)

    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
        sock.bind(("::1", 0))
        nobody = f"coap://[::1]:{sock.getsockname()[1]}"
    unreachable = m2mpay("user", "pay", "--wallet", t.wallet, nobody, "--units", "1", check=False)
    assert unreachable.returncode == 5 and "unreachable" in _one_line(unreachable)

    quick = _policy(tmp_path, "quick", UNLIMITED + "[session]\nmax_duration = 1\n")
    late = _pay(t, t.wallet, 30, "--policy", quick)
    assert late.returncode == 5, late.stdout + late.stderr
    assert "deadline" in _one_line(late) and " of 30 unit(s) delivered" in late.stderr

    unlimited = _policy(tmp_path, "unlimited", UNLIMITED)
    small = tmp_path / "small"
    _withdraw(t, small, 1)
    exhausted = _pay(t, small, 30, "--policy", unlimited)
    assert exhausted.returncode == 3 and "coin_exhausted" in _one_line(exhausted), exhausted.stderr
    assert "10 of 30 unit(s) delivered" in exhausted.stderr and _left(small) == 0

    big = tmp_path / "big"
    _withdraw(t, big, 2, value=1000)
    stopped = _pay(t, big, 60, "--policy", unlimited)  # the vendor closes after about 4 s
    assert stopped.returncode == 4 and "vendor_stopped" in _one_line(stopped), stopped.stdout + stopped.stderr

    held = {c["tip"] for c in _coins(big) if c["status"] == "in_session"}  # blocked until the vendor's T
    payer = subprocess.Popen([sys.executable, "-m", "m2mpay.agents.cli", "user", "pay", "--wallet", str(big), t.vendor,
                              "--units", "60", "--policy", str(unlimited)], text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 20
    while not any(c["status"] == "in_session" and c["tip"] not in held and c["position"] != 1000
                  for c in _coins(big)):
        assert time.monotonic() < deadline and payer.poll() is None, "the payment never got going"
        time.sleep(0.1)
    payer.send_signal(signal.SIGINT)
    _, err = payer.communicate(timeout=30)
    assert payer.returncode == 130 and "interrupted" in err and len(err.strip().splitlines()) == 1, err


def test_two_payments_one_wallet_respect_budget(cli_town: Town, tmp_path: Path) -> None:
    """Two ``user pay`` at once on one wallet: one process per wallet, so the hourly budget holds."""
    t = cli_town
    wallet = tmp_path / "shared"
    _withdraw(t, wallet, 2)
    policy = _policy(tmp_path, "hourly", "[budget]\nper_hour = 30\n")  # one payment of 20 fits, two do not
    payers = [subprocess.Popen([sys.executable, "-m", "m2mpay.agents.cli", "user", "pay", "--wallet", str(wallet), t.vendor,
                                "--units", "2", "--policy", str(policy)], text=True, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE) for _ in range(2)]
    results = [(p.wait(60), *p.communicate()) for p in payers]
    gone = 200 - _left(wallet)
    assert gone <= 30, f"paid {gone} against a budget of 30: {results}"
    codes = sorted(code for code, _, _ in results)
    assert codes in ([0, 2], [0, 3]), results
    if codes == [0, 2]:
        busy = next(err for code, _, err in results if code == 2)
        assert "in use" in busy and len(busy.strip().splitlines()) == 1


def test_refused_withdrawal_cli_one_line_exit_4(cli_town: Town, tmp_path: Path) -> None:
    """The bank refuses: one line saying why, exit 4, the request and its secrets forgotten."""
    t = cli_town
    m2mpay("bank", "account", "open", "--data", t.bank, "poor", "--out", tmp_path / "poor.json")
    m2mpay("bank", "account", "deposit", "--data", t.bank, "poor", "50")
    wallet = tmp_path / "poor"
    args = ("user", "withdraw", "--wallet", wallet, "--credentials", tmp_path / "poor.json", "--broker", t.broker)
    refused = m2mpay(*args, "--coins", "1", check=False)
    assert refused.returncode == 4 and "insufficient_funds" in _one_line(refused), refused.stderr
    with sqlite3.connect(wallet / "wallet.sqlite3") as db:
        assert db.execute("SELECT count(*) FROM withdrawals").fetchone() == (0,)
    assert m2mpay(*args, "--coins", "-1", check=False).returncode == 2
    m2mpay("bank", "account", "deposit", "--data", t.bank, "poor", "100")
    again = m2mpay(*args, "--coins", "1")
    assert again.stdout.strip() == "withdrew 1 coin(s)" and again.stderr == ""
    assert m2mpay("bank", "balance", "--data", t.bank, "poor").stdout.strip() == "50"


def test_withdraw_says_when_the_count_differs(cli_town: Town, tmp_path: Path) -> None:
    """An earlier withdrawal whose answer was lost completes with the new one: the output says so."""
    from m2mpay.agents.user.agent import UserAgent, UserCredentials
    from m2mpay.protocol import envelope
    from m2mpay.protocol.rules import wallet as rules

    t = cli_town
    wallet = tmp_path / "resent"
    _withdraw(t, wallet, 1)
    agent = UserAgent(wallet)
    try:  # a withdrawal of 2 written ahead, as if its answer had been lost
        credentials = UserCredentials.load(t.credentials)
        keyring = agent.keyring()
        info = min(keyring.keysets.values(), key=lambda k: k.value)
        pending = rules.prepare_withdrawal(credentials.account, info, keyring.rsa_keys[info.id], 2)
        signed = envelope.sign_request(pending.request, credentials.key, credentials.account, credentials.bank,
                                       "withdraw")
        agent.store.begin_withdrawal(pending, signed, agent.now(), value=2 * info.value)
    finally:
        agent.close()
    result = _withdraw(t, wallet, 1)
    assert result.stdout.splitlines() == ["withdrew 1 coin(s)",
                                          "also 2 coin(s) of an earlier withdrawal whose answer had not arrived"]
    assert len(_coins(wallet)) == 4


def test_user_receipts_cli(cli_town: Town, tmp_path: Path) -> None:
    """``user receipts`` lists the vendor's signed final receipts; ``--json`` keys are stable and
    each entry carries what proves it: the receipt and the certificate of the key that signed it."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from m2mpay.protocol import cose
    from m2mpay.protocol.messages import CertificateBody, FinalReceipt
    from m2mpay.protocol.receipts import AAD_RECEIPT

    t = cli_town
    wallet = tmp_path / "receipts"
    _withdraw(t, wallet, 1)
    empty = m2mpay("user", "receipts", "--wallet", wallet, "--json")
    assert json.loads(empty.stdout) == []
    assert _pay(t, wallet, 2).returncode == 0  # 2 units at 10, tokens of 1: 20 tokens
    (entry,) = json.loads(m2mpay("user", "receipts", "--wallet", wallet, "--json").stdout)
    assert sorted(entry) == ["cert", "credited", "index", "pending", "receipt", "session", "time", "tip", "tokens",
                             "vendor"]
    (coin,) = _coins(wallet)
    assert (entry["vendor"], entry["tokens"], entry["credited"], entry["pending"]) == ("meter", 20, 20, False)
    assert (entry["tip"], entry["index"]) == (coin["tip"], coin["position"]) and len(entry["session"]) == 32
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", entry["time"]), entry["time"]
    # Anyone holding the bank CA's key can check it: the certificate names the key, the key signed the receipt.
    body = CertificateBody.decode(cose.decode_sign1(bytes.fromhex(entry["cert"])).payload)
    signed = cose.verify_sign1(bytes.fromhex(entry["receipt"]), Ed25519PublicKey.from_public_bytes(body.key),
                               AAD_RECEIPT)
    assert FinalReceipt.decode(signed.payload).credited == 20 and body.vendor == "meter"
    plain = m2mpay("user", "receipts", "--wallet", wallet).stdout.splitlines()
    assert plain[0] == "1 receipt(s)" and "meter" in plain[1] and "20 token(s)" in plain[1], plain
