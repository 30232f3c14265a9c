"""The installed system, service by service: issue 18's deployment findings 6 to 10.

Each service runs from its installed unit file, as its own uid, with the unit's paths and modes
(see sandbox.py for what of systemd is reproduced), against an install made by
``deploy/pi/install.sh --root`` (conftest.py).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import ssl
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .installs import LOCKS, REPO, UIDS, Deployment, install, run
from .sandbox import Host, Refused, Service, Unit

pytestmark = pytest.mark.network

WAIT = 30.0


def service(d: Deployment, role: str) -> Service:
    """The installed unit of ``role``, to be run as its uid."""
    return Service(d.host, Unit.load(d.host.path(f"/etc/systemd/system/m2mpay-{role}.service")), UIDS[role])


def wait_logged(svc: Service, process: subprocess.Popen[str], text: str) -> None:
    deadline = time.monotonic() + WAIT
    while text not in svc.log.read_text():
        if process.poll() is not None:
            pytest.fail(f"{svc.unit.name} exited with {process.returncode}:\n{svc.log.read_text()}")
        assert time.monotonic() < deadline, f"{svc.unit.name} never logged {text!r}:\n{svc.log.read_text()}"
        time.sleep(0.05)


def owners(directory: Path) -> set[int]:
    return {p.lstat().st_uid for p in [directory, *directory.rglob("*")]}


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def services(deployment: Deployment) -> Iterator[dict[str, Service]]:
    found = {role: service(deployment, role) for role in UIDS}
    yield found
    for svc in found.values():
        svc.close()


def test_finding6_services_can_read_their_config(deployment: Deployment, broker: object,
                                                 services: dict[str, Service]) -> None:
    """Bank, vendor and user run as three uids from their units: each reads its configuration and
    credentials and writes only its state directory; a user pays the vendor through the bank."""
    etc = deployment.host.path("/etc/m2mpay")
    assert mode(etc) == 0o755  # was 0750 from the earlier install: no service could enter it
    for name in ("vendor.toml", "user.toml"):
        assert mode(etc / name) == 0o644 and (etc / name).stat().st_uid == 0  # was 0640 root:root
    for secret in ("vendor.json", "user.json", "bank.env"):
        assert mode(etc / secret) == 0o600  # read by systemd (root), handed over as credentials
    bank, vendor, user = services["bank"], services["vendor"], services["user"]
    with bank.running() as bank_process:
        wait_logged(bank, bank_process, "serving on mqtts://")
        with vendor.running() as vendor_process:
            wait_logged(vendor, vendor_process, "serving CoAP")
            user.prepare()
            user.start_pre()  # the copy of user.toml and the credential links
            start = user.unit.one("ExecStart")
            assert start
            paid = user.run(user.command(start), timeout=120)
            assert paid.returncode == 0 and "paid meter-1" in paid.stdout, paid.stdout + paid.stderr
            assert vendor_process.poll() is None and bank_process.poll() is None
    assert (vendor.state / "vendor.sqlite3").is_file()
    assert (user.state / "wallet").is_dir() and (user.state / "user.toml").is_file()
    for svc in (bank, vendor, user):
        assert owners(svc.state) == {svc.uid}, f"{svc.unit.name}: {owners(svc.state)}"


def test_finding7_private_state_root_mode(deployment: Deployment, services: dict[str, Service],
                                          tmp_path: Path) -> None:
    """/var/lib/private is 0700 root:root (the earlier install left it 0755, which systemd refuses)."""
    private = deployment.host.path("/var/lib/private")
    st = private.stat()
    assert (mode(private), st.st_uid, st.st_gid) == (0o700, 0, 0)
    assert mode(private / "m2mpay") == 0o755 and mode(private / "m2mpay" / "bank") == 0o700
    link = deployment.host.path("/var/lib/m2mpay/bank")
    assert link.is_symlink() or not link.exists()  # the installer leaves that link to systemd
    services["bank"].prepare()  # what systemd checks before the first start
    (tmp_path / "var" / "lib" / "private").mkdir(parents=True, mode=0o755)  # what the old installer left
    (tmp_path / "var" / "lib" / "private").chmod(0o755)
    broken = Service(Host(tmp_path), Unit.load(REPO / "deploy" / "systemd" / "m2mpay-bank.service"), UIDS["bank"])
    try:
        with pytest.raises(Refused, match="too permissive"):  # and the check is real
            broken.prepare()
    finally:
        broken.close()


def test_finding8_keyset_add_leaves_files_service_owns(deployment: Deployment, broker: object,
                                                       services: dict[str, Service]) -> None:
    """The guide's keyset rotation, run as root through m2mpay-bank, leaves every file the bank's
    own; plain `m2mpay bank keyset add` as root is what broke the restart."""
    bank = services["bank"]
    bank.prepare()  # the service has run: systemd gave the data directory to its uid
    data = deployment.bank_data
    keys_as_service = ["/opt/m2mpay/venv/bin/m2mpay", "bank", "keys", "--data", "/var/lib/m2mpay/bank", "--json"]
    assert bank.run([deployment.host.map(a) for a in keys_as_service]).returncode == 0
    # the failure the finding describes: root writes keys/ks-….pem root:root 0600
    raw = run(deployment.m2mpay, "bank", "keyset", "add", "--data", data, "--value", "50", "--tokens", "50")
    assert (data / "keys" / f"{raw.stdout.strip()}.pem").stat().st_uid == 0
    broken = bank.run([deployment.host.map(a) for a in keys_as_service])
    assert broken.returncode != 0 and "permission denied" in broken.stderr
    deployment.admin("keys")  # any command through the wrapper hands back what root left behind
    assert owners(data) == {bank.uid}
    added = deployment.admin("keyset", "add", "--value", "500", "--tokens", "500", "--valid-days", "30")
    keyset = added.stdout.strip()
    assert owners(data) == {bank.uid} and mode(data / "keys" / f"{keyset}.pem") == 0o600
    listed = bank.run([deployment.host.map(a) for a in keys_as_service])
    assert listed.returncode == 0 and keyset in {k["id"] for k in json.loads(listed.stdout)["keysets"]}
    with bank.running() as process:  # systemd's restart: no recursive chown, the top level is already right
        wait_logged(bank, process, "serving on mqtts://")
    wrong = deployment.admin(check=False)
    assert wrong.returncode == 2 and len(wrong.stderr.strip().splitlines()) == 1


def _connects(port: int, context: ssl.SSLContext | None) -> bool:
    """A TLS (or plain) connection that completes an MQTT CONNECT with CONNACK 0."""
    connect = bytes([0x10, 12, 0, 4]) + b"MQTT" + bytes([4, 2, 0, 30, 0, 0])  # MQTT 3.1.1, clean, no client id
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            sock = context.wrap_socket(raw, server_hostname="localhost") if context else raw
            sock.sendall(connect)
            return sock.recv(4)[:4] == bytes([0x20, 2, 0, 0])
    except (OSError, ssl.SSLError):
        return False


def test_finding9_bank_role_tls_only_dropin(deployment: Deployment, broker: object, wheelhouse: Path,
                                            services: dict[str, Service]) -> None:
    host = deployment.host
    conf_d = host.path("/etc/mosquitto/conf.d")
    dropin = (conf_d / "m2mpay.conf").read_text()
    for line in ("listener 8883 0.0.0.0", "require_certificate true", "allow_anonymous false",
                 "cafile /etc/m2mpay/pki/ca.crt", "crlfile /etc/m2mpay/pki/ca.crl", "tls_version tlsv1.2",
                 "acl_file /var/lib/mosquitto/acl"):
        assert line in dropin.splitlines(), line
    assert "persistence_location" not in dropin  # Debian's mosquitto.conf has it: a second one is an error
    every = [host.path("/etc/mosquitto/mosquitto.conf"), *sorted(conf_d.glob("*.conf"))]
    listeners = [(p.name, line) for p in every for line in p.read_text().splitlines()
                 if re.match(r"\s*(listener|port)\b", line)]
    assert listeners == [("m2mpay.conf", "listener 8883 0.0.0.0")]  # no anonymous or plaintext listener
    pki = deployment.pki
    assert (pki.stat().st_gid, mode(pki), mode(pki / "broker.key"), mode(pki / "ca.key")) == \
        (_mosquitto_gid(), 0o750, 0o640, 0o600)  # the broker reads its key after dropping root; never the CA's
    port = deployment.broker_port
    assert not _connects(port, None)  # plaintext MQTT
    anonymous = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    assert not _connects(port, anonymous)  # TLS without a client certificate
    certified = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    certified.load_cert_chain(str(pki / "alice.crt"), str(pki / "alice.key"))
    assert _connects(port, certified)
    for role in UIDS:  # every unit logs in with TLS, certificates handed over by systemd
        unit = host.path(f"/etc/systemd/system/m2mpay-{role}.service").read_text()
        assert "mqtt://" not in unit and "LoadCredential=" in unit
        assert "--tls" in unit or role == "user"
    assert 'tls = "tls"' in host.path("/etc/m2mpay/user.toml").read_text()
    bank = services["bank"]
    with bank.running() as process:
        wait_logged(bank, process, "serving on mqtts://")
    # re-running keeps the operator's drop-ins, edited or not, and the broker's PKI and the bank
    (conf_d / "m2mpay.conf").write_text(dropin + "# tuned by the operator\n")
    before = {p: p.read_bytes() for p in [*conf_d.iterdir(), pki / "ca.crt", pki / "broker.crt",
                                          deployment.bank_data / "bank.json"]}
    wheel = next(host.path("/opt/m2mpay/dist").glob("m2mpay-*.whl"))
    again = install(host.root, "bank", "--wheel", wheel, "--wheelhouse", wheelhouse)
    assert "keeping" in again.stdout
    assert {p: p.read_bytes() for p in before} == before


def test_bank_unit_is_handed_each_workers_login_and_never_the_ca_key(deployment: Deployment, broker: object,
                                                                     wheelhouse: Path,
                                                                     services: dict[str, Service]) -> None:
    """The unit took its certificates from the PKI's directory one by one: ``bank`` only, so
    ``M2MPAY_BANK_WORKERS=2`` stopped it (exit 2, bank-2 missing). It is now handed a directory of
    the bank's logins alone, which the installer fills from the PKI on every run."""
    host = deployment.host
    tls = host.path("/etc/m2mpay/bank-tls")
    assert (mode(tls), tls.stat().st_uid) == (0o700, 0)
    assert sorted(p.name for p in tls.iterdir()) == ["bank.crt", "bank.key", "ca.crt"]
    assert {mode(p) for p in tls.iterdir()} == {0o600}
    unit = host.path("/etc/systemd/system/m2mpay-bank.service").read_text()
    assert "/etc/m2mpay/pki" not in unit  # the PKI's directory holds the CA's key
    run(deployment.m2mpay, "broker", "pki", "add-client", "bank-2", "--role", "bank", "--dir", deployment.pki)
    wheel = next(host.path("/opt/m2mpay/dist").glob("m2mpay-*.whl"))
    install(host.root, "bank", "--wheel", wheel, "--wheelhouse", wheelhouse)
    assert sorted(p.name for p in tls.iterdir()) == ["bank-2.crt", "bank-2.key", "bank.crt", "bank.key", "ca.crt"]
    env = host.path("/etc/m2mpay/bank.env")
    before = env.read_text()
    env.write_text(re.sub(r"(?m)^M2MPAY_BANK_WORKERS=.*$", "M2MPAY_BANK_WORKERS=2", before))
    try:
        bank = services["bank"]
        with bank.running() as process:
            wait_logged(bank, process, "serving on mqtts://")  # past the check of every worker's login
    finally:
        env.write_text(before)


