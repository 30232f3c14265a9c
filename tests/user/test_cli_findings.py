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

from tests.commands import m2mpay, one_line
from tests.town import Town, town

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


def _policy(tmp: Path, name: str, text: str) -> Path:
    path = tmp / f"{name}.toml"
    path.write_text(text)
    return path


def test_user_pay_outcomes_and_exit_codes(cli_town: Town, tmp_path: Path) -> None:
    t = cli_town
    before = _left(t.wallet)
    for units in ("0", "-3"):  # refused before anything is spent
        result = _pay(t, t.wallet, units)
        assert result.returncode == 2 and "positive" in one_line(result)
    assert _left(t.wallet) == before

    done = _pay(t, t.wallet, 2)
    assert done.returncode == 0 and "paid meter 20 token(s); credited 20" in done.stdout, done.stdout + done.stderr
    assert _left(t.wallet) == before - 20

    strict = _pay(t, t.wallet, 1, "--policy", _policy(tmp_path, "strict", "[price]\nmax_per_unit = 5\n"))
    assert strict.returncode == 3 and "price_too_high" in one_line(strict)
    bad = _pay(t, t.wallet, 1, "--policy", _policy(tmp_path, "bad", '[vendors]\ndeny = ["Casino"]\n'))
    assert bad.returncode == 2 and "'Casino'" in one_line(bad)

    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
        sock.bind(("::1", 0))
        nobody = f"coap://[::1]:{sock.getsockname()[1]}"
    unreachable = m2mpay("user", "pay", "--wallet", t.wallet, nobody, "--units", "1", check=False)
    assert unreachable.returncode == 5 and "unreachable" in one_line(unreachable)

    quick = _policy(tmp_path, "quick", UNLIMITED + "[session]\nmax_duration = 1\n")
    late = _pay(t, t.wallet, 30, "--policy", quick)
    assert late.returncode == 5, late.stdout + late.stderr
    assert "deadline" in one_line(late) and " of 30 unit(s) delivered" in late.stderr

    unlimited = _policy(tmp_path, "unlimited", UNLIMITED)
    small = tmp_path / "small"
    _withdraw(t, small, 1)
    exhausted = _pay(t, small, 30, "--policy", unlimited)
    assert exhausted.returncode == 3 and "coin_exhausted" in one_line(exhausted), exhausted.stderr
    assert "10 of 30 unit(s) delivered" in exhausted.stderr and _left(small) == 0

    big = tmp_path / "big"
    _withdraw(t, big, 2, value=1000)
    stopped = _pay(t, big, 60, "--policy", unlimited)  # the vendor closes after about 4 s
    assert stopped.returncode == 4 and "vendor_stopped" in one_line(stopped), stopped.stdout + stopped.stderr

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
    """One process per wallet, so the hourly budget holds: a payment while another process holds
    the wallet is refused as busy (exit 2, one line) and spends nothing; after a payment of 20, a
    second one would pass the budget of 30 and the policy refuses it (exit 3)."""
    from m2mpay.agents.user.lock import WalletLock

    t = cli_town
    wallet = tmp_path / "shared"
    _withdraw(t, wallet, 2)
    policy = _policy(tmp_path, "hourly", "[budget]\nper_hour = 30\n")  # one payment of 20 fits, two do not
    other = WalletLock(wallet)  # another payment from this wallet is under way
    try:
        busy = _pay(t, wallet, 2, "--policy", policy)
    finally:
        other.release()
    assert busy.returncode == 2 and "in use" in one_line(busy) and _left(wallet) == 200
    paid = _pay(t, wallet, 2, "--policy", policy)
    assert paid.returncode == 0 and _left(wallet) == 180, paid.stderr
    refused = _pay(t, wallet, 2, "--policy", policy)
    assert refused.returncode == 3 and _left(wallet) == 180, refused.stderr


