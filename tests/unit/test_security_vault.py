"""The Vault provider (``security.vault``) against the local double of Vault's HTTP API
(``tests/doubles/vault.py``; no Vault or OpenBao server can be obtained here): KV v2 reads, the
bounded cache, token lookup and renewal, transit, and the error each failure gives."""

from __future__ import annotations

import ipaddress
import logging
import socket
import ssl
import uuid
from datetime import UTC, datetime, timedelta

import hvac
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from rtml.errors import RtmlError
from rtml.settings import Settings
from security.secrets import MissingSecret, open_secrets
from security.vault import VaultDenied, VaultError, VaultRefused, VaultSecrets, VaultTransit, VaultUnavailable
from tests.doubles.vault import VaultDouble


class Clock:
    """A monotonic clock the test moves: shared by the double (token expiry) and the provider
    (cache and renewal), so lifetimes pass without waiting."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def vault(clock):
    with VaultDouble(clock=clock) as double:
        yield double


@pytest.fixture
def token(vault, monkeypatch) -> str:
    """rtml's token (unique per test: the process shares connections per token): may read rtml's
    secrets and use transit, lives an hour, renewable."""
    value = f"rtml-{uuid.uuid4().hex}"
    vault.add_token(value, ttl_s=3600, renewable=True, paths=["secret/data/rtml/*", "transit/*"])
    monkeypatch.setenv("VAULT_TOKEN", value)
    return value


def settings_for(vault: VaultDouble | str, tmp_path, **security) -> Settings:
    """Settings choosing Vault at ``vault`` (a double or a URL), and a token file that is not there."""
    base = Settings(home=tmp_path / "home")
    url = vault if isinstance(vault, str) else vault.url
    chosen = {"secrets_provider": "vault", "vault_url": url, "vault_token_file": str(tmp_path / "no-token-file")}
    return base.model_copy(update={"security": base.security.model_copy(update={**chosen, **security})})


def root(vault: VaultDouble, verify: str | bool = True) -> hvac.Client:
    return hvac.Client(url=vault.url, token=vault.root_token, verify=verify)


def put(vault: VaultDouble, path: str, verify: str | bool = True, **data: str) -> None:
    root(vault, verify).secrets.kv.v2.create_or_update_secret(path=path, secret=data, mount_point="secret")


def reads(vault: VaultDouble, path: str) -> int:
    return vault.count("GET", f"/v1/secret/data/{path}")


def test_a_secret_put_in_vault_is_read_with_rtmls_token(vault, token, tmp_path, clock):
    put(vault, "rtml/llm-api-key", value="sk-vault")
    put(vault, "rtml/neo4j.password", value="pw-vault", note="other fields are ignored")
    secrets = VaultSecrets(settings_for(vault, tmp_path), clock=clock)
    assert secrets.get("llm-api-key") == "sk-vault"
    assert secrets.get("neo4j.password") == "pw-vault"
    read = [r for r in vault.requests if r.method == "GET" and r.path == "/v1/secret/data/rtml/llm-api-key"]
    assert read and read[0].headers["x-vault-token"] == token


def test_the_token_comes_from_the_token_file_when_vault_token_is_unset(vault, tmp_path, clock, monkeypatch):
    monkeypatch.delenv("VAULT_TOKEN", raising=False)
    vault.add_token("file-token", ttl_s=60, renewable=True)
    (tmp_path / "vault-token").write_text("file-token\n")
    put(vault, "rtml/k", value="v")
    assert VaultSecrets(settings_for(vault, tmp_path, vault_token_file=str(tmp_path / "vault-token")), clock=clock).get("k") == "v"
    assert vault.requests[-1].headers["x-vault-token"] == "file-token"


def test_a_value_is_read_once_per_cache_ttl(vault, token, tmp_path, clock):
    put(vault, "rtml/k", value="v1")
    secrets = VaultSecrets(settings_for(vault, tmp_path, vault_cache_ttl_s=300), clock=clock)
    assert secrets.get("k") == "v1" and secrets.get("k") == "v1"
    assert reads(vault, "rtml/k") == 1
    put(vault, "rtml/k", value="v2")  # rotated in Vault: rtml sees it once the cached value expires
    clock.now += 299
    assert secrets.get("k") == "v1" and reads(vault, "rtml/k") == 1
    clock.now += 2
    assert secrets.get("k") == "v2" and reads(vault, "rtml/k") == 2


def test_the_cache_holds_at_most_cache_size_values(vault, token, tmp_path, clock):
    for name in "abc":
        put(vault, f"rtml/{name}", value=name.upper())
    secrets = VaultSecrets(settings_for(vault, tmp_path, vault_cache_size=2), clock=clock)
    assert [secrets.get(name) for name in "abc"] == ["A", "B", "C"]
    assert secrets.get("b") == "B" and secrets.get("c") == "C"  # the two newest are kept
    assert [reads(vault, f"rtml/{name}") for name in "abc"] == [1, 1, 1]
    assert secrets.get("a") == "A"  # the oldest made room for them
    assert reads(vault, "rtml/a") == 2


def test_a_cache_ttl_of_zero_reads_every_time(vault, token, tmp_path, clock):
    put(vault, "rtml/k", value="v")
    secrets = VaultSecrets(settings_for(vault, tmp_path, vault_cache_ttl_s=0), clock=clock)
    assert secrets.get("k") == secrets.get("k") == "v"
    assert reads(vault, "rtml/k") == 2


def test_a_missing_secret_names_its_kv_path_and_the_command_that_creates_it(vault, token, tmp_path, clock):
    secrets = VaultSecrets(settings_for(vault, tmp_path), clock=clock)
    with pytest.raises(MissingSecret) as missing:
        secrets.get("opsgenie-api-key")
    message = str(missing.value)
    assert "'opsgenie-api-key'" in message and "'vault'" in message and "secret/rtml/opsgenie-api-key" in message
    assert "`vault kv put -mount=secret rtml/opsgenie-api-key value=...`" in message
    put(vault, "rtml/opsgenie-api-key", value="genie")  # missing secrets are not cached
    assert secrets.get("opsgenie-api-key") == "genie"


def test_a_deleted_secret_says_it_was_deleted_and_how_to_bring_it_back(vault, token, tmp_path, clock):
    put(vault, "rtml/k", value="v")
    root(vault).secrets.kv.v2.delete_latest_version_of_secret(path="rtml/k", mount_point="secret")
    with pytest.raises(MissingSecret, match=r"was deleted at .*`vault kv undelete -mount=secret -versions=1 rtml/k`"):
        VaultSecrets(settings_for(vault, tmp_path), clock=clock).get("k")


def test_a_secret_without_the_value_field_names_the_fields_it_has(vault, token, tmp_path, clock):
    put(vault, "rtml/k", password="p", user="u")
    with pytest.raises(MissingSecret, match=r"no non-empty text field 'value' \(its fields: password, user\).*vault kv put -mount=secret rtml/k value="):
        VaultSecrets(settings_for(vault, tmp_path), clock=clock).get("k")


def test_an_unreachable_vault_names_the_url_and_the_setting(tmp_path, monkeypatch):
    monkeypatch.setenv("VAULT_TOKEN", "any")
    with socket.socket() as probe:  # a port nothing listens on once closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(VaultUnavailable) as unreachable:
        VaultSecrets(settings_for(f"http://127.0.0.1:{port}", tmp_path))
    message = str(unreachable.value)
    assert f"cannot reach Vault at http://127.0.0.1:{port}" in message and "security.vault_url" in message
    assert "RTML_SECURITY__VAULT_URL" in message and isinstance(unreachable.value, RtmlError)


def test_a_vault_that_does_not_answer_names_the_timeout_setting(tmp_path, monkeypatch):
    monkeypatch.setenv("VAULT_TOKEN", "any")
    with socket.socket() as silent:  # accepts connections (the backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        settings = settings_for(f"http://127.0.0.1:{silent.getsockname()[1]}", tmp_path, vault_timeout_s=0.2)
        with pytest.raises(VaultUnavailable, match=r"did not answer within 0.2 s \(security.vault_timeout_s"):
            VaultSecrets(settings)


def self_signed(tmp_path) -> tuple[ssl.SSLContext, str]:
    """A server context with a self-signed certificate for 127.0.0.1, and the certificate's PEM file
    (the CA bundle a client must be given)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vault-double")])
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    cert_file, key_file = tmp_path / "vault.pem", tmp_path / "vault.key"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    return context, str(cert_file)


