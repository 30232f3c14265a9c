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
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from m2mpay.broker.launcher import find_mosquitto, free_port, free_udp_port

from .installs import LOCKS, SYSTEM_PYTHON, Deployment, configure, install, mapped_mosquitto, need_root, run, seed
from .sandbox import Host


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


@pytest.fixture(scope="session")
def deployment(wheelhouse: Path) -> Iterator[Deployment]:
    """All three roles installed into one temporary root, configured by the operator."""
    need_root()
    root = Path(tempfile.mkdtemp(prefix="m2mpay-root-"))
    root.chmod(0o755)  # the services' uids must reach the installed files, as they reach / on a machine
    try:
        seed(root)
        install(root, "bank", "--wheelhouse", wheelhouse)
        wheels = sorted(root.joinpath("opt", "m2mpay", "dist").glob("m2mpay-*.whl"))
        assert len(wheels) == 1, wheels
        for role in ("vendor", "user"):
            install(root, role, "--wheelhouse", wheelhouse, "--wheel", wheels[0])
        d = Deployment(Host(root), free_port(), free_udp_port())
        configure(d)
        yield d
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def broker(deployment: Deployment) -> Iterator[subprocess.Popen[bytes]]:
    """Mosquitto as root from the installed configuration: it drops to the mosquitto user before
    reading the certificates, as the system's broker does."""
    scratch = Path(tempfile.mkdtemp(prefix="m2mpay-mosquitto-"))
    conf = mapped_mosquitto(deployment, scratch)
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
