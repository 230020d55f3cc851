"""`rtml certs dev`'s certificates, checked with cryptography's path validation (the web PKI's
rules): each chain verifies to the CA for what it is used for (server, client), the server
certificate names this machine and the hosts asked for, keys are private, and minting again keeps
the CA."""

from __future__ import annotations

import ipaddress
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from cryptography.x509 import verification
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from security.certs import CLIENT_NAME, machine_names, mint_dev_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return mint_dev_pki(tmp_path_factory.mktemp("certs"), hosts=["rtml.example.internal", "10.1.2.3"])


def _cert(path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _usages(cert: x509.Certificate) -> set:
    return set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def _verifier(pki):
    return verification.PolicyBuilder().store(verification.Store([_cert(pki.ca_cert)]))


@pytest.mark.parametrize("name", ["localhost", "127.0.0.1", "::1", "rtml.example.internal", "10.1.2.3"])
def test_the_server_chain_verifies_as_a_tls_server_for_each_name(pki, name):
    """The web PKI's path validation (signature, validity, CA constraints, serverAuth, the name)."""
    try:
        subject = verification.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        subject = verification.DNSName(name)
    chain = _verifier(pki).build_server_verifier(subject).verify(_cert(pki.server_cert), [])
    assert chain[-1] == _cert(pki.ca_cert)


def test_the_server_certificate_is_refused_for_a_name_it_does_not_carry(pki):
    with pytest.raises(verification.VerificationError):
        _verifier(pki).build_server_verifier(verification.DNSName("elsewhere.example")).verify(_cert(pki.server_cert), [])


def test_the_client_chain_verifies_as_a_tls_client(pki):
    verified = _verifier(pki).build_client_verifier().verify(_cert(pki.client_cert), [])
    assert verified.chain[-1] == _cert(pki.ca_cert)
    assert verified.subjects == [x509.DNSName(CLIENT_NAME)]


def test_a_foreign_ca_verifies_neither_leaf(pki, tmp_path):
    other = mint_dev_pki(tmp_path / "other")
    store = verification.PolicyBuilder().store(verification.Store([_cert(other.ca_cert)]))
    with pytest.raises(verification.VerificationError):
        store.build_client_verifier().verify(_cert(pki.client_cert), [])
    with pytest.raises(verification.VerificationError):
        store.build_server_verifier(verification.DNSName("localhost")).verify(_cert(pki.server_cert), [])


def test_the_server_certificate_names_this_machine_and_the_hosts_given(pki):
    names = _cert(pki.server_cert).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    dns = set(names.get_values_for_type(x509.DNSName))
    addresses = set(names.get_values_for_type(x509.IPAddress))
    assert {"localhost", "rtml.example.internal"} <= dns
    assert {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1"), ipaddress.ip_address("10.1.2.3")} <= addresses
    for name in machine_names():
        try:
            assert ipaddress.ip_address(name) in addresses
        except ValueError:
            assert name in dns


def test_the_server_certificate_serves_and_is_a_client_for_ray_the_client_one_only_a_client(pki):
    assert _usages(_cert(pki.server_cert)) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert _usages(_cert(pki.client_cert)) == {ExtendedKeyUsageOID.CLIENT_AUTH}


def test_keys_are_readable_by_their_owner_only_and_match_their_certificates(pki):
    for key_path, cert_path in ((pki.ca_key, pki.ca_cert), (pki.server_key, pki.server_cert), (pki.client_key, pki.client_cert)):
        assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
        key = load_pem_private_key(key_path.read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        assert key.public_key().public_numbers() == _cert(cert_path).public_key().public_numbers()


def test_minting_again_keeps_the_ca_and_replaces_the_leaves(tmp_path):
    first = mint_dev_pki(tmp_path)
    ca, server = first.ca_cert.read_bytes(), _cert(first.server_cert)
    second = mint_dev_pki(tmp_path)
    assert second.ca_cert.read_bytes() == ca
    renewed = _cert(second.server_cert)
    assert renewed.serial_number != server.serial_number
    _verifier(first).build_server_verifier(verification.DNSName("localhost")).verify(renewed, [])