def test_vault_over_tls_is_verified_with_the_ca_bundle_setting(token, tmp_path, clock):
    context, ca_bundle = self_signed(tmp_path)
    with VaultDouble(clock=clock, tls=context) as vault:
        vault.add_token(token, ttl_s=3600, renewable=True)
        put(vault, "rtml/k", value="over tls", verify=ca_bundle)
        with pytest.raises(VaultUnavailable, match=r"TLS with Vault at https://127.0.0.1:\d+ failed .*set security.vault_ca_cert"):
            VaultSecrets(settings_for(vault, tmp_path), clock=clock)  # the system's CAs do not know this one
        assert VaultSecrets(settings_for(vault, tmp_path, vault_ca_cert=ca_bundle), clock=clock).get("k") == "over tls"


def test_a_ca_bundle_that_is_not_there_names_the_setting(vault, token, tmp_path):
    with pytest.raises(VaultError, match=r"security.vault_ca_cert .* names .*no-ca.pem, which does not exist"):
        VaultSecrets(settings_for(vault, tmp_path, vault_ca_cert=str(tmp_path / "no-ca.pem")))


def test_no_token_names_vault_token_and_the_token_file(vault, tmp_path, monkeypatch):
    monkeypatch.delenv("VAULT_TOKEN", raising=False)
    with pytest.raises(VaultDenied, match=r"no Vault token: set the environment variable VAULT_TOKEN, or write the token to .*no-token-file"):
        VaultSecrets(settings_for(vault, tmp_path))


