"""A small PKI for the broker: a CA, the broker's certificate, one certificate per client, a CRL.

Clients log in with their certificate; Mosquitto takes the certificate's CN as the username
(``use_identity_as_username``) and as the client id (``use_username_as_clientid``), and the ACL
lets each read only its own answers. Keys are ECDSA P-256, written with mode 0600.

Certificates carry Subject and Authority Key Identifiers and key usages, so they pass
``openssl verify -x509_strict``. A client certificate lasts :data:`LEAF_DAYS`; the CA
:data:`CA_DAYS`. :func:`revoke` lists a client's certificate in ``ca.crl``, which the generated
broker configuration names (``crlfile``): Mosquitto reads it when it starts, so restart it after
a revocation. The CRL is valid as long as the CA: an expired CRL would lock every device out.

Roles: the bank's processes log in as ``bank``, ``bank-2``, ``bank-3`` … (:func:`bank_logins`), one
certificate per worker, since the broker keeps one session per client id and a second login with
the same certificate takes the first one's session over. Those names are the bank's alone
(:func:`is_bank_login`): the ACL gives them the bank's grants, so they are issued only with
``role="bank"``, and a device (``role="device"``, the default) can never be given one.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["BANK_LOGIN", "CA_DAYS", "CRL_NAME", "DEFAULT_SERVER_NAMES", "LEAF_DAYS", "ROLES", "add_client",
           "bank_logins", "is_bank_login", "make_pki", "revoke"]

LEAF_DAYS = 365
"""Lifetime of the broker's and the clients' certificates: renew yearly with ``broker pki`` again."""
CA_DAYS = 3650
CRL_NAME = "ca.crl"
DEFAULT_SERVER_NAMES = ("localhost", "127.0.0.1")

_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")  # a file name and an MQTT username: no '/', no wildcard
_RESERVED = ("ca", "broker")
BANK_LOGIN = "bank"
"""The first bank worker's certificate name; worker ``i`` (from 2) is ``bank-{i}``."""
_BANK_WORKER = re.compile(r"bank-[0-9]+")  # every such name is the bank's, bank-02 included
ROLES = ("device", "bank")
"""Who a client certificate is for: a device (vendor, wallet) or one of the bank's workers."""


def bank_logins(count: int) -> tuple[str, ...]:
    """The certificate names of ``count`` bank workers: ``bank``, ``bank-2`` … ``bank-{count}``."""
    if not 1 <= count <= 9999:
        raise ValueError(f"{count} bank workers: give 1 to 9999")
    return (BANK_LOGIN, *(f"{BANK_LOGIN}-{i}" for i in range(2, count + 1)))


def is_bank_login(name: str) -> bool:
    """Whether ``name`` is reserved for the bank's workers (``bank``, ``bank-<digits>``)."""
    return name == BANK_LOGIN or _BANK_WORKER.fullmatch(name) is not None


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))


def _write_public(path: Path, data: bytes) -> None:
    """Write a certificate or CRL whole (a temporary file renamed into place), mode 0644."""
    temporary = path.with_name(f".{path.name}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    with os.fdopen(fd, "wb") as handle:
        os.fchmod(handle.fileno(), 0o644)
        handle.write(data)
    os.replace(temporary, path)


def _usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=True, key_cert_sign=ca, crl_sign=ca, content_commitment=False,
                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                         encipher_only=False, decipher_only=False)


def _cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Certificate | None,
          signer: ec.EllipticCurvePrivateKey, days: int, *, server_names: tuple[str, ...] = (),
          usage: x509.ObjectIdentifier | None = None) -> x509.Certificate:
    """A certificate for ``key``; ``issuer`` ``None`` makes the self-signed CA."""
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    ca = issuer is None
    issuer_public = signer.public_key()
    builder = (x509.CertificateBuilder()
               .subject_name(name).issuer_name(name if issuer is None else issuer.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
               .add_extension(_usage(ca=ca), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_public), critical=False))
    if server_names:
        names: list[x509.GeneralName] = []
        for server in server_names:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(server)))
            except ValueError:
                names.append(x509.DNSName(server))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return builder.sign(signer, hashes.SHA256())


def _load_ca(directory: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key_path, cert_path = directory / "ca.key", directory / "ca.crt"
    if not key_path.exists():
        raise FileNotFoundError(f"no CA in {directory} (ca.key): run 'm2mpay broker pki --dir {directory}' first")
    loaded = serialization.load_pem_private_key(key_path.read_bytes(), None)
    if not isinstance(loaded, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{key_path} is not an EC key")
    return loaded, x509.load_pem_x509_certificate(cert_path.read_bytes())


def _write_crl(directory: Path, ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate,
               revoked: list[x509.RevokedCertificate], number: int) -> None:
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateRevocationListBuilder()
               .issuer_name(ca_cert.subject)
               .last_update(now - datetime.timedelta(minutes=5))
               .next_update(ca_cert.not_valid_after_utc)
               .add_extension(x509.CRLNumber(number), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False))
    for entry in revoked:
        builder = builder.add_revoked_certificate(entry)
    _write_public(directory / CRL_NAME, builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))


