"""An install made by ``deploy/pi/install.sh --root`` in a temporary directory, once per test run.

The root starts as a Raspberry Pi OS machine with the mosquitto package (Debian's default
``mosquitto.conf``, an operator's own drop-in) and the leftovers of an earlier m2mpay install
(``/etc/m2mpay`` 0750, ``/var/lib/private`` 0755, a 0640 ``vendor.toml``). The three roles are
installed into it from the pinned wheels; then the operator issues the devices' certificates and
credentials, points the configurations at this test's ports, and the broker is started from the
installed Mosquitto configuration.

Root is needed (files owned by other users, services run as other uids): without it these tests
skip, saying so. Mosquitto and openssl must be installed; the pinned wheels are downloaded once into
pytest's cache directory and found there by later runs.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from m2mpay.broker.launcher import find_mosquitto, free_port, free_udp_port

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


@pytest.fixture(scope="session")
def wheelhouse(pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every pinned wheel (runtime and build) for the system Python, checked against the lock's hashes:
    kept in M2MPAY_WHEELHOUSE or pytest's cache directory, else fetched for this run only."""
    need_root()
    if os.environ.get("M2MPAY_WHEELHOUSE"):
        cache = Path(os.environ["M2MPAY_WHEELHOUSE"])
        cache.mkdir(parents=True, exist_ok=True)
    elif getattr(pytestconfig, "cache", None) is not None:
        cache = Path(pytestconfig.cache.mkdir("m2mpay-wheelhouse"))
    else:
        cache = tmp_path_factory.mktemp("wheelhouse")
    version = run(SYSTEM_PYTHON, "-c", "import sys; print('%d.%d' % sys.version_info[:2])").stdout.strip()
    base: list[str | Path] = [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary", ":all:",
                              "--no-deps", "--require-hashes", "--python-version", version, "--dest", cache]
    for lock in LOCKS:
        if run(*base, "--no-index", "--find-links", cache, "-r", lock, check=False).returncode != 0:
            run(*base, "-r", lock)  # the first run: from the index; fails loudly without one
    return cache


def _seed(root: Path) -> None:
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


def _configure(d: Deployment) -> None:
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


@pytest.fixture(scope="session")
def deployment(wheelhouse: Path) -> Iterator[Deployment]:
    """All three roles installed into one temporary root, configured by the operator."""
    need_root()
    root = Path(tempfile.mkdtemp(prefix="m2mpay-root-"))
    root.chmod(0o755)  # the services' uids must reach the installed files, as they reach / on a machine
    try:
        _seed(root)
        install(root, "bank", "--wheelhouse", wheelhouse)
        wheels = sorted(root.joinpath("opt", "m2mpay", "dist").glob("m2mpay-*.whl"))
        assert len(wheels) == 1, wheels
        for role in ("vendor", "user"):
            install(root, role, "--wheelhouse", wheelhouse, "--wheel", wheels[0])
        d = Deployment(Host(root), free_port(), free_udp_port())
        _configure(d)
        yield d
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _mapped_mosquitto(d: Deployment, scratch: Path) -> Path:
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


@pytest.fixture(scope="session")
def broker(deployment: Deployment) -> Iterator[subprocess.Popen[bytes]]:
    """Mosquitto as root from the installed configuration: it drops to the mosquitto user before
    reading the certificates, as the system's broker does."""
    scratch = Path(tempfile.mkdtemp(prefix="m2mpay-mosquitto-"))
    conf = _mapped_mosquitto(deployment, scratch)
    log = scratch / "stderr"
    with log.open("wb") as out:
        process = subprocess.Popen([find_mosquitto(), "-c", str(conf)], stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + 10
        while True:
            if process.poll() is not None:
                logged = deployment.host.path("/var/log/mosquitto/mosquitto.log")
                pytest.fail(f"mosquitto exited: {log.read_text()}{logged.read_text() if logged.exists() else ''}")
            try:
                with socket.create_connection(("127.0.0.1", deployment.broker_port), timeout=0.2):
                    break
            except OSError:
                assert time.monotonic() < deadline, "mosquitto did not listen within 10 s"
                time.sleep(0.05)
        yield process
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(10)
        shutil.rmtree(scratch, ignore_errors=True)