def test_refused_withdrawal_cli_one_line_exit_4(cli_town: Town, tmp_path: Path) -> None:
    """The bank refuses: one line saying why, exit 4, the request and its secrets forgotten."""
    t = cli_town
    m2mpay("bank", "account", "open", "--data", t.bank, "poor", "--out", tmp_path / "poor.json")
    m2mpay("bank", "account", "deposit", "--data", t.bank, "poor", "50")
    wallet = tmp_path / "poor"
    args = ("user", "withdraw", "--wallet", wallet, "--credentials", tmp_path / "poor.json", "--broker", t.broker)
    refused = m2mpay(*args, "--coins", "1", check=False)
    assert refused.returncode == 4 and "insufficient_funds" in one_line(refused), refused.stderr
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
    from m2mpay.protocol.rules.keyring import default_withdrawal

    t = cli_town
    wallet = tmp_path / "resent"
    _withdraw(t, wallet, 1)
    agent = UserAgent(wallet)
    try:  # a withdrawal of 2 written ahead, as if its answer had been lost
        credentials = UserCredentials.load(t.credentials)
        keyring = agent.keyring()
        info = default_withdrawal(keyring.keysets.values())  # the 1.00 EUR coin, as a withdrawal picks it
        assert info is not None
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


def test_empty_wallet_refusal_says_how_to_get_coins(cli_town: Town, tmp_path: Path) -> None:
    t = cli_town
    wallet = tmp_path / "empty"
    assert _withdraw(t, wallet, 0).stdout.strip() == "withdrew 0 coin(s)"  # the bank's keys, no coin
    result = _pay(t, wallet, 1)
    assert result.returncode == 3
    assert one_line(result) == ("m2mpay: refused by policy: no_coin: no usable coin in the wallet; withdraw coins "
                                 "with 'm2mpay user withdraw' ('m2mpay user status' shows what the wallet holds)")


def test_deadline_too_far_says_both_numbers(cli_town: Town, tmp_path: Path) -> None:
    """The vendor blocks for 45 s; this policy allows 10 + 30 s of clock skew."""
    t = cli_town
    wallet = tmp_path / "near"
    _withdraw(t, wallet, 1)
    result = _pay(t, wallet, 1, "--policy", _policy(tmp_path, "near", "[deadline]\nmax_ahead = 10\nclock_skew = 30\n"))
    (entry,) = [json.loads(line) for line in (wallet / "decisions.jsonl").read_text().splitlines()]
    asked = entry["deadline"] - entry["now"]
    assert result.returncode == 3 and entry["max_ahead"] == 40
    assert one_line(result) == (f"m2mpay: refused by policy: deadline_too_far: the vendor would block the coin for "
                                 f"{asked} s; the policy allows at most 40 s (deadline.max_ahead 10 + clock_skew 30)")


def test_pay_progress_quiet_and_json(cli_town: Town, tmp_path: Path) -> None:
    """Off a terminal each event is a line as it happens; --quiet only the outcome; --json only its JSON."""
    t = cli_town
    wallet = tmp_path / "progress"
    _withdraw(t, wallet, 1)
    shown = _pay(t, wallet, 2)  # 2 units at 10, tokens of 1: 20 tokens, the blocking one the first
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0] == "offer: meter, 10 per unit; 2 unit(s) within policy"
    assert re.fullmatch(r"session: 20 token\(s\) of 0\.01 EUR owed; blocking token sent: 0/2 unit\(s\), "
                        r"1/20 token\(s\), 0\.01 EUR, \d+ s left", lines[1]), lines[1]
    paid = [line for line in lines if line.startswith("paid ") and "unit(s)" in line]
    assert paid and re.fullmatch(r"paid \d+ token\(s\): 2/2 unit\(s\), 20/20 token\(s\), 0\.20 EUR, \d+ s left",
                                 paid[-1]), paid
    assert lines[-2:] == ["closed: 2 of 2 unit(s) delivered; stopped: complete", "paid meter 20 token(s); credited 20"]

    quiet = _pay(t, wallet, 1, "--quiet")
    assert quiet.stdout == "paid meter 10 token(s); credited 10\n"

    as_json = json.loads(_pay(t, wallet, 1, "--json").stdout)
    assert as_json == {"vendor": "meter", "complete": True, "asked": 1, "delivered": 1, "tokens": 10, "spent": 10,
                       "credited": 10, "stop": "complete", "detail": ""}

    small = tmp_path / "small-json"
    _withdraw(t, small, 1)
    unlimited = _policy(tmp_path, "unlimited", UNLIMITED)
    short = _pay(t, small, 30, "--policy", unlimited, "--json")  # the coin holds 10 units' worth
    assert short.returncode == 3 and "coin_exhausted" in one_line(short)
    assert json.loads(short.stdout) == {"vendor": "meter", "complete": False, "asked": 30, "delivered": 10,
                                        "tokens": 100, "spent": 100, "credited": 100, "stop": "coin_exhausted",
                                        "detail": "the coin ran out with 200 token(s) owed"}


