"""A wallet lost after payments at two vendors is rebuilt from its seed in a new directory, with
the same spendable value to the minor unit, and pays again: every part a process of its own,
driven only through the ``m2mpay`` command as a user and an operator drive it."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from m2mpay.agents.user.store import WalletStore
from m2mpay.protocol.seed import WalletSeed
from tests.commands import m2mpay, one_line
from tests.processes import popen
from tests.town import free_coap_port, serve_bank, stop_all

pytestmark = pytest.mark.network

_SEED = re.compile(r"m2mseed1(?: [a-z0-9]{4,5})+")


@contextmanager
def _two_vendors(tmp_path: Path) -> Iterator[tuple[str, str, str]]:
    """A default bank (alice with 100.00 EUR), a parking meter and a charger, serving; the broker
    URL and the two vendors' CoAP URLs."""
    data = tmp_path / "bank"
    m2mpay("bank", "init", "--data", data, "--bank", "bank-r")
    m2mpay("bank", "account", "open", "--data", data, "alice", "--out", tmp_path / "alice.json")
    m2mpay("bank", "account", "deposit", "--data", data, "alice", "10000")
    processes: list[subprocess.Popen[str]] = []
    try:
        url = serve_bank(tmp_path, data, processes)
        vendors = []
        for name, category in (("meter", "parking"), ("charger", "ev")):
            m2mpay("bank", "vendor", "enroll", "--data", data, name, "--category", category,
                   "--out", tmp_path / f"{name}.json")
            (tmp_path / f"{name}.toml").write_text(
                f'[pricing]\nservice = "{category}"\nprice = 3\nmeter_interval = 0.05\n')
            port = free_coap_port()
            processes.append(popen("vendor", "serve", "--credentials", tmp_path / f"{name}.json", "--broker", url,
                                   "--coap-port", str(port), "--config", tmp_path / f"{name}.toml",
                                   "--data", tmp_path / name, stderr=subprocess.DEVNULL))
            vendors.append(f"coap://[::1]:{port}")
        yield url, vendors[0], vendors[1]
    finally:
        stop_all(processes)


def _pay(wallet: Path, vendor: str, units: int) -> dict[str, object]:
    """Pay, retrying while the vendor is still starting (it serves once it has the bank's keys)."""
    deadline = time.monotonic() + 20
    while True:
        result = m2mpay("user", "pay", "--wallet", wallet, vendor, "--units", units, "--json", check=False)
        if result.returncode == 0:
            paid: dict[str, object] = json.loads(result.stdout)
            return paid
        assert time.monotonic() < deadline, result.stderr
        time.sleep(0.2)  # a retry of a whole command: the vendor gives no signal that it now serves


def _spendable(wallet: Path) -> int:
    status = json.loads(m2mpay("user", "status", "--wallet", wallet, "--json").stdout)
    return int(status["spendable"]["value"])


def test_a_lost_wallet_is_restored_from_its_seed_and_pays(tmp_path: Path) -> None:
    with _two_vendors(tmp_path) as (broker, meter, charger):
        wallet, credentials = tmp_path / "car" / "wallet", tmp_path / "alice.json"
        shown = m2mpay("user", "init", "--wallet", wallet).stdout
        phrases = _SEED.findall(shown)
        assert len(phrases) == 1, shown
        again = m2mpay("user", "init", "--wallet", wallet, check=False)  # shown once, never again
        assert again.returncode == 2 and "m2mseed1" not in again.stdout + again.stderr
        m2mpay("user", "withdraw", "--wallet", wallet, "--credentials", credentials, "--broker", broker,
               "--coins", "3")
        paid = [_pay(wallet, meter, 3), _pay(wallet, charger, 2), _pay(wallet, meter, 1)]
        assert all(p["complete"] for p in paid), paid
        before = _spendable(wallet)
        assert before == 300 - sum(int(str(p["spent"])) for p in paid) < 300

        shutil.rmtree(tmp_path / "car")  # the device is gone
        seed_file = tmp_path / "written-down.txt"
        seed_file.write_text(phrases[0].upper().replace(" ", "-") + "\n")  # as typed: case and dashes ignored
        restored = tmp_path / "new-car" / "wallet"
        result = m2mpay("user", "restore", "--wallet", restored, "--credentials", credentials, "--broker", broker,
                        "--seed-file", seed_file, "--json")
        report = json.loads(result.stdout)
        assert report["found"] == 3 and report["exchanged"] == 3 and report["waiting"] == 0, report
        assert report["spendable"] == report["fresh_value"] == before
        assert _spendable(restored) == before  # to the minor unit

        again_paid = _pay(restored, charger, 2)
        assert again_paid["complete"], again_paid
        assert _spendable(restored) == before - int(str(again_paid["spent"]))

        # Restoring into the wallet again finds nothing new and changes nothing.
        rerun = json.loads(m2mpay("user", "restore", "--wallet", restored, "--credentials", credentials,
                                  "--broker", broker, "--seed-file", seed_file, "--json").stdout)
        assert rerun["found"] == 0 and rerun["spendable"] == before - int(str(again_paid["spent"]))
    # Every process stopped: the books balance, exchanges included.
    assert "audit passed" in m2mpay("bank", "audit", "--data", tmp_path / "bank").stdout


