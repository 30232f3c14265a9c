"""The README's by-hand block runs as written (free ports and a temporary directory substituted),
against real processes, so it cannot drift from the commands."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from m2mpay.broker.launcher import free_port, free_udp_port

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.network


def _block() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Running the parts by hand"):]
    found = re.search(r"```sh\n(.*?)```", section, re.S)
    assert found is not None, "no sh block under 'Running the parts by hand'"
    return found.group(1)


def test_readme_by_hand_block_runs_as_written(tmp_path: Path) -> None:
    script = _block()
    assert "1883" in script and "5683" in script and "var/" in script
    script = script.replace("1883", str(free_port())).replace("5683", str(free_udp_port()))
    script = re.sub(r"\bvar\b", str(tmp_path / "var"), script)
    # Every line must succeed, and nothing started in the background may outlive the test.
    wrapped = "set -euo pipefail\ntrap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n" + script
    result = subprocess.run(["bash", "-c", wrapped], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    assert "audit passed" in result.stdout
    assert "FAIL" not in result.stdout  # m2mpay doctor
    assert "Traceback" not in result.stderr
