"""Every role as its own process, driven only through the commands an operator and a user run."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.commands import m2mpay
from tests.processes import popen
from tests.town import Town, first_payment, town
from tests.waiting import wait_until

pytestmark = pytest.mark.network


def test_every_role_as_its_own_process(tmp_path: Path) -> None:
    with town(tmp_path, "[pricing]\nprice = 1\nmeter_interval = 0.05\n") as t:
        assert "withdrew 1 coin" in m2mpay("user", "withdraw", "--wallet", t.wallet, "--credentials",
                                           t.credentials, "--broker", t.broker, "--coins", "1").stdout
        result = first_payment(t, 4)  # 4 units at 1, tokens of 1: 4 tokens, the blocking one the first
        assert "paid meter 4 token(s); credited 4" in result.stdout, result.stdout + result.stderr
        coins = json.loads(m2mpay("user", "wallet", "--wallet", t.wallet, "--json").stdout)
        assert [c["remaining"] for c in coins] == [96] and "seed" not in json.dumps(coins)
        assert m2mpay("bank", "balance", "--data", t.bank, "meter").stdout.strip() == "4"
        assert '"reason": "within_policy"' in m2mpay("user", "decisions", "--wallet", t.wallet).stdout
    assert "audit passed" in m2mpay("bank", "audit", "--data", t.bank).stdout


def test_user_killed_mid_session_never_reuses_a_token(tmp_path: Path) -> None:
    """kill -9 `user pay` mid-session; the next pay uses another coin; the books still balance."""
    with town(tmp_path, "[pricing]\nprice = 1\nmeter_interval = 0.05\n[session]\nidle_timeout = 1\n") as t:
        m2mpay("user", "withdraw", "--wallet", t.wallet, "--credentials", t.credentials, "--broker", t.broker,
               "--coins", "2")
        assert first_payment(t, 1).returncode == 0
        victim = popen("user", "pay", "--wallet", t.wallet, t.vendor, "--units", "90",
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while not any(c["status"] == "in_session" and c["position"] < 95 for c in  # mid-session, tokens paid
                      json.loads(m2mpay("user", "wallet", "--wallet", t.wallet, "--json").stdout)):
            assert time.monotonic() < deadline and victim.poll() is None, "the payment never got going"
            time.sleep(0.1)
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
        coins = json.loads(m2mpay("user", "wallet", "--wallet", t.wallet, "--json").stdout)
        interrupted = next(c for c in coins if c["status"] == "in_session")
        result = m2mpay("user", "pay", "--wallet", t.wallet, t.vendor, "--units", "3")
        assert "paid meter 3 token(s)" in result.stdout  # with the other coin: the first stays blocked until T
        after = {c["tip"]: c for c in json.loads(m2mpay("user", "wallet", "--wallet", t.wallet, "--json").stdout)}
        assert after[interrupted["tip"]]["position"] == interrupted["position"]  # nothing reused
        wait_until(lambda: _vendor_status(t)["open"] == 0, timeout=20,
                   what="the vendor has settled the orphaned session (idle for 1 s)")
    audit = m2mpay("bank", "audit", "--data", t.bank).stdout
    assert "audit passed" in audit
    credited = int(re.search(r"credited (\d+)", audit).group(1))  # type: ignore[union-attr]
    lost = 100 - interrupted["position"] - 1  # revealed by the killed session, beyond the first payment's
    assert 1 + 3 + lost - 1 <= credited <= 1 + 3 + lost  # at most the token in flight is lost


def _vendor_status(t: Town) -> dict[str, int]:
    return json.loads(m2mpay("vendor", "status", "--data", t.vendor_data, "--json").stdout)  # type: ignore[no-any-return]


def test_vendor_killed_before_settling_settles_the_same_after_restart(tmp_path: Path) -> None:
    """kill -9 `vendor serve` holding tokens it has not settled; restarted, it settles exactly those."""
    with town(tmp_path, "[pricing]\nprice = 1\nmeter_interval = 0.05\n[session]\nidle_timeout = 60\n"
                        "checkpoint_every = 100000\n") as t:
        m2mpay("user", "withdraw", "--wallet", t.wallet, "--credentials", t.credentials, "--broker", t.broker,
               "--coins", "1")
        assert first_payment(t, 1).returncode == 0  # 1 token (the blocking one pays the unit), settled at close
        payer = popen("user", "pay", "--wallet", t.wallet, t.vendor, "--units", "80",
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        t.processes.append(payer)
        deadline = time.monotonic() + 20
        while _vendor_status(t)["tokens_held"] < 10:
            assert time.monotonic() < deadline and payer.poll() is None, "the payment never got going"
            time.sleep(0.1)
        vendor = t.processes[2]
        vendor.send_signal(signal.SIGKILL)
        vendor.wait(10)
        payer.send_signal(signal.SIGKILL)
        payer.wait(10)
        status = _vendor_status(t)
        held = status["tokens_held"]
        assert status["open"] == 1 and held >= 10
        assert m2mpay("bank", "balance", "--data", t.bank, "meter").stdout.strip() == "1"  # nothing settled yet
        t.start_vendor()
        deadline = time.monotonic() + 30
        while m2mpay("bank", "balance", "--data", t.bank, "meter").stdout.strip() != str(1 + held):
            assert time.monotonic() < deadline, "the restarted vendor did not settle what it held"
            time.sleep(0.2)
        after = _vendor_status(t)
        assert after["open"] == 0 and after["settled"] == 1 + held
        coin = json.loads(m2mpay("user", "wallet", "--wallet", t.wallet, "--json").stdout)[0]
        revealed = 100 - coin["position"] - 1  # tokens the killed session revealed
        assert revealed - 1 <= held <= revealed  # the vendor kept all it acknowledged; one may be in flight
    assert "audit passed" in m2mpay("bank", "audit", "--data", t.bank).stdout