def _mosquitto_gid() -> int:
    import grp

    return grp.getgrnam("mosquitto").gr_gid


def _requirements(lock: Path) -> dict[str, tuple[str, list[str]]]:
    """name → (version, hashes) of a hashed requirements file."""
    found: dict[str, tuple[str, list[str]]] = {}
    for line in lock.read_text().replace("\\\n", " ").splitlines():
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        spec = entry.split()[0]
        assert re.fullmatch(r"[A-Za-z0-9._-]+==[A-Za-z0-9.+!-]+", spec), f"{lock.name}: not pinned: {spec}"
        name, version = spec.split("==")
        found[name.lower().replace("_", "-")] = (version, re.findall(r"--hash=sha256:([0-9a-f]{64})", entry))
    return found


def test_installer_pins_hashed_wheel(deployment: Deployment, open_tmp: Path) -> None:
    """Dependencies pinned with hashes, the package from a wheel into /opt/m2mpay (not the checkout),
    and the wheel built by the checkout's owner, not by root."""
    import tomllib

    runtime = _requirements(LOCKS[0])
    assert all(hashes for _, hashes in runtime.values()) and _requirements(LOCKS[1])["setuptools"][1]
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for dependency in declared:
        assert re.split(r"[<>=!~ ;\[]", dependency)[0].lower() in runtime, dependency
    python = deployment.host.path("/opt/m2mpay/venv/bin/python")
    frozen = run(python, "-m", "pip", "list", "--format=json", "--exclude", "pip", "--exclude", "setuptools").stdout
    installed = {p["name"].lower().replace("_", "-"): p["version"] for p in json.loads(frozen)}
    assert installed.pop("m2mpay") == "0.1.0"
    assert installed == {name: version for name, (version, _) in runtime.items()}
    where = subprocess.run([python, "-c", "import m2mpay.agents as agents, json, importlib.metadata as m; "
                            "print(agents.__file__); print(m.distribution('m2mpay').read_text('direct_url.json'))"],
                           capture_output=True, text=True, cwd="/", check=True).stdout.splitlines()
    assert where[0].startswith(str(deployment.host.path("/opt/m2mpay/venv")))
    assert json.loads(where[1])["url"].endswith(".whl")  # from a wheel, not an editable or a directory
    checkout = _checkout_copy(open_tmp, owner=61874)
    plan = run("bash", checkout / "deploy" / "pi" / "install.sh", "--role", "vendor", "--root", open_tmp / "empty",
               "--dry-run").stdout
    build = [line for line in plan.splitlines() if "pip wheel" in line]
    assert build and all("setpriv --reuid=61874" in line for line in build), plan
    pips = [line for line in plan.splitlines() if re.search(r"pip\S* install", line)]
    assert pips and all("--require-hashes" in line and "--only-binary :all:" in line for line in pips), plan
    assert not any(word.rstrip("/") == str(checkout) for line in pips for word in line.split())  # nor the checkout