def test_a_refused_token_names_where_it_came_from(vault, tmp_path, monkeypatch, clock):
    monkeypatch.setenv("VAULT_TOKEN", "not-a-token")
    with pytest.raises(VaultDenied, match="refused rtml's token \\(from the environment variable VAULT_TOKEN\\)"):
        VaultSecrets(settings_for(vault, tmp_path), clock=clock)
    monkeypatch.delenv("VAULT_TOKEN")
    (tmp_path / "vault-token").write_text("not-a-token")
    with pytest.raises(VaultDenied, match=r"refused rtml's token \(from the file .*vault-token, security.vault_token_file"):
        VaultSecrets(settings_for(vault, tmp_path, vault_token_file=str(tmp_path / "vault-token")), clock=clock)


def test_a_token_revoked_while_rtml_runs_is_named_not_mistaken_for_a_policy(vault, token, tmp_path, clock):
    put(vault, "rtml/k", value="v")
    secrets = VaultSecrets(settings_for(vault, tmp_path), clock=clock)
    vault.revoke(token)
    with pytest.raises(VaultDenied, match="refused rtml's token .* expired, revoked"):
        secrets.get("k")


def test_a_policy_without_the_path_names_the_rule_to_add(vault, tmp_path, clock, monkeypatch):
    vault.add_token("narrow", ttl_s=60, renewable=True, paths=["secret/data/other/*"])
    monkeypatch.setenv("VAULT_TOKEN", "narrow")
    put(vault, "rtml/k", value="v")
    with pytest.raises(VaultDenied) as denied:
        VaultSecrets(settings_for(vault, tmp_path), clock=clock).get("k")
    assert 'path "secret/data/rtml/k" { capabilities = ["read"] }' in str(denied.value)
    assert "policies: default, rtml" in str(denied.value)


def test_a_sealed_vault_says_so(vault, token, tmp_path, clock):
    put(vault, "rtml/k", value="v")
    vault.sealed = True
    with pytest.raises(VaultUnavailable, match=r"is sealed: unseal it \(`vault operator unseal`\)"):
        VaultSecrets(settings_for(vault, tmp_path), clock=clock)
    vault.sealed = False
    secrets = VaultSecrets(settings_for(vault, tmp_path), clock=clock)
    vault.sealed = True  # sealed while rtml runs
    with pytest.raises(VaultUnavailable, match=r"is sealed .*Vault is sealed"):
        secrets.get("k")


def test_a_renewable_token_is_renewed_once_a_third_of_its_ttl_is_left(vault, tmp_path, clock, monkeypatch):
    vault.add_token("short", ttl_s=60, renewable=True)
    monkeypatch.setenv("VAULT_TOKEN", "short")
    for name in "abc":
        put(vault, f"rtml/{name}", value=name)
    secrets = VaultSecrets(settings_for(vault, tmp_path), clock=clock)
    renewals = lambda: vault.count("POST", "/v1/auth/token/renew-self")  # noqa: E731
    clock.now += 35  # 25 s of 60 left: not yet
    assert secrets.get("a") == "a" and renewals() == 0
    clock.now += 10  # 15 s left: renewed before the read, for another 60 s
    assert secrets.get("b") == "b" and renewals() == 1
    clock.now += 40  # past the token's first expiry: alive only because it was renewed
    assert secrets.get("c") == "c" and renewals() == 1


