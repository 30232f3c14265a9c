"""A small PKI for the broker: a CA, the broker's certificate, one certificate per client.

Clients log in with their certificate; Mosquitto takes the certificate's CN as the username
(``use_identity_as_username``) and as the client id (``use_username_as_clientid``), and the ACL
lets each read only its own answers. Keys are ECDSA P-256, written with mode 0600.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["make_pki"]


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))


def _cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name, signer: ec.EllipticCurvePrivateKey,
          days: int, *, ca: bool = False, server_names: tuple[str, ...] = (),
          usage: ExtendedKeyUsageOID | None = None) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .issuer_name(issuer).public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                      content_commitment=False, key_encipherment=False,
                                                      data_encipherment=False, key_agreement=False,
                                                      encipher_only=False, decipher_only=False), critical=True)
    if server_names:
        names: list[x509.GeneralName] = []
        for name in server_names:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                names.append(x509.DNSName(name))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return builder.sign(signer, hashes.SHA256())


def make_pki(directory: Path, clients: tuple[str, ...], server_names: tuple[str, ...] = ("localhost", "127.0.0.1"),
             days: int = 825) -> None:
    """Write ``ca.crt``/``ca.key``, ``broker.crt``/``broker.key`` and ``<client>.crt``/``.key``.

    An existing CA is reused, so clients can be added later without re-issuing everything.
    """
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    ca_key_path, ca_cert_path = directory / "ca.key", directory / "ca.crt"
    if ca_key_path.exists():
        loaded = serialization.load_pem_private_key(ca_key_path.read_bytes(), None)
        if not isinstance(loaded, ec.EllipticCurvePrivateKey):
            raise ValueError("ca.key is not an EC key")
        ca_key, ca_cert = loaded, x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
    else:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "m2mpay broker CA")])
        ca_cert = _cert("m2mpay broker CA", ca_key, ca_name, ca_key, days * 2, ca=True)
        _write_key(ca_key_path, ca_key)
        ca_cert_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    issued = [("broker", server_names, ExtendedKeyUsageOID.SERVER_AUTH)]
    issued += [(client, (), ExtendedKeyUsageOID.CLIENT_AUTH) for client in clients]
    for name, names, usage in issued:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _cert(name, key, ca_cert.subject, ca_key, days, server_names=names, usage=usage)
        _write_key(directory / f"{name}.key", key)
        (directory / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
