"""TLS and SuperNode-authentication material for a Flower deployment, made with `cryptography`.

- a certificate authority (self-signed, CA:TRUE) whose certificate every SuperNode and the `flwr` CLI
  trust (`--root-certificates`, `root-certificates`);
- the SuperLink's server certificate, signed by that CA, for the host names and IP addresses the nodes
  dial (subjectAltName; TLS clients check it, not the common name);
- one ECDSA P-384 key pair per SuperNode in OpenSSH format: the private key stays on the node
  (`--auth-supernode-private-key`), the public key is registered with the SuperLink
  (`flwr supernode register`), which then refuses any node whose key it does not know.

Private keys are written with mode 0600.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedemb.errors import ConfigError

CA_CERT, CA_KEY = "ca.crt", "ca.key"
NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
SERVER_CERT, SERVER_KEY = "server.pem", "server.key"


@dataclass
class ServerCredentials:
    ca_cert: Path
    server_cert: Path
    server_key: Path


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _subject_alternative_names(hosts: list[str]) -> list[x509.GeneralName]:
    names = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if not host or any(c.isspace() for c in host):
                raise ConfigError(f"not a host name or IP address: {host!r}") from None
            names.append(x509.DNSName(host))
    return names


def make_server_credentials(folder: Path, hosts: list[str], days: int = 365) -> ServerCredentials:
    """A CA and a SuperLink certificate for `hosts` (e.g. ["127.0.0.1", "localhost"]) under `folder`."""
    if not hosts:
        raise ConfigError("the SuperLink certificate needs at least one host name or IP address")
    if days < 1:
        raise ConfigError(f"certificate validity must be >= 1 day, got {days}")
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedemb deployment CA")])
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(start).not_valid_after(end)
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                            key_encipherment=False, data_encipherment=False, key_agreement=False,
                                            key_cert_sign=True, crl_sign=True, encipher_only=False,
                                            decipher_only=False), critical=True)
               .sign(ca_key, hashes.SHA384()))

    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
                   .issuer_name(ca_name).public_key(server_key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                   .add_extension(x509.SubjectAlternativeName(_subject_alternative_names(hosts)), critical=False)
                   .sign(ca_key, hashes.SHA384()))

    creds = ServerCredentials(folder / CA_CERT, folder / SERVER_CERT, folder / SERVER_KEY)
    creds.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(folder / CA_KEY, _pem_key(ca_key))
    creds.server_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(creds.server_key, _pem_key(server_key))
    return creds


def checked_node_name(name: str) -> str:
    """A device's name: its key's comment, the server's file name for it, and how it is shown."""
    if not NODE_NAME.fullmatch(name):
        raise ConfigError(f"device name {name!r} must be 1-64 letters, digits, '.', '_' or '-', "
                          "starting with a letter or digit")
    return name


def make_node_key(folder: Path, name: str) -> tuple[Path, Path]:
    """An OpenSSH ECDSA P-384 key pair `folder/name` (private, 0600) and `folder/name.pub`."""
    checked_node_name(name)
    key = ec.generate_private_key(ec.SECP384R1())
    private = folder / name
    public = folder / f"{name}.pub"
    _write_private(private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                              serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH) + f" {name}\n".encode())
    return private, public


def certificate_hosts(cert_file: Path) -> list[str]:
    """The host names and IP addresses a certificate is valid for (its subjectAltName)."""
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] + names.get_values_for_type(x509.DNSName)

