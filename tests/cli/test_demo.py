"""`m2mpay demo` as `make demo` runs it, shortened: every agent, live traffic, an audit that passes."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


@pytest.mark.network
def test_demo_runs_and_balances() -> None:
    result = subprocess.run([sys.executable, "-m", "m2mpay.agents.cli", "demo", "--duration", "3"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "audit passed" in result.stdout
    match = re.search(r"withdrawn (\d+) = credited to vendors (\d+) \+ left in wallets (\d+): yes", result.stdout)
    assert match is not None and int(match[1]) == int(match[2]) + int(match[3]) and int(match[2]) > 0


def _demo_dirs(tmp: Path) -> list[Path]:
    return sorted(tmp.glob("m2mpay-demo-*"))


@pytest.mark.network
def test_demo_leaves_no_directory_with_keys(tmp_path: Path) -> None:
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    result = subprocess.run([sys.executable, "-m", "m2mpay.agents.cli", "demo", "--duration", "1"], capture_output=True,
                            text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{tmp_path}/m2mpay-demo-" in "".join(result.stdout.split())  # it did work there (rich wraps the path)
    assert _demo_dirs(tmp_path) == []


@pytest.mark.network
def test_demo_interrupted_while_starting_removes_its_directory(tmp_path: Path) -> None:
    """Ctrl-C once the bank's keys exist, before the traffic: the keys go with the directory."""
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    demo = subprocess.Popen([sys.executable, "-m", "m2mpay.agents.cli", "demo", "--duration", "60"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 60
        while not any((d / "bank" / "keys").is_dir() for d in _demo_dirs(tmp_path)):
            assert time.monotonic() < deadline and demo.poll() is None, "the demo never made its bank"
            time.sleep(0.05)
        demo.send_signal(signal.SIGINT)
        status = demo.wait(60)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait(10)
    assert status == 130, demo.stderr.read() if demo.stderr else ""
    assert _demo_dirs(tmp_path) == []