def _check_name(name: str, role: str = "device") -> None:
    if not _NAME.fullmatch(name) or name in _RESERVED:
        raise ValueError(f"{name!r} is not a client name ([A-Za-z0-9._-], at most 64, not 'ca' or 'broker')")
    if role not in ROLES:
        raise ValueError(f"{role!r} is not a role ({', '.join(ROLES)})")
    # The ACL grants these names the bank's topics: a device under one would read every request
    if role == "device" and is_bank_login(name):
        raise ValueError(f"{name!r} is reserved for the bank's workers (bank, bank-2, bank-3 …): a device "
                         "cannot have it; issue it for the bank with 'broker pki add-client NAME --role bank'")
    if role == "bank" and not is_bank_login(name):
        raise ValueError(f"{name!r} is not a bank worker's name: the bank's workers are bank, bank-2, bank-3 …")


def make_pki(directory: Path, clients: tuple[str, ...], server_names: tuple[str, ...] | None = None,
             days: int = LEAF_DAYS, *, bank_workers: int = 0) -> None:
    """Write ``ca.crt``/``ca.key``, ``broker.crt``/``broker.key``, ``<client>.crt``/``.key`` and ``ca.crl``.

    An existing CA (and its CRL) is reused, so clients can be added or renewed later without
    re-issuing everything. The broker's certificate is issued when missing or when
    ``server_names`` are given; each listed client's certificate is issued anew, and with
    ``bank_workers`` so are the bank's :func:`bank_logins`. ``clients`` are devices, except
    ``bank`` itself, accepted there as the single bank process's login (PKIs made before workers
    had their own); ``bank-2`` and the other workers' names are refused there.
    """
    names = tuple(bank_logins(bank_workers)) if bank_workers else ()
    for client in clients:
        _check_name(client, "bank" if client == BANK_LOGIN else "device")
    clients = (*names, *(client for client in clients if client not in names))
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    if (directory / "ca.key").exists():
        ca_key, ca_cert = _load_ca(directory)
    else:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_cert = _cert("m2mpay broker CA", ca_key, None, ca_key, CA_DAYS)
        _write_key(directory / "ca.key", ca_key)
        _write_public(directory / "ca.crt", ca_cert.public_bytes(serialization.Encoding.PEM))
    if not (directory / CRL_NAME).exists():
        _write_crl(directory, ca_key, ca_cert, [], 1)
    issued: list[tuple[str, tuple[str, ...], x509.ObjectIdentifier]] = []
    if server_names is not None or not (directory / "broker.crt").exists():
        issued.append(("broker", server_names or DEFAULT_SERVER_NAMES, ExtendedKeyUsageOID.SERVER_AUTH))
    issued += [(client, (), ExtendedKeyUsageOID.CLIENT_AUTH) for client in clients]
    for name, names, usage in issued:
        _issue(directory, name, ca_key, ca_cert, days, names, usage)


def _issue(directory: Path, name: str, ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, days: int,
           server_names: tuple[str, ...], usage: x509.ObjectIdentifier) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _cert(name, key, ca_cert, ca_key, days, server_names=server_names, usage=usage)
    _write_key(directory / f"{name}.key", key)
    _write_public(directory / f"{name}.crt", cert.public_bytes(serialization.Encoding.PEM))


def add_client(directory: Path, name: str, days: int = LEAF_DAYS, *, role: str = "device") -> None:
    """Issue one new client's ``NAME.crt``/``NAME.key`` from the existing CA; write nothing else.

    Unlike :func:`make_pki` it never creates a CA, a CRL or the broker's certificate, so adding a
    device to a running broker's PKI cannot change what the broker serves. A name that already
    has a certificate is refused: renewing one is ``make_pki`` with that client, on purpose.
    ``role`` ``"bank"`` issues one of :func:`bank_logins` (a bank worker); a device never gets one.
    """
    _check_name(name, role)
    ca_key, ca_cert = _load_ca(directory)
    for suffix in (".crt", ".key"):
        if (directory / f"{name}{suffix}").exists():
            raise FileExistsError(f"{directory / (name + suffix)} exists: a client named {name!r} was issued "
                                  f"already (renew it with 'm2mpay broker pki --dir {directory} --client {name}')")
    _issue(directory, name, ca_key, ca_cert, days, (), ExtendedKeyUsageOID.CLIENT_AUTH)


def revoke(directory: Path, name: str) -> int:
    """List client ``name``'s current certificate in ``ca.crl``; return its serial number.

    Revoking twice changes nothing. Restart the broker afterwards: it reads the CRL at start-up.
    """
    _check_name(name, "bank" if is_bank_login(name) else "device")  # a bank worker's too
    cert_path = directory / f"{name}.crt"
    if not cert_path.exists():
        raise FileNotFoundError(f"no certificate {cert_path}: nothing to revoke")
    ca_key, ca_cert = _load_ca(directory)
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    if cert.issuer != ca_cert.subject:
        raise ValueError(f"{cert_path} was not issued by the CA in {directory}")
    revoked: list[x509.RevokedCertificate] = []
    number = 1
    crl_path = directory / CRL_NAME
    if crl_path.exists():
        crl = x509.load_pem_x509_crl(crl_path.read_bytes())
        revoked = list(crl)
        number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number + 1
    if all(entry.serial_number != cert.serial_number for entry in revoked):
        revoked.append(x509.RevokedCertificateBuilder().serial_number(cert.serial_number)
                       .revocation_date(datetime.datetime.now(datetime.UTC)).build())
    _write_crl(directory, ca_key, ca_cert, revoked, number)
    return cert.serial_number
