"""deploy/: units that systemd accepts and that are hardened, an installer whose dry run changes
nothing, and example configurations that load."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from agents.user.run import RunConfig
from agents.vendor.config import VendorConfig

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
UNITS = sorted((DEPLOY / "systemd").glob("*.service"))
HARDENING = ("DynamicUser=yes", "StateDirectory=", "NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=yes",
             "PrivateTmp=yes", "CapabilityBoundingSet=", "SystemCallFilter=@system-service", "UMask=0077")


def test_three_units() -> None:
    assert [u.name for u in UNITS] == ["m2mpay-bank.service", "m2mpay-user.service", "m2mpay-vendor.service"]


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_unit_is_hardened_and_accepted_by_systemd(unit: Path) -> None:
    text = unit.read_text()
    for directive in HARDENING:
        assert directive in text, f"{unit.name} lacks {directive}"
    if "vendor" in unit.name or "user" in unit.name:
        assert "LoadCredential=" in text  # keys are handed over by systemd, not read from a shared path
    tool = shutil.which("systemd-analyze")
    assert tool, "systemd-analyze is needed to check the units"
    result = subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    complaints = [line for line in (result.stdout + result.stderr).splitlines()
                  if line.strip() and "/opt/m2mpay/venv/bin/m2mpay is not executable" not in line]
    assert complaints == [], complaints  # only the not-yet-installed binary may be missing


@pytest.mark.parametrize("role", ["bank", "vendor", "user"])
def test_installer_dry_run_changes_nothing(role: str) -> None:
    before = {p: p.exists() for p in (Path("/opt/m2mpay"), Path("/etc/m2mpay"),
                                      Path(f"/etc/systemd/system/m2mpay-{role}.service"))}
    result = subprocess.run(["bash", str(DEPLOY / "pi" / "install.sh"), "--role", role, "--dry-run"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert f"+ systemctl enable m2mpay-{role}.service" in result.stdout
    assert "dry run: nothing changed" in result.stdout
    assert {p: p.exists() for p in before} == before


def test_installer_refuses_unknown_role() -> None:
    result = subprocess.run(["bash", str(DEPLOY / "pi" / "install.sh"), "--role", "toaster", "--dry-run"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2


def test_example_configurations_load() -> None:
    vendor = VendorConfig.load(DEPLOY / "examples" / "vendor.toml")
    assert vendor.pricing.service == "parking" and vendor.pricing.price == 2
    user = RunConfig.load(DEPLOY / "examples" / "user.toml")
    assert user.rounds == 0 and user.policy.budget.per_hour == 500
    assert user.policy.price.ceiling("parking") == 5 and user.policy.refill.coins == 2


def test_user_run_config_tls_and_unknown_keys(tmp_path: Path) -> None:
    base = (DEPLOY / "examples" / "user.toml").read_text()
    (tmp_path / "user.toml").write_text('tls = "pki"\n' + base)
    assert RunConfig.load(tmp_path / "user.toml").tls == tmp_path / "pki"
    (tmp_path / "bad.toml").write_text('walet = "typo"\n' + base)
    with pytest.raises(ValueError):
        RunConfig.load(tmp_path / "bad.toml")
