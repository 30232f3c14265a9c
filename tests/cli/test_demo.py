"""`m2mpay demo` as `make demo` runs it, shortened: every agent, live traffic, an audit that passes."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest


@pytest.mark.network
def test_demo_runs_and_balances() -> None:
    result = subprocess.run([sys.executable, "-m", "m2mpay.agents.cli", "demo", "--duration", "3"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "audit passed" in result.stdout
    match = re.search(r"withdrawn (\d+) = credited to vendors (\d+) \+ left in wallets (\d+): yes", result.stdout)
    assert match is not None and int(match[1]) == int(match[2]) + int(match[3]) and int(match[2]) > 0
