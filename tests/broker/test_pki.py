"""The broker's PKI and TLS listener: strict X.509, revocation at the broker, AEAD-only TLS 1.2.

Issue 18, finding 10 and its companions: certificates without key identifiers failed
``openssl verify -x509_strict``; nothing could revoke a device's certificate at the broker; the
listener accepted CBC suites on TLS 1.2.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
from pathlib import Path

import pytest

from m2mpay.agents.cli import main
from m2mpay.broker.launcher import Mosquitto
from m2mpay.broker.pki import make_pki, revoke
from tests.broker.clients import WAIT, TlsClient

pytestmark = pytest.mark.network

OPENSSL = shutil.which("openssl")


def _openssl(*args: str | Path, stdin: str = "") -> subprocess.CompletedProcess[str]:
    assert OPENSSL, "openssl is needed to check the certificates and the listener"
    return subprocess.run([OPENSSL, *map(str, args)], input=stdin, capture_output=True, text=True, timeout=30)


def test_certificates_pass_x509_strict(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    make_pki(pki, ("alice", "mallory"))
    revoke(pki, "mallory")
    ca = pki / "ca.crt"
    for name, purpose in (("ca", "any"), ("broker", "sslserver"), ("alice", "sslclient")):
        result = _openssl("verify", "-x509_strict", "-purpose", purpose, "-CAfile", ca, pki / f"{name}.crt")
        assert result.returncode == 0, result.stdout + result.stderr
    crl_checked = ("verify", "-x509_strict", "-crl_check", "-CAfile", ca, "-CRLfile", pki / "ca.crl")
    assert _openssl(*crl_checked, pki / "alice.crt").returncode == 0
    revoked = _openssl(*crl_checked, pki / "mallory.crt")
    assert revoked.returncode != 0 and "revoked" in revoked.stdout + revoked.stderr
    text = _openssl("x509", "-noout", "-text", "-in", pki / "alice.crt").stdout
    assert "Subject Key Identifier" in text and "Authority Key Identifier" in text
    days = _openssl("x509", "-noout", "-checkend", str(398 * 86400), "-in", pki / "alice.crt")
    assert days.returncode == 1  # a device certificate lasts a year (not 825 days)


def test_finding10_revoked_device_refused_at_broker(tmp_path: Path) -> None:
    """A real Mosquitto with the generated TLS config: mallory connects, is revoked, and after the
    broker re-reads its CRL her handshake fails while alice still connects."""
    pki = tmp_path / "pki"
    make_pki(pki, ("bank", "alice", "mallory"))
    with Mosquitto(tmp_path / "mq", bank="b1", tls_dir=pki) as broker:
        assert f"crlfile {pki.resolve() / 'ca.crl'}" in (tmp_path / "mq" / "mosquitto.conf").read_text()
        assert _mqtt_connects(broker, pki, "mallory")  # not revoked yet: she gets in
        revoke(pki, "mallory")
        broker.stop()  # Mosquitto reads the CRL when it starts
        broker.start()
        alice = TlsClient(broker, pki, "alice")
        assert alice.client.is_connected()
        assert not _mqtt_connects(broker, pki, "mallory")  # TLS 1.3: refused once she has sent her certificate
        handshake = _s_client(broker, pki, "-tls1_2", name="mallory")
        assert handshake.returncode != 0 and "certificate revoked" in handshake.stdout + handshake.stderr
        assert _s_client(broker, pki, "-tls1_2", name="alice").returncode == 0
        assert alice.client.is_connected()
        alice.close()


def test_finding10_revoke_from_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pki = tmp_path / "pki"
    assert main(["broker", "pki", "--dir", str(pki), "--client", "meter-1", "--client", "alice"]) == 0
    assert (pki / "ca.crl").stat().st_mode & 0o777 == 0o644  # the broker reads it after dropping root
    assert main(["broker", "pki", "revoke", "meter-1", "--dir", str(pki)]) == 0
    assert "meter-1" in capsys.readouterr().out
    listed = _openssl("crl", "-noout", "-text", "-in", pki / "ca.crl").stdout
    serial = _openssl("x509", "-noout", "-serial", "-in", pki / "meter-1.crt").stdout.strip().split("=")[1]
    assert serial.lstrip("0").upper() in listed.replace(":", "").upper()
    assert main(["broker", "pki", "revoke", "nobody", "--dir", str(pki)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "nobody" in err
    assert main(["broker", "pki", "revoke", "ca", "--dir", str(pki)]) == 2  # not a client
    capsys.readouterr()
    old = tmp_path / "old"  # a PKI from before CRLs: the config is refused with the fix in one line
    make_pki(old, ())
    (old / "ca.crl").unlink()
    assert main(["broker", "config", "--data", str(tmp_path / "mq"), "--bank", "b1", "--tls", str(old)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "ca.crl" in err and "broker pki" in err


def _mqtt_connects(broker: Mosquitto, pki: Path, name: str) -> bool:
    """TLS (1.3 if offered) with ``name``'s certificate, then an MQTT CONNECT: ``True`` on CONNACK 0."""
    context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    context.load_cert_chain(str(pki / f"{name}.crt"), str(pki / f"{name}.key"))
    connect = bytes([0x10, 12, 0, 4]) + b"MQTT" + bytes([4, 2, 0, 30, 0, 0])  # MQTT 3.1.1, clean, no client id
    try:
        with socket.create_connection(("127.0.0.1", broker.port), timeout=WAIT) as raw, \
                context.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(connect)
            return tls.recv(4) == bytes([0x20, 2, 0, 0])
    except (OSError, ssl.SSLError):
        return False


def _s_client(broker: Mosquitto, pki: Path, *options: str, name: str = "alice") -> subprocess.CompletedProcess[str]:
    """A TLS handshake with ``name``'s certificate (then EOF): exit 0 only if it completed."""
    return _openssl("s_client", "-connect", f"127.0.0.1:{broker.port}", "-servername", "localhost",
                    "-CAfile", pki / "ca.crt", "-cert", pki / f"{name}.crt", "-key", pki / f"{name}.key",
                    "-verify_return_error", *options)


def test_tls12_cbc_suites_refused(tmp_path: Path) -> None:
    """The generated listener speaks TLS 1.2 only with AEAD suites (and TLS 1.3); a client certificate
    is presented every time, so a refusal is the suite's or the version's, not the login's."""
    pki = tmp_path / "pki"
    make_pki(pki, ("bank", "alice"))
    with Mosquitto(tmp_path / "mq", bank="b1", tls_dir=pki) as broker:
        conf = (tmp_path / "mq" / "mosquitto.conf").read_text()
        assert "tls_version tlsv1.2" in conf and "CBC" not in conf and "SHA256:" not in conf.replace("GCM-SHA256:", "")
        good = _s_client(broker, pki, "-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-GCM-SHA256")
        assert good.returncode == 0 and "ECDHE-ECDSA-AES128-GCM-SHA256" in good.stdout, good.stdout + good.stderr
        assert _s_client(broker, pki, "-tls1_3").returncode == 0
        for cbc in ("ECDHE-ECDSA-AES128-SHA256", "ECDHE-ECDSA-AES256-SHA384", "ECDHE-ECDSA-AES128-SHA"):
            refused = _s_client(broker, pki, "-tls1_2", "-cipher", cbc)
            assert refused.returncode != 0, f"{cbc} was accepted: {refused.stdout}"
        old = _s_client(broker, pki, "-tls1_1", "-cipher", "ECDHE-ECDSA-AES128-SHA:@SECLEVEL=0")
        assert old.returncode != 0
