"""Every file shipped in deploy/examples works as it is: the strict loader reads each TOML file,
every variable of an environment file is a setting the commands read, and ``config show`` takes
them all together."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from m2mpay.agents.policy.config import PolicyConfig
from m2mpay.agents.settings import FILES, SETTINGS, Discovery
from m2mpay.agents.user.run import RunConfig
from m2mpay.agents.vendor.config import VendorConfig

EXAMPLES = Path(__file__).resolve().parents[2] / "deploy" / "examples"
KNOWN_FILES = {"policy.toml", "user.toml", "vendor.toml", "bank.env", "vendor.env"}
OUTSIDE = {"PGPASSWORD"}
"""Variables an environment file may set for others than m2mpay (libpq)."""


def test_every_example_is_known_here() -> None:
    """A new example must be added to these tests, or it could ship broken."""
    assert {p.name for p in EXAMPLES.iterdir()} == KNOWN_FILES


def test_every_toml_example_loads() -> None:
    assert PolicyConfig.load(EXAMPLES / "policy.toml") == PolicyConfig()  # the default, written out
    vendor = VendorConfig.load(EXAMPLES / "vendor.toml", "parking")
    assert (vendor.pricing.service, vendor.pricing.price, vendor.session.block_window) == ("parking", 2, 900)
    user = RunConfig.load(EXAMPLES / "user.toml")
    assert (user.rounds, user.policy.refill.daily_cap, user.tls) == (0, 2000, EXAMPLES / "tls")


def test_every_environment_example_sets_settings(tmp_path: Path) -> None:
    variables = {s.env for s in SETTINGS} | {env for _, env in FILES.values()}
    for name in ("bank.env", "vendor.env"):
        for line in (EXAMPLES / name).read_text().splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            key, _, value = line.partition("=")
            assert key in variables | OUTSIDE, f"{name}: {key} is read by nothing"
            if key in variables:
                rows = Discovery({key: value, "XDG_CONFIG_HOME": str(tmp_path)}, system_dir=tmp_path).everything()
                assert any(r.source == f"env {key}" and r.value is not None for r in rows), (name, key)


def test_config_show_with_every_example(tmp_path: Path) -> None:
    bank = tmp_path / "bank.toml"
    bank.write_text('data = "bank"\nworkers = 2\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("M2MPAY_")}
    env.update(XDG_CONFIG_HOME=str(tmp_path / "xdg"), HOME=str(tmp_path), M2MPAY_BANK_CONFIG=str(bank),
               **{FILES[role][1]: str(EXAMPLES / FILES[role][0]) for role in ("user", "vendor", "policy")})
    shown = subprocess.run([sys.executable, "-m", "m2mpay.agents.cli", "config", "show", "--json"], env=env,
                           capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    rows = {r["setting"]: (r["value"], r["source"]) for r in json.loads(shown.stdout)}
    assert rows["user.broker"] == ("mqtts://bank.example.org:8883", f"file {EXAMPLES / 'user.toml'}")
    assert rows["bank.workers"] == (2, f"file {bank}")
    assert rows["bank.data"] == (str(tmp_path / "bank"), f"file {bank}")
