"""A local certificate authority for development and tests (`rtml certs dev`).

    pki = mint_dev_pki(home / "certs", hosts=["rtml.example.internal"])
    pki.server_cert, pki.server_key    # the TLS entry's and every Ray process's certificate
    pki.client_cert, pki.client_key    # a client's, for mutual TLS at the entry
    pki.ca_cert                        # what both sides trust

One CA signs two leaf certificates:

- the server certificate, for the HTTPS entry (``security.tls_cert_file``) and for Ray's own TLS
  between its processes (``RAY_TLS_SERVER_CERT``). Its names (subject alternative names) are
  localhost, 127.0.0.1, ::1, this machine's host names and addresses and any ``hosts`` given. It
  is good for both server and client authentication, because Ray's gRPC TLS is mutual: each Ray
  process presents the same certificate when it calls another.
- the client certificate (client authentication only), for callers of an entry that requires
  client certificates (``security.tls_client_auth``).

Keys are ECDSA P-256 (cheap handshakes; OpenSSL, gRPC and every HTTP client take them), written
unencrypted with mode 0600. Minting again in the same directory keeps its CA, so that
certificates signed before (and copies of the CA certificate handed out) stay valid; the leaf
certificates are replaced. For production, certificates come from your own CA as files named in
settings; Vault's PKI engine is not wired in.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_DAYS = 3650
LEAF_DAYS = 365
# The client certificate's name (its subject alternative name: strict verifiers require one).
CLIENT_NAME = "rtml-client"
# Certificates start a little in the past, so that a machine whose clock lags still accepts them.
BACKDATE = datetime.timedelta(minutes=5)


@dataclass(frozen=True)
class DevPki:
    """The files ``mint_dev_pki`` wrote."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def machine_names() -> list[str]:
    """The names a client on this machine or the network may use for it: localhost, the loopback
    addresses, the host name, its fully qualified name, the addresses they resolve to, and the
    address of the interface that reaches other machines (the one Ray picks as the node's)."""
    names = ["localhost", "127.0.0.1", "::1", socket.gethostname(), socket.getfqdn()]
    for name in names[3:]:
        try:
            names.extend(str(info[4][0]) for info in socket.getaddrinfo(name, None))
        except OSError:  # a host name that does not resolve is still a name
            continue
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("8.8.8.8", 53))  # a UDP "connect" sends nothing: it only picks the route
            names.append(probe.getsockname()[0])
        except OSError:  # no route off the machine: the loopback names are all there is
            pass
    return list(dict.fromkeys(name for name in names if name))


def mint_dev_pki(directory: Path | str, hosts: Iterable[str] = ()) -> DevPki:
    """Write a CA (kept when ``directory`` already has one), a server certificate for
    ``machine_names()`` and ``hosts``, and a client certificate into ``directory`` (mode 0700);
    return their paths."""
    directory = Path(directory).expanduser().resolve()
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    pki = DevPki(*(directory / name for name in ("ca.crt", "ca.key", "server.crt", "server.key", "client.crt", "client.key")))
    if pki.ca_cert.is_file() and pki.ca_key.is_file():
        ca_key = serialization.load_pem_private_key(pki.ca_key.read_bytes(), password=None)
        ca_cert = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    else:
        ca_key, ca_cert = _new_ca()
        _write(pki.ca_key, _key_pem(ca_key), private=True)
        _write(pki.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))
    server_names = [*machine_names(), *hosts]
    leaves = (
        (pki.server_cert, pki.server_key, "rtml server", [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH], server_names),
        (pki.client_cert, pki.client_key, "rtml client", [ExtendedKeyUsageOID.CLIENT_AUTH], [CLIENT_NAME]),
    )
    for cert_path, key_path, common_name, usages, names in leaves:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _leaf(ca_key, ca_cert, key, common_name, usages, names)
        _write(key_path, _key_pem(key), private=True)
        _write(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return pki


def _new_ca() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "rtml"), x509.NameAttribute(NameOID.COMMON_NAME, f"rtml dev CA ({socket.gethostname()})")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _leaf(ca_key, ca_cert: x509.Certificate, key: ec.EllipticCurvePrivateKey, common_name: str, usages: list, names: list[str]) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "rtml"), x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=LEAF_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    names_extension = x509.SubjectAlternativeName([_general_name(name) for name in dict.fromkeys(names)])
    return builder.add_extension(names_extension, critical=False).sign(ca_key, hashes.SHA256())


def _general_name(name: str) -> x509.GeneralName:
    """An IP address entry for an address (clients match addresses only against those), a DNS
    name entry otherwise."""
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _key_usage(**granted: bool) -> x509.KeyUsage:
    usages = dict.fromkeys(
        ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment", "key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only"),
        False,
    )
    return x509.KeyUsage(**{**usages, **granted})


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _write(path: Path, data: bytes, private: bool = False) -> None:
    """Replace ``path`` with ``data``; a private key is created with mode 0600 (never readable by
    others, not even for a moment)."""
    staging = path.with_name(f".{path.name}.{os.getpid()}")
    staging.unlink(missing_ok=True)
    descriptor = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(descriptor, "wb") as file:
        file.write(data)
    os.replace(staging, path)
