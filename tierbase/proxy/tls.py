"""TLS for the proxy: a platform CA and a server certificate made at first `up`, or the operator's own.

Clients verify the proxy with the CA (``sslmode=verify-full sslrootcert=ca.crt``);
SCRAM channel binding (``tls-server-end-point``) binds the password exchange
to the certificate the client saw. Keys are written 0600 by their owner.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..errors import InvalidInput

VALID_DAYS = 825  # the longest lifetime clients accept for a server certificate


@dataclass(frozen=True)
class TlsFiles:
    ca: Path      # the CA certificate clients trust (public)
    cert: Path    # the proxy's certificate (chain: server, then CA)
    key: Path     # its private key (0600)

    def certificate_pem(self) -> str:
        """The server certificate alone (the first PEM block), as channel binding hashes it."""
        text = self.cert.read_text()
        end = text.index("-----END CERTIFICATE-----") + len("-----END CERTIFICATE-----")
        return text[:end] + "\n"

    def context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(self.cert, self.key)
        except (OSError, ssl.SSLError) as err:
            raise InvalidInput(f"the proxy's TLS certificate {self.cert} or key {self.key} cannot be used: {err}",
                               "Give a PEM certificate and its unencrypted PEM key, or remove them to let "
                               "`tierbase up` make its own") from err
        return ctx


def _write(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    path.chmod(mode)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "tierbase"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def ensure_certificates(directory: Path, hosts: list[str] | None = None) -> TlsFiles:
    """The CA and server certificate under ``directory``, made on first use."""
    files = TlsFiles(directory / "ca.crt", directory / "server.crt", directory / "server.key")
    if files.ca.exists() and files.cert.exists() and files.key.exists():
        return files
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("tierbase platform CA")
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=3650))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                       crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    names: list[x509.GeneralName] = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                     x509.IPAddress(ipaddress.ip_address("::1"))]
    for host in [socket.gethostname(), *(hosts or [])]:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(_name("localhost")).issuer_name(ca_name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    _write(files.key, key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()), 0o600)
    _write(directory / "ca.key", ca_key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                      serialization.NoEncryption()), 0o600)
    _write(files.cert, cert.public_bytes(pem) + ca.public_bytes(pem), 0o644)
    _write(files.ca, ca.public_bytes(pem), 0o644)
    return files
