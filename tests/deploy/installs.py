"""The installer under test and the operator's steps around it: paths, pinned locks, the machine
an install starts from, and the commands the deployment tests run (fixtures in ``conftest.py``)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from .sandbox import Host

REPO = Path(__file__).resolve().parents[2]
INSTALLER = REPO / "deploy" / "pi" / "install.sh"
LOCKS = (REPO / "deploy" / "pi" / "requirements.txt", REPO / "deploy" / "pi" / "build-requirements.txt")
SYSTEM_PYTHON = "/usr/bin/python3"  # what the installer builds its venv with

UIDS = {"bank": 61871, "vendor": 61872, "user": 61873}
"""Service uids from systemd's DynamicUser= range, with no passwd entry (like a dynamic user)."""

DEBIAN_MOSQUITTO_CONF = """\
# Place your local configuration in /etc/mosquitto/conf.d/
#
# A full description of the configuration file is at
# /usr/share/doc/mosquitto/examples/mosquitto.conf.example

pid_file /run/mosquitto/mosquitto.pid

persistence true
persistence_location /var/lib/mosquitto/

log_dest file /var/log/mosquitto/mosquitto.log

include_dir /etc/mosquitto/conf.d
"""
OPERATOR_DROPIN = "# the operator's own settings\nlog_timestamp_format %Y-%m-%dT%H:%M:%S\n"


def need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("the deployment tests install into a temporary root and run each service as its own uid: "
                    "they need root")


def run(*args: str | Path, env: dict[str, str] | None = None, check: bool = True,
        timeout: float = 300) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout,
                            env=None if env is None else {**os.environ, **env})
    if check and result.returncode != 0:
        command = " ".join(map(str, args))
        raise AssertionError(f"{command} failed ({result.returncode}):\n{result.stdout}{result.stderr}")
    return result


def install(root: Path, role: str, *options: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run("bash", INSTALLER, "--role", role, "--root", root, *options, check=check)


def seed(root: Path) -> None:
    """The machine before this install: the mosquitto package and an earlier m2mpay install."""
    import grp
    import pwd

    mosquitto = pwd.getpwnam("mosquitto")
    conf = root / "etc" / "mosquitto"
    (conf / "conf.d").mkdir(parents=True)
    (conf / "mosquitto.conf").write_text(DEBIAN_MOSQUITTO_CONF)
    (conf / "conf.d" / "local.conf").write_text(OPERATOR_DROPIN)
    for owned in ("var/lib/mosquitto", "var/log/mosquitto", "run/mosquitto"):
        (root / owned).mkdir(parents=True)
        os.chown(root / owned, mosquitto.pw_uid, grp.getgrnam("mosquitto").gr_gid)
    (root / "etc" / "m2mpay").mkdir(mode=0o750)
    (root / "etc" / "m2mpay").chmod(0o750)
    shutil.copy(REPO / "deploy" / "examples" / "vendor.toml", root / "etc" / "m2mpay" / "vendor.toml")
    (root / "etc" / "m2mpay" / "vendor.toml").chmod(0o640)
    (root / "var" / "lib" / "private").mkdir(parents=True, mode=0o755)
    (root / "var" / "lib" / "private").chmod(0o755)


@dataclass(frozen=True)
class Deployment:
    """The installed root, the ports its configuration names, and the operator's commands."""

    host: Host
    broker_port: int
    coap_port: int

    @property
    def m2mpay(self) -> Path:
        return self.host.path("/opt/m2mpay/venv/bin/m2mpay")

    def admin(self, *args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``m2mpay-bank ARGS`` as root, as the operator's guide says, on this root's bank."""
        return run(self.host.path("/usr/local/sbin/m2mpay-bank"), *args, check=check,
                   env={"M2MPAY": str(self.m2mpay), "M2MPAY_BANK_DATA": str(self.bank_data)})

    @property
    def bank_data(self) -> Path:
        return self.host.path("/var/lib/private/m2mpay/bank")

    @property
    def pki(self) -> Path:
        return self.host.path("/etc/m2mpay/pki")


def configure(d: Deployment) -> None:
    """The operator's part: certificates and credentials for meter-1 and alice, this test's ports."""
    etc = d.host.path("/etc/m2mpay")
    run(d.m2mpay, "broker", "pki", "--dir", d.pki, "--client", "meter-1", "--client", "alice")
    tls = etc / "tls"  # the installer made it, 0700: the device's broker login goes there
    assert tls.is_dir() and tls.stat().st_mode & 0o777 == 0o700
    for name in ("ca.crt", "meter-1.crt", "meter-1.key", "alice.crt", "alice.key"):
        shutil.copy(d.pki / name, tls / name)
    d.admin("vendor", "enroll", "meter-1", "--category", "parking", "--out", etc / "vendor.json")
    d.admin("account", "open", "alice", "--out", etc / "user.json")
    d.admin("account", "deposit", "alice", "1000")
    broker = f"mqtts://localhost:{d.broker_port}"
    for env in ("bank.env", "vendor.env"):
        text = re.sub(r"(?m)^M2MPAY_BROKER=.*$", f"M2MPAY_BROKER={broker}", (etc / env).read_text())
        (etc / env).write_text(text)
    with (etc / "vendor.env").open("a") as handle:
        handle.write(f"M2MPAY_COAP_HOST=::1\nM2MPAY_COAP_PORT={d.coap_port}\n")
    vendor = (etc / "vendor.toml").read_text()
    (etc / "vendor.toml").write_text(vendor.replace("price = 2", "price = 1").replace("meter_interval = 60.0",
                                                                                      "meter_interval = 0.05"))
    user = (etc / "user.toml").read_text()
    user = re.sub(r'(?m)^broker = .*$', f'broker = "{broker}"', user)
    user = re.sub(r"(?m)^vendors = .*$", f'vendors = ["coap://[::1]:{d.coap_port}"]', user)
    user = re.sub(r"(?m)^rounds = .*$", "rounds = 1", user)
    user = re.sub(r"(?m)^units = .*$", "units = 2", user)
    (etc / "user.toml").write_text(user)


def mapped_mosquitto(d: Deployment, scratch: Path) -> Path:
    """The installed mosquitto.conf and its drop-ins with paths moved into the root; the listener
    on this test's loopback port instead of 8883 on every address."""
    host = d.host
    (scratch / "conf.d").mkdir()
    for dropin in sorted(host.path("/etc/mosquitto/conf.d").glob("*.conf")):
        text = re.sub(r"(?m)^listener \d+ \S+$", f"listener {d.broker_port} 127.0.0.1", host.map(dropin.read_text()))
        (scratch / "conf.d" / dropin.name).write_text(text)
    main = host.map(host.path("/etc/mosquitto/mosquitto.conf").read_text())
    main = main.replace(f"include_dir {host.path('/etc/mosquitto/conf.d')}", f"include_dir {scratch / 'conf.d'}")
    (scratch / "mosquitto.conf").write_text(main)
    return scratch / "mosquitto.conf"