def test_restore_refuses_what_is_not_a_seed(tmp_path: Path) -> None:
    """Every mistake is one line and status 2, and creates nothing."""
    credentials = tmp_path / "none.json"
    target = tmp_path / "wallet"
    bad = tmp_path / "seed.txt"
    phrase = WalletSeed(bytes(range(16))).phrase()
    typo = phrase[:-1] + ("q" if phrase[-1] != "q" else "p")  # the last character mistyped
    bad.write_text(typo + "\n")
    result = m2mpay("user", "restore", "--wallet", target, "--credentials", credentials, "--broker",
                    "mqtt://127.0.0.1:9", "--seed-file", bad, check=False)
    assert result.returncode == 2
    assert one_line(result) == "m2mpay: user: wallet seed checksum does not match: a character is mistyped"
    missing = m2mpay("user", "restore", "--wallet", target, "--credentials", credentials, "--broker",
                     "mqtt://127.0.0.1:9", "--seed-file", tmp_path / "nope.txt", check=False)
    assert missing.returncode == 2 and "cannot read the seed file" in one_line(missing)
    assert not target.exists()


def test_two_wallets_of_one_seed_never_get_one_coin_signed_twice(tmp_path: Path) -> None:
    """A second wallet given the same seed (a copy restored while the first still runs) derives the
    same counters: the bank refuses to sign them again (``replay``, nothing debited), the wallet
    moves past them, and ``user restore`` into it fetches the coins the first one withdrew."""
    with _two_vendors(tmp_path) as (broker, _meter, _charger):
        credentials = tmp_path / "alice.json"
        first, second = tmp_path / "first", tmp_path / "second"
        (phrase,) = _SEED.findall(m2mpay("user", "init", "--wallet", first).stdout)
        withdraw = ("--credentials", credentials, "--broker", broker, "--coins")
        m2mpay("user", "withdraw", "--wallet", first, *withdraw, "2")
        copy = WalletStore(second)
        copy.seeds.put_seed(WalletSeed.parse(phrase), shown=True)
        copy.close()
        for _ in range(2):  # counters 0 and 1: the first wallet's coins
            refused = m2mpay("user", "withdraw", "--wallet", second, *withdraw, "1", check=False)
            assert refused.returncode == 4, refused.stderr
            assert one_line(refused).startswith("m2mpay: the bank refused the withdrawal: replay (a blinded "
                                                "message was signed before); nothing was debited")
        m2mpay("user", "withdraw", "--wallet", second, *withdraw, "1")  # counter 2: a coin of its own
        balance = m2mpay("bank", "balance", "--data", tmp_path / "bank", "alice").stdout
        assert balance.split()[0] == "9700", balance  # 3 coins of 1.00 EUR debited, never 5
        report = json.loads(m2mpay("user", "restore", "--wallet", second, "--credentials", credentials,
                                   "--broker", broker, "--seed-file", _write(tmp_path / "s", phrase),
                                   "--json").stdout)
        assert (report["found"], report["exchanged"], report["spendable"]) == (2, 2, 300)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_restore_with_the_bank_out_of_reach_says_so_and_can_be_run_again(tmp_path: Path) -> None:
    """A valid seed but no broker: one line, status 5; wrong options: one line, status 2."""
    credentials = tmp_path / "alice.json"
    m2mpay("bank", "init", "--data", tmp_path / "b2", "--bank", "bank-x")
    m2mpay("bank", "account", "open", "--data", tmp_path / "b2", "alice", "--out", credentials)
    seed = _write(tmp_path / "seed.txt", WalletSeed.generate(os.urandom).phrase())
    target = tmp_path / "wallet"
    args = ("user", "restore", "--wallet", target, "--credentials", credentials, "--seed-file", seed)
    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        down = f"mqtt://127.0.0.1:{closed.getsockname()[1]}"
    for _ in range(2):  # the wallet it began holds the same seed: the same command may run again
        result = m2mpay(*args, "--broker", down, check=False)
        assert result.returncode == 5 and one_line(result).startswith("m2mpay: bank unreachable: "), result.stderr
    gap = m2mpay(*args, "--broker", down, "--gap", "0", check=False)
    assert gap.returncode == 2 and one_line(gap) == "m2mpay: --gap must be a positive whole number"
    missing = m2mpay("user", "restore", "--wallet", tmp_path / "w2", "--credentials", tmp_path / "none.json",
                     "--seed-file", seed, "--broker", down, check=False)
    assert missing.returncode == 2 and "none.json" in one_line(missing)