def test_a_token_that_cannot_be_renewed_fails_naming_it_once_expired(vault, tmp_path, clock, monkeypatch):
    vault.add_token("short", ttl_s=60, renewable=False)
    monkeypatch.setenv("VAULT_TOKEN", "short")
    put(vault, "rtml/k", value="v")
    secrets = VaultSecrets(settings_for(vault, tmp_path), clock=clock)
    clock.now += 61
    with pytest.raises(VaultDenied, match="VAULT_TOKEN"):
        secrets.get("k")
    assert vault.count("POST", "/v1/auth/token/renew-self") == 0


def test_renewal_stops_with_a_warning_at_the_tokens_maximum_ttl(vault, tmp_path, clock, monkeypatch, caplog):
    vault.add_token("capped", ttl_s=60, renewable=True, max_ttl_s=80)
    monkeypatch.setenv("VAULT_TOKEN", "capped")
    for name in "abc":
        put(vault, f"rtml/{name}", value=name)
    secrets = VaultSecrets(settings_for(vault, tmp_path), clock=clock)
    renewals = lambda: vault.count("POST", "/v1/auth/token/renew-self")  # noqa: E731
    clock.now += 45  # renewed, but only up to the maximum: 80 s after creation
    assert secrets.get("a") == "a" and renewals() == 1
    clock.now += 30  # 5 s left of the 35 granted: Vault no longer extends it
    with caplog.at_level(logging.WARNING, logger="security.vault"):
        assert secrets.get("b") == "b" and renewals() == 2
    assert "reached its maximum TTL" in caplog.text
    clock.now += 2
    assert secrets.get("c") == "c" and renewals() == 2  # no more renewals


@pytest.fixture
def transit(vault, token, tmp_path) -> VaultTransit:
    root(vault).secrets.transit.create_key(name="rtml-pii", mount_point="transit")
    return VaultTransit(settings_for(vault, tmp_path))


def test_transit_hmac_is_deterministic_per_key(vault, transit):
    token = transit.hmac("rtml-pii", b"alice@example.com")
    assert token.startswith("vault:v1:") and token == transit.hmac("rtml-pii", b"alice@example.com")
    assert transit.hmac("rtml-pii", b"bob@example.com") != token
    root(vault).secrets.transit.create_key(name="other", mount_point="transit")
    assert transit.hmac("other", b"alice@example.com") != token


def test_transit_encrypts_and_decrypts_and_refuses_a_tampered_ciphertext(transit):
    sealed = transit.encrypt("rtml-pii", b"+1 415 555 0100")
    assert sealed.startswith("vault:v1:") and b"555" not in sealed.encode()
    assert transit.encrypt("rtml-pii", b"+1 415 555 0100") != sealed  # a fresh nonce each time
    assert transit.decrypt("rtml-pii", sealed) == b"+1 415 555 0100"
    body = sealed.removeprefix("vault:v1:")
    tampered = "vault:v1:" + ("A" if body[20] != "A" else "B").join((body[:20], body[21:]))
    with pytest.raises(VaultRefused, match="message authentication failed .*ciphertext was altered"):
        transit.decrypt("rtml-pii", tampered)


def test_transit_with_a_key_that_does_not_exist_says_how_to_create_it(transit):
    with pytest.raises(VaultRefused, match=r"transit key 'nope' does not exist .*`vault write -f transit/keys/nope`"):
        transit.hmac("nope", b"x")


def test_transit_denied_by_policy_names_the_rule(vault, tmp_path, monkeypatch):
    vault.add_token("kv-only", ttl_s=60, renewable=True, paths=["secret/data/rtml/*"])
    monkeypatch.setenv("VAULT_TOKEN", "kv-only")
    with pytest.raises(VaultDenied, match=r'path "transit/hmac/rtml-pii" \{ capabilities = \["update"\] \}'):
        VaultTransit(settings_for(vault, tmp_path)).hmac("rtml-pii", b"x")


def test_open_secrets_gives_one_shared_vault_provider_and_transit_shares_its_connection(vault, token, tmp_path):
    put(vault, "rtml/k", value="v")
    settings = settings_for(vault, tmp_path)
    first, second = open_secrets(settings), open_secrets(settings)
    assert isinstance(first, VaultSecrets) and first is second
    assert first.get("k") == second.get("k") == "v" and reads(vault, "rtml/k") == 1
    assert VaultTransit(settings).connection is first.connection
    assert vault.count("GET", "/v1/auth/token/lookup-self") == 1