@pytest.fixture
def open_tmp() -> Iterator[Path]:
    """A temporary directory other users can reach (pytest's own are root's alone)."""
    directory = Path(tempfile.mkdtemp(prefix="m2mpay-test-"))
    directory.chmod(0o755)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def _checkout_copy(directory: Path, owner: int) -> Path:
    """The installer's part of the checkout, owned by ``owner`` (a user who cloned it)."""
    checkout = directory / "checkout"
    shutil.copytree(REPO / "deploy", checkout / "deploy")
    shutil.copy(REPO / "pyproject.toml", checkout / "pyproject.toml")
    (directory / "empty").mkdir()
    for path in [checkout, *checkout.rglob("*")]:
        os.lchown(path, owner, owner)
    return checkout


def _snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    return {str(p): (p.lstat().st_mode, p.lstat().st_uid, p.lstat().st_mtime_ns) for p in [root, *root.rglob("*")]}


def test_dry_run_as_non_root(deployment: Deployment, open_tmp: Path) -> None:
    """A dry run by a user who cannot see /var/lib/private or the PKI does not claim steps a real run
    would skip: those are marked '?', and nothing changes."""
    root = deployment.host.root
    wheel = next(deployment.host.path("/opt/m2mpay/dist").glob("m2mpay-*.whl"))
    checkout = _checkout_copy(open_tmp, owner=0)
    script = checkout / "deploy" / "pi" / "install.sh"
    args = ["--role", "bank", "--root", str(root), "--dry-run", "--wheel", str(wheel)]
    before = _snapshot(root)
    as_root = run("bash", script, *args).stdout
    as_user = run("setpriv", "--reuid=61875", "--regid=61875", "--clear-groups", "bash", script, *args).stdout
    assert _snapshot(root) == before
    steps = {line for line in as_root.splitlines() if line.startswith("+ ")}
    claimed = {line for line in as_user.splitlines() if line.startswith("+ ")}
    assert claimed <= steps, claimed - steps
    assert not any("bank init" in line for line in steps)  # root sees the bank exists
    assert any(line.startswith("? ") and "bank init" in line for line in as_user.splitlines()), as_user
    assert "cannot tell" in as_user
    refused = run("setpriv", "--reuid=61875", "--regid=61875", "--clear-groups", "bash", script, "--role", "bank",
                  "--root", str(root), check=False)
    assert refused.returncode == 1 and len(refused.stderr.strip().splitlines()) == 1  # a real run needs root