def test_withdraw_and_decisions_as_json(cli_town: Town, tmp_path: Path) -> None:
    t = cli_town
    wallet = tmp_path / "json"
    keys = json.loads(m2mpay("bank", "keys", "--data", t.bank, "--json").stdout)
    keyset = next(k["id"] for k in keys["keysets"] if k["value"] == 100)
    out = m2mpay("user", "withdraw", "--wallet", wallet, "--credentials", t.credentials, "--broker", t.broker,
                 "--coins", "2", "--keyset", keyset, "--json")
    assert json.loads(out.stdout) == {"coins": 2, "value": 200, "recovered": 0, "recovered_value": 0, "refused": []}
    assert _pay(t, wallet, 1).returncode == 0
    decisions = json.loads(m2mpay("user", "decisions", "--wallet", wallet, "--json").stdout)
    assert [d["action"] for d in decisions] == ["offer", "coin", "pay", "close"]
    for d in decisions:
        assert d["time"] == time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(d["ts"]))
    assert (decisions[0]["reason"], decisions[0]["unit_price"], decisions[-1]["reason"]) == (
        "within_policy", 10, "complete")
    plain = m2mpay("user", "decisions", "--wallet", wallet).stdout.splitlines()
    assert [json.loads(line)["action"] for line in plain] == ["offer", "coin", "pay", "close"]


def test_user_status_spendable_in_session_uncertain_pending(cli_town: Town, tmp_path: Path) -> None:
    """Four coins put where a crash or a session leaves them, and a withdrawal whose answer is lost."""
    from m2mpay.agents.user.agent import UserAgent, UserCredentials
    from m2mpay.protocol import envelope
    from m2mpay.protocol.rules import wallet as rules
    from m2mpay.protocol.rules.keyring import default_withdrawal

    t = cli_town
    wallet = tmp_path / "status"
    _withdraw(t, wallet, 4)
    now = int(time.time())
    agent = UserAgent(wallet)
    try:
        (a, _), (b, _), (c, _), _ = agent.store.coins()
        held, _ = rules.authorize(a, deadline=now + 600, nonce=bytes(16), cert_hash=bytes(32), now=now)
        agent.store.save(held, frozenset({"meter"}))
        lost, _ = rules.authorize(b, deadline=now + 300, nonce=bytes(16), cert_hash=bytes(32), now=now)
        agent.store.save(lost.event(rules.WalletEvent.LOST))
        lapsed, _ = rules.authorize(c, deadline=now - 1, nonce=bytes(16), cert_hash=bytes(32), now=now - 60)
        agent.store.save(lapsed, frozenset({"meter"}))  # its block has lapsed: spendable again
        credentials = UserCredentials.load(t.credentials)
        keyring = agent.keyring()
        info = default_withdrawal(keyring.keysets.values())  # the 1.00 EUR coin, as a withdrawal picks it
        assert info is not None
        pending = rules.prepare_withdrawal(credentials.account, info, keyring.rsa_keys[info.id], 3)
        signed = envelope.sign_request(pending.request, credentials.key, credentials.account, credentials.bank,
                                       "withdraw")
        agent.store.begin_withdrawal(pending, signed, now, value=3 * info.value)
    finally:
        agent.close()
    status = json.loads(m2mpay("user", "status", "--wallet", wallet, "--json").stdout)
    assert status["currency"] == "EUR" and status["spent_coins"] == 0
    assert (status["spendable"]["coins"], status["spendable"]["value"]) == (2, 199)  # c paid its blocking token
    (session,) = status["in_session"]["list"]
    assert (session["tip"], session["remaining"], session["vendors"]) == (a.coin.tip.hex(), 99, ["meter"])
    assert session["deadline"] == time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now + 600))
    (uncertain,) = status["uncertain"]["list"]
    assert (uncertain["tip"], uncertain["remaining"]) == (b.coin.tip.hex(), 99)
    assert uncertain["deadline"] == time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now + 300))
    assert status["pending_withdrawals"]["count"] == 1 and status["pending_withdrawals"]["value"] == 300
    assert status["pending_withdrawals"]["list"][0]["coins"] == 3
    text = m2mpay("user", "status", "--wallet", wallet).stdout.splitlines()
    assert text[0] == "spendable    1.99 EUR in 2 coin(s)"
    assert text[1] == "in session   0.99 EUR in 1 coin(s)"
    assert text[2].startswith(f"  {a.coin.tip.hex()[:16]}  0.99 EUR at meter until ")
    assert text[-3] == ("withdrawals  1 waiting for the bank's answer (3.00 EUR); 'm2mpay user withdraw --coins 0' "
                        "completes them")
    assert text[-2] == "spent        0 coin(s)"
    # A wallet `user withdraw` created: its seed exists and was never shown.
    assert status["seed"] == "not_shown"
    assert text[-1] == "seed         never shown: 'm2mpay user init --wallet DIR' shows it once"


