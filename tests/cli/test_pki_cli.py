"""``broker pki add-client NAME``: one new client certificate, and not one other byte changed."""

from __future__ import annotations

import subprocess
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.commands import m2mpay, one_line


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _san(path: Path) -> list[str]:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return sorted(str(n.value) for n in names)


def test_add_client_touches_nothing_else(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    m2mpay("broker", "pki", "--dir", pki, "--client", "bank", "--server-name", "broker.example.org")
    before = _files(pki)
    san = _san(pki / "broker.crt")
    assert san == ["broker.example.org"]

    result = m2mpay("broker", "pki", "add-client", "meter-7", "--dir", pki)
    assert result.stdout.strip() == (f"meter-7's certificate and key in {pki}: meter-7.crt, meter-7.key "
                                     "(nothing else changed)")
    after = _files(pki)
    assert set(after) - set(before) == {"meter-7.crt", "meter-7.key"}
    assert {name: data for name, data in after.items() if name in before} == before  # every byte as it was
    assert _san(pki / "broker.crt") == san
    assert (pki / "meter-7.key").stat().st_mode & 0o777 == 0o600

    cert = x509.load_pem_x509_certificate(after["meter-7.crt"])
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "meter-7"
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    verified = subprocess.run(["openssl", "verify", "-x509_strict", "-CAfile", str(pki / "ca.crt"),
                               str(pki / "meter-7.crt")], capture_output=True, text=True)
    assert verified.returncode == 0, verified.stderr


def test_add_client_refuses_a_name_in_use_and_changes_nothing(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    m2mpay("broker", "pki", "--dir", pki, "--client", "meter-1")
    before = _files(pki)
    again = m2mpay("broker", "pki", "add-client", "meter-1", "--dir", pki, check=False)
    assert again.returncode == 2 and "a client named 'meter-1' was issued already" in one_line(again.stderr)
    reserved = m2mpay("broker", "pki", "add-client", "broker", "--dir", pki, check=False)  # would replace the broker's
    assert reserved.returncode == 2 and "not a client name" in one_line(reserved.stderr)
    escape = m2mpay("broker", "pki", "add-client", "../x", "--dir", pki, check=False)
    assert escape.returncode == 2 and "not a client name" in one_line(escape.stderr)
    assert _files(pki) == before
    assert not (tmp_path / "x.crt").exists()


def test_add_client_without_a_ca_makes_none(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    result = m2mpay("broker", "pki", "add-client", "meter-1", "--dir", empty, check=False)
    assert result.returncode == 2
    assert one_line(result.stderr) == (f"m2mpay: broker: no CA in {empty} (ca.key): run 'm2mpay broker pki "
                                        f"--dir {empty}' first")
    assert list(empty.iterdir()) == []
