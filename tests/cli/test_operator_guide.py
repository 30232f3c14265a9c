"""docs/OPERATOR.md's broker block runs as written against Debian's Mosquitto layout.

A temporary root stands in for ``/``: Debian's ``mosquitto.conf`` (persistence, log, pid file and
``include_dir /etc/mosquitto/conf.d``) with its paths moved into the root, the directories
Mosquitto writes owned by the ``mosquitto`` user. Mosquitto runs as root from that main config and
drops to ``mosquitto`` before it reads the certificates, as the system's does. Substituted in the
block: the root for ``/etc`` and ``/var``, a free loopback port and address for the listener,
127.0.0.1 for the broker's name, and a restart of this Mosquitto for ``systemctl``. No real
``/etc`` is touched.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from m2mpay.broker.launcher import free_port

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.network

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


def _commands() -> list[str]:
    """The sh block under '## The broker', one command per logical line (continuations joined)."""
    text = (ROOT / "docs" / "OPERATOR.md").read_text()
    section = text[text.index("## The broker"):]
    found = re.search(r"```sh\n(.*?)```", section, re.S)
    assert found is not None, "no sh block under 'The broker'"
    return [line.strip() for line in found.group(1).replace("\\\n", " ").splitlines() if line.strip()]


@pytest.fixture()
def debian_root() -> Iterator[Path]:
    """``/`` of a Debian machine with the mosquitto package, in a directory Mosquitto's user can reach."""
    if os.geteuid() != 0:
        pytest.fail("this test runs Mosquitto as root so that it drops to the mosquitto user: run it as root")
    root = Path(tempfile.mkdtemp(prefix="m2mpay-root-"))
    try:
        root.chmod(0o755)
        (root / "etc" / "mosquitto" / "conf.d").mkdir(parents=True)
        conf = DEBIAN_MOSQUITTO_CONF
        for path in ("/run/mosquitto", "/var/lib/mosquitto", "/var/log/mosquitto", "/etc/mosquitto"):
            conf = conf.replace(f" {path}", f" {root}{path}")
        (root / "etc" / "mosquitto" / "mosquitto.conf").write_text(conf)
        for owned in ("run/mosquitto", "var/lib/mosquitto", "var/log/mosquitto"):
            (root / owned).mkdir(parents=True, exist_ok=True)
            shutil.chown(root / owned, "mosquitto", "mosquitto")
        (root / "etc" / "m2mpay").mkdir()
        yield root
    finally:
        pid = root / "run" / "mosquitto" / "mosquitto.pid"
        if pid.exists() and pid.read_text().strip():
            subprocess.run(["kill", pid.read_text().strip()], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def _restart(root: Path, port: int) -> str:
    """A bash function that does what ``systemctl restart mosquitto`` does for this root."""
    pid = root / "run" / "mosquitto" / "mosquitto.pid"
    return (f"restart_mosquitto() {{\n"
            f"  if [ -s {pid} ]; then p=$(cat {pid}); kill $p 2>/dev/null || true;"
            f" while kill -0 $p 2>/dev/null; do sleep 0.05; done; fi\n"
            f"  mosquitto -c {root}/etc/mosquitto/mosquitto.conf -d\n"
            f"  for _ in $(seq 200); do (exec 3<>/dev/tcp/127.0.0.1/{port}) 2>/dev/null && return 0; sleep 0.05; done\n"
            f"  echo 'mosquitto did not start' >&2; cat {root}/var/log/mosquitto/mosquitto.log >&2; return 1\n"
            f"}}\n")


def _connects(pki: Path, name: str | None, port: int) -> subprocess.CompletedProcess[str]:
    """One MQTT v5 publish over TLS as ``name`` (no client certificate when ``None``)."""
    login = ["--cert", str(pki / f"{name}.crt"), "--key", str(pki / f"{name}.key")] if name else []
    return subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "--cafile", str(pki / "ca.crt"),
                           *login, "-V", "mqttv5", "-q", "1", "-t", "m2mpay/bank-a/req/status", "-m", "x"],
                          capture_output=True, text=True, timeout=30)


def test_operator_guide_broker_block_on_a_debian_layout(debian_root: Path) -> None:
    root, port = debian_root, free_port()
    commands = _commands()
    assert any("add-client" in c for c in commands) and sum("systemctl restart mosquitto" in c for c in commands) == 2
    cli = f"{sys.executable} -m m2mpay.agents.cli"
    preamble = f"set -euo pipefail\nm2mpay() {{ {cli} \"$@\"; }}\n{_restart(root, port)}"
    pki = root / "etc" / "m2mpay" / "pki"
    first_restart = next(i for i, c in enumerate(commands) if c == "systemctl restart mosquitto")
    for number, command in enumerate(commands):
        mapped = (command.replace("/etc/", f"{root}/etc/").replace("/var/", f"{root}/var/")
                  .replace("broker.example.org", "127.0.0.1").replace("--port 8883", f"--port {port} --host 127.0.0.1")
                  .replace("systemctl restart mosquitto", "restart_mosquitto"))
        assert not re.search(r"(?<![\w.-])/(etc|var|run)/", mapped.replace(f"{root}/", "ROOT:")), mapped
        result = subprocess.run(["bash", "-c", preamble + mapped], cwd=ROOT, capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0, f"{command}\n{result.stdout}{result.stderr}"
        if number == first_restart:  # serving: every issued device connects, nobody without a certificate
            assert _connects(pki, "alice", port).returncode == 0
            assert _connects(pki, "meter-1", port).returncode == 0
            assert _connects(pki, None, port).returncode != 0

    conf = (root / "etc" / "mosquitto" / "conf.d" / "m2mpay.conf").read_text()
    assert f"listener {port} 127.0.0.1" in conf and "persistence_location" not in conf  # Debian's main config keeps it
    assert (pki.stat().st_gid, (pki / "broker.key").stat().st_mode & 0o777) == (_gid("mosquitto"), 0o640)
    # After the revocation and restart: the revoked device is refused, the others and the one added later connect.
    assert _connects(pki, "meter-1", port).returncode != 0
    assert _connects(pki, "alice", port).returncode == 0
    assert _connects(pki, "meter-2", port).returncode == 0
    expected = 2
    deadline = time.monotonic() + 10
    while True:  # the broker logs a refused handshake after the client has seen the refusal
        log = (root / "var" / "log" / "mosquitto" / "mosquitto.log").read_text()
        errors = [line.split(": ", 1)[1] for line in log.splitlines()  # the readiness check's bare TCP connect: EOF
                  if "Error" in line and "unexpected eof while reading" not in line]
        if len(errors) >= expected or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert errors == ["OpenSSL Error[0]: error:0A0000C7:SSL routines::peer did not return a certificate",  # no login
                      "OpenSSL Error[0]: error:0A000086:SSL routines::certificate verify failed"], log  # revoked


def _gid(group: str) -> int:
    import grp

    return grp.getgrnam(group).gr_gid