def test_pay_progress_on_a_terminal_is_one_line_redrawn(cli_town: Town, tmp_path: Path) -> None:
    import os
    import pty

    t = cli_town
    wallet = tmp_path / "terminal"
    _withdraw(t, wallet, 1)
    main, child = pty.openpty()
    payer = subprocess.Popen([sys.executable, "-m", "m2mpay.agents.cli", "user", "pay", "--wallet", str(wallet),
                              t.vendor, "--units", "2"], stdout=child, stderr=subprocess.PIPE)
    os.close(child)
    shown = b""
    while True:
        try:
            chunk = os.read(main, 4096)
        except OSError:  # EIO: the payer closed its end
            break
        if not chunk:
            break
        shown += chunk
    os.close(main)
    assert payer.wait(60) == 0, payer.stderr.read() if payer.stderr else ""
    text = shown.decode()
    frames = [frame for frame in text.split("\r\x1b[K") if frame]
    assert re.fullmatch(r"meter: 2/2 unit\(s\), 20/20 token\(s\), 0\.20 EUR, \d+ s left", frames[-2]), frames
    assert frames[-1] == "paid meter 20 token(s); credited 20\r\n"  # after the line was erased
    assert "offer:" not in text  # no event lines on a terminal


def test_user_run_prints_each_event_as_it_happens(cli_town: Town, tmp_path: Path) -> None:
    """``user run`` off a terminal: the round's choice and the payment's events, one line each, then
    the outcome; ``--quiet`` only the outcome."""
    t = cli_town
    wallet = tmp_path / "runner"
    _withdraw(t, wallet, 1)
    config = tmp_path / "user.toml"
    config.write_text(f'wallet = "{wallet}"\ncredentials = "{t.credentials}"\nbroker = "{t.broker}"\n'
                      f'vendors = ["{t.vendor}"]\nunits = 1\nrounds = 1\ninterval = 0\n')
    shown = m2mpay("user", "run", "--config", config).stdout.splitlines()
    assert shown[:3] == ["refill: enough_value: wallet holds 100, refill below 0",
                         "choose: cheapest_allowed: meter at 10 per unit",
                         "offer: meter, 10 per unit; 1 unit(s) within policy"], shown
    assert re.fullmatch(r"paid 9 token\(s\): 1/1 unit\(s\), 10/10 token\(s\), 0\.10 EUR, \d+ s left", shown[-3])
    assert shown[-2:] == ["closed: 1 of 1 unit(s) delivered; stopped: complete", "paid meter 10 token(s); credited 10"]
    quiet = m2mpay("user", "run", "--config", config, "--quiet").stdout
    assert quiet == "paid meter 10 token(s); credited 10\n"
