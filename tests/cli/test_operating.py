"""Operating m2mpay as a new user would: one clear line and a documented exit status for every
mistake, no false successes, no process left behind (issue "Operating m2mpay")."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from m2mpay.broker.launcher import free_port

from tests.commands import CLI, m2mpay, one_line
from tests.processes import wait_for_text

def _mosquittos(data: Path) -> list[str]:
    found = subprocess.run(["pgrep", "-af", f"mosquitto -c {data}"], capture_output=True, text=True).stdout
    return [line for line in found.splitlines() if "pgrep" not in line]


def test_version() -> None:
    result = m2mpay("--version")
    assert result.stdout.startswith("m2mpay ")


@pytest.mark.network  # starts Mosquitto
def test_broker_run_port_in_use_is_an_error(tmp_path: Path) -> None:
    """A second broker on a taken port used to print 'listening' while its Mosquitto had died."""
    port = free_port()
    out = tmp_path / "first.out"
    with out.open("w") as sink:
        first = subprocess.Popen([*CLI, "broker", "run", "--data", str(tmp_path / "one"), "--port", str(port)],
                                 stdout=sink, stderr=subprocess.STDOUT)
    try:
        wait_for_text(out, "listening")
        second = m2mpay("broker", "run", "--data", tmp_path / "two", "--port", str(port), check=False)
        assert second.returncode == 2 and "in use" in one_line(second.stderr)
        assert "listening" not in second.stdout
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(10)


@pytest.mark.network  # starts Mosquitto
def test_broker_run_stops_its_mosquitto_on_sigterm(tmp_path: Path) -> None:
    data = tmp_path / "broker"
    out = tmp_path / "run.out"
    with out.open("w") as sink:
        run = subprocess.Popen([*CLI, "broker", "run", "--data", str(data), "--port", str(free_port())],
                               stdout=sink, stderr=subprocess.STDOUT)
    wait_for_text(out, "listening")
    assert _mosquittos(data.resolve())
    run.send_signal(signal.SIGTERM)
    assert run.wait(10) == 0
    assert _mosquittos(data.resolve()) == []


def test_second_bank_serve_on_one_data_directory_refused(tmp_path: Path, mosquitto: str, bank_id: str) -> None:
    data = tmp_path / "bank"
    m2mpay("bank", "init", "--data", data, "--bank", bank_id)
    log = tmp_path / "serve.log"
    with log.open("w") as sink:
        first = subprocess.Popen([*CLI, "bank", "serve", "--data", str(data), "--broker", mosquitto],
                                 stdout=sink, stderr=subprocess.STDOUT)
    try:
        wait_for_text(log, "serving")
        second = m2mpay("bank", "serve", "--data", data, "--broker", mosquitto, check=False)
        assert second.returncode == 2 and f"pid {first.pid}" in one_line(second.stderr)
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(15)


def test_postgresql_unreachable_at_init_is_one_line_and_can_be_run_again(tmp_path: Path) -> None:
    data = tmp_path / "bank"
    url = f"postgresql://nobody@127.0.0.1:{free_port()}/none"
    result = m2mpay("bank", "init", "--data", data, "--db", url, check=False)
    assert result.returncode == 5 and "cannot open the bank database" in one_line(result.stderr)
    assert not (data / "keys").exists()  # nothing half-made: the next init is not refused
    assert m2mpay("bank", "init", "--data", data).returncode == 0


@pytest.mark.parametrize("args, status, words", [
    (["bank", "audit", "--data", "{tmp}/nowhere"], 2, "no such file"),
    (["bank", "balance", "--data", "{bank}", "nobody"], 2, "nobody"),
    (["bank", "account", "open", "--data", "{bank}", "alice", "--out", "{tmp}/again.json"], 2, "taken"),
    (["bank", "vendor", "enroll", "--data", "{bank}", "alice", "--category", "parking", "--out", "{tmp}/v.json"],
     2, "taken"),
    (["bank", "account", "deposit", "--data", "{bank}", "alice", "-5"], 2, "positive"),
])
def test_bank_mistakes_get_one_line(tmp_path: Path, args: list[str], status: int, words: str) -> None:
    bank = tmp_path / "bank"
    m2mpay("bank", "init", "--data", bank)
    m2mpay("bank", "account", "open", "--data", bank, "alice", "--out", tmp_path / "alice.json")
    result = m2mpay(*[a.format(tmp=tmp_path, bank=bank) for a in args], check=False)
    assert result.returncode == status and words in one_line(result.stderr)


def test_output_into_a_closed_pipe_is_quiet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """`m2mpay bank keys … | head -c 1` used to end in a BrokenPipeError traceback."""
    from m2mpay.agents.cli import main

    bank = tmp_path / "bank"
    m2mpay("bank", "init", "--data", bank)
    read, write = os.pipe()
    os.close(read)  # the reader is gone: the first write fails with EPIPE
    with os.fdopen(write, "w") as closed:
        monkeypatch.setattr(sys, "stdout", closed)
        assert main(["bank", "keys", "--data", str(bank), "--json"]) == 0
        monkeypatch.undo()
    assert capsys.readouterr().err == ""


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    result = m2mpay("--debug", "bank", "audit", "--data", tmp_path / "nowhere", check=False)
    assert result.returncode == 2 and "Traceback" in result.stderr


def test_sigterm_sent_again_while_the_bank_stops_is_quiet(tmp_path: Path, mosquitto: str, bank_id: str) -> None:
    """`kill %2` and then a shell's exit trap: the second SIGTERM used to land while asyncio was
    closing its loop, and CPython printed a traceback about the loop's closed wakeup pipe."""
    data = tmp_path / "bank"
    m2mpay("bank", "init", "--data", data, "--bank", bank_id)
    for attempt in range(5):
        log = tmp_path / f"serve-{attempt}.log"
        with log.open("w") as sink:
            bank = subprocess.Popen([*CLI, "bank", "serve", "--data", str(data), "--broker", mosquitto],
                                    stdout=sink, stderr=subprocess.STDOUT)
        wait_for_text(log, "serving")
        while bank.poll() is None:  # SIGTERM every millisecond until it is gone
            with contextlib.suppress(ProcessLookupError):
                bank.send_signal(signal.SIGTERM)
            time.sleep(0.001)
        assert bank.returncode == 0, log.read_text()
        text = log.read_text()
        assert "Traceback" not in text and "Exception ignored" not in text, text
