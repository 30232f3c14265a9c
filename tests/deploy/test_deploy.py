"""deploy/: units that systemd accepts and that are hardened, an installer whose dry run changes
nothing, and example configurations that load."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from m2mpay.agents.user.run import RunConfig
from m2mpay.agents.vendor.config import VendorConfig

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
    assert "LoadCredential=" in text  # keys are handed over by systemd, not read from a shared path
    assert "mqtt://" not in text  # the broker is spoken to with TLS and a certificate only
    tool = shutil.which("systemd-analyze")
    assert tool, "systemd-analyze is needed to check the units"
    result = subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    complaints = [line for line in (result.stdout + result.stderr).splitlines()
                  if line.strip() and "/opt/m2mpay/venv/bin/m2mpay is not executable" not in line]
    assert complaints == [], complaints  # only the not-yet-installed binary may be missing


def _debian_root(tmp_path: Path) -> Path:
    """A root with the mosquitto package's configuration, as Debian installs it."""
    from .installs import DEBIAN_MOSQUITTO_CONF

    (tmp_path / "etc" / "mosquitto" / "conf.d").mkdir(parents=True)
    (tmp_path / "etc" / "mosquitto" / "mosquitto.conf").write_text(DEBIAN_MOSQUITTO_CONF)
    return tmp_path


def _tree(root: Path) -> dict[Path, tuple[int, int]]:
    return {p: (p.lstat().st_mode, p.lstat().st_mtime_ns) for p in [root, *root.rglob("*")]}


@pytest.mark.parametrize("role", ["bank", "vendor", "user"])
def test_installer_dry_run_changes_nothing(role: str, tmp_path: Path) -> None:
    system = {p: p.exists() for p in (Path("/opt/m2mpay"), Path("/etc/m2mpay"), Path("/var/lib/private"),
                                      Path(f"/etc/systemd/system/m2mpay-{role}.service"))}
    root = _debian_root(tmp_path)
    before = _tree(root)
    result = subprocess.run(["bash", str(DEPLOY / "pi" / "install.sh"), "--role", role, "--root", str(root),
                             "--dry-run"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert f"+ systemctl --quiet --root={root} enable m2mpay-{role}.service" in result.stdout
    assert "dry run: nothing changed" in result.stdout
    assert _tree(root) == before
    assert {p: p.exists() for p in system} == system


@pytest.mark.parametrize("conf", ["listener 1883 127.0.0.1\n", "allow_anonymous true\n", "port 1883\n",
                                  "max_connections 100\n", "password_file /etc/mosquitto/passwd\n", "no-include"])
def test_installer_refuses_a_broker_open_without_certificates(conf: str, tmp_path: Path) -> None:
    """The bank's broker must accept only certified TLS clients: another listener, anonymous access or
    a mosquitto.conf that ignores conf.d stops the install with one line, before anything changes."""
    root = _debian_root(tmp_path)
    main = root / "etc" / "mosquitto" / "mosquitto.conf"
    if conf == "no-include":
        main.write_text(main.read_text().replace("include_dir", "#include_dir"))
    else:
        (root / "etc" / "mosquitto" / "conf.d" / "old.conf").write_text(conf)
    before = _tree(root)
    result = subprocess.run(["bash", str(DEPLOY / "pi" / "install.sh"), "--role", "bank", "--root", str(root),
                             "--dry-run"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "mosquitto" in result.stderr
    assert _tree(root) == before


@pytest.mark.parametrize("args", [["--role"], ["--role", "bank", "--wheel", "nothing.whl"],
                                  ["--role", "bank", "--root"],
                                  ["--role", "bank", "--root", "/nonexistent"], ["--role", "bank", "--bank-id", "a/b"],
                                  ["--role", "bank", "--root", "/tmp", "--start"], ["--role", "bank", "--frobnicate"]])
def test_installer_usage_mistakes(args: list[str]) -> None:
    result = subprocess.run(["bash", str(DEPLOY / "pi" / "install.sh"), *args, "--dry-run"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr


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


def test_examples_speak_tls_only() -> None:
    user = RunConfig.load(DEPLOY / "examples" / "user.toml")
    assert user.broker.startswith("mqtts://") and user.tls == DEPLOY / "examples" / "tls"
    for env in ("bank.env", "vendor.env"):
        assert "M2MPAY_BROKER=mqtts://" in (DEPLOY / "examples" / env).read_text()


def test_user_run_config_tls_and_unknown_keys(tmp_path: Path) -> None:
    base = "\n".join(line for line in (DEPLOY / "examples" / "user.toml").read_text().splitlines()
                     if not line.startswith("tls ="))
    (tmp_path / "user.toml").write_text('tls = "pki"\n' + base)
    assert RunConfig.load(tmp_path / "user.toml").tls == tmp_path / "pki"
    (tmp_path / "bad.toml").write_text('walet = "typo"\n' + base)
    with pytest.raises(ValueError):
        RunConfig.load(tmp_path / "bad.toml")
