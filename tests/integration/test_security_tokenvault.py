"""The token vault (security.tokenvault): the same tests against SQLite (the default), the real
PostgreSQL (a fresh schema per test), and SQLite with Vault transit sealing the entries (the local
double of Vault's API, tests/doubles/vault.py: no Vault server can be obtained here). Store and
reveal, idempotent stores from one process and from two at once, erasure in one tenant or all,
and rows that were altered or moved."""

from __future__ import annotations

import multiprocessing
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import hvac
import pytest
from sqlalchemy import create_engine, text

from rtml.settings import Settings
from security.keys import symmetric_key
from security.pii import ENCRYPTION_KEY, CiphertextRejected, Tokenizer, VaultEntry
from security.tokenvault import TokenNotFound, TokenVault, vault_url
from tests.doubles.vault import VaultDouble


@contextmanager
def vault_settings(kind: str, request, tmp_path, monkeypatch) -> Iterator[Settings]:
    """Settings whose token vault is empty and this test's own: on SQLite, on PostgreSQL (a fresh
    schema), or on SQLite with Vault transit sealing."""
    for variable in ("RTML_SECRET_PII_TOKEN_KEY", "RTML_SECRET_PII_ENCRYPTION_KEY"):
        monkeypatch.delenv(variable, raising=False)
    home = tmp_path / "home"
    if kind == "sqlite":
        yield Settings(home=home)
    elif kind == "postgresql":
        dsn = request.getfixturevalue("postgres_dsn")
        schema = f"pii_test_{uuid.uuid4().hex[:12]}"
        admin = create_engine(dsn)
        with admin.begin() as connection:
            connection.execute(text(f"CREATE SCHEMA {schema}"))
        try:
            separator = "&" if "?" in dsn else "?"
            yield Settings(home=home, security={"token_vault_url": f"{dsn}{separator}options=-csearch_path%3D{schema}"})
        finally:
            with admin.begin() as connection:
                connection.execute(text(f"DROP SCHEMA {schema} CASCADE"))
            admin.dispose()
    else:
        with VaultDouble() as double:
            hvac.Client(url=double.url, token=double.root_token).secrets.transit.create_key("rtml-pii")
            monkeypatch.setenv("VAULT_TOKEN", double.root_token)
            yield Settings(
                home=home,
                security={"secrets_provider": "vault", "vault_url": double.url, "vault_token_file": str(tmp_path / "no-token-file")},
            )


@pytest.fixture(params=["sqlite", "postgresql", "sqlite+vault-transit"])
def settings(request, tmp_path, monkeypatch):
    with vault_settings(request.param, request, tmp_path, monkeypatch) as chosen:
        yield chosen


@pytest.fixture(params=["sqlite", "postgresql"])
def database_settings(request, tmp_path, monkeypatch):
    """As ``settings``, without Vault: its double runs in this process, so a second process adds
    nothing for it."""
    with vault_settings(request.param, request, tmp_path, monkeypatch) as chosen:
        yield chosen


@pytest.fixture
def vault(settings):
    opened = TokenVault.open(settings)
    yield opened
    opened.close()


def count_rows(settings: Settings, where: str = "") -> int:
    engine = create_engine(vault_url(settings))
    try:
        with engine.connect() as connection:
            return connection.execute(text(f"SELECT count(*) FROM pii_tokens {where}")).scalar_one()
    finally:
        engine.dispose()


def execute(settings: Settings, statement: str, **parameters) -> None:
    engine = create_engine(vault_url(settings))
    try:
        with engine.begin() as connection:
            connection.execute(text(statement), parameters)
    finally:
        engine.dispose()


def document(subject: str, **attributes) -> dict:
    return {"tenant": "acme", "entity": "sensor-1", "event_time": "2024-01-05T10:00:00Z", "value": 1.0, "subject": subject, "attributes": attributes}


def test_stored_tokens_reveal_their_normalised_values(settings, vault):
    tokenizer = Tokenizer(settings)
    result = tokenizer.tokenize(
        "acme", document("user-42", email="Bob@Example.com", phone="+1 (415) 555-2671", ip="10.0.0.1", iban="DE89 3704 0044 0532 0130 00")
    )
    vault.store("acme", result.entries)
    new = result.document["attributes"]
    assert vault.reveal("acme", new["email"]) == "bob@example.com"
    assert vault.reveal("acme", new["phone"]) == "+14155552671"
    assert vault.reveal("acme", new["ip"]) == "10.0.0.1"
    assert vault.reveal("acme", new["iban"]) == "DE89370400440532013000"
    assert vault.reveal("acme", result.document["subject"]) == "user-42"
    # The plaintext is nowhere in the table: the whole address, which a base64 ciphertext cannot
    # hold by chance ("bob" alone it did, about once in a hundred runs: SQLite's LIKE ignores case).
    assert count_rows(settings, "WHERE ciphertext LIKE '%bob@example.com%' OR token LIKE '%bob@example.com%'") == 0


def test_an_unknown_token_or_another_tenants_token_is_not_found(settings, vault):
    entry = VaultEntry("tok_email_" + "a" * 26, "email", "bob@example.com", "")
    vault.store("acme", [entry])
    with pytest.raises(TokenNotFound, match="'tok_email_b+' in tenant 'acme'") as missing:
        vault.reveal("acme", "tok_email_" + "b" * 26)
    assert isinstance(missing.value, LookupError)
    with pytest.raises(TokenNotFound, match="tenant 'globex'"):
        vault.reveal("globex", entry.token)


def test_storing_again_adds_no_rows_from_this_process_or_another(settings, vault):
    entries = [VaultEntry(f"tok_email_{i:026d}", "email", f"user{i}@example.com", "tok_subject_" + "s" * 26) for i in range(20)]
    vault.store("acme", entries)
    vault.store("acme", entries)
    other = TokenVault.open(settings)  # its own memory: the database's key decides
    try:
        other.store("acme", entries[10:] + [VaultEntry("tok_email_" + "z" * 26, "email", "new@example.com", "")])
    finally:
        other.close()
    assert count_rows(settings) == 21
    assert vault.reveal("acme", entries[3].token) == "user3@example.com"


def test_entries_stored_once_are_not_sent_again_by_the_same_process(settings, vault):
    entry = VaultEntry("tok_ip_" + "a" * 26, "ip", "10.0.0.1", "")
    vault.store("acme", [entry])
    execute(settings, "DELETE FROM pii_tokens")
    vault.store("acme", [entry])  # remembered: no round trip, so the row stays gone
    assert count_rows(settings) == 0
    fresh = TokenVault.open(settings)
    try:
        fresh.store("acme", [entry])
    finally:
        fresh.close()
    assert count_rows(settings) == 1


def test_erasure_in_one_tenant_then_in_all(settings, vault):
    tokenizer = Tokenizer(settings)
    alice = tokenizer.tokenize("acme", document("alice", email="shared@example.com", phone="+1 415 555 2671"))
    alice_elsewhere = tokenizer.tokenize("globex", {**document("alice", email="shared@example.com"), "tenant": "globex"})
    bob = tokenizer.tokenize("acme", document("bob", email="shared@example.com"))
    vault.store("acme", alice.entries)
    vault.store("globex", alice_elsewhere.entries)
    vault.store("acme", bob.entries)
    shared = alice.document["attributes"]["email"]
    phone = alice.document["attributes"]["phone"]
    subject = tokenizer.subject_token("alice")

    assert vault.erase(subject, tenant="acme") == 3  # her subject, her email, her phone
    with pytest.raises(TokenNotFound):
        vault.reveal("acme", phone)
    with pytest.raises(TokenNotFound):
        vault.reveal("acme", subject)
    assert vault.reveal("acme", shared) == "shared@example.com"  # bob's use of the same value stays
    assert vault.reveal("globex", subject) == "alice"  # another tenant's rows stay

    assert vault.erase(subject) == 2
    with pytest.raises(TokenNotFound):
        vault.reveal("globex", shared)
    assert vault.erase(subject) == 0
    assert vault.reveal("acme", bob.document["subject"]) == "bob"


def test_an_erased_subject_stored_again_is_stored_again(settings, vault):
    tokenizer = Tokenizer(settings)
    result = tokenizer.tokenize("acme", document("carol", email="carol@example.com"))
    vault.store("acme", result.entries)
    vault.erase(result.document["subject"])
    vault.store("acme", result.entries)  # erasure dropped them from the process's memory too
    assert vault.reveal("acme", result.document["attributes"]["email"]) == "carol@example.com"


def test_altered_or_moved_ciphertexts_are_refused(settings, vault):
    one = VaultEntry("tok_email_" + "a" * 26, "email", "one@example.com", "")
    two = VaultEntry("tok_email_" + "b" * 26, "email", "two@example.com", "")
    vault.store("acme", [one, two])
    vault.store("globex", [one])
    # Another row's ciphertext copied over this one's: sealed for another token.
    execute(settings, "UPDATE pii_tokens SET ciphertext = (SELECT ciphertext FROM pii_tokens WHERE token = :two) WHERE token = :one AND tenant = 'acme'", one=one.token, two=two.token)
    with pytest.raises(CiphertextRejected):
        vault.reveal("acme", one.token)
    # A ciphertext with one character changed.
    vault_ciphertext = "vault:v1:" if settings.security.secrets_provider == "vault" else "aesgcm:"
    execute(
        settings,
        "UPDATE pii_tokens SET ciphertext = :prefix || 'AAAA' || substr(ciphertext, length(:prefix) + 5) WHERE tenant = 'globex'",
        prefix=vault_ciphertext,
    )
    with pytest.raises(CiphertextRejected):
        vault.reveal("globex", one.token)
    assert vault.reveal("acme", two.token) == "two@example.com"


def _store_many(settings_json: str, start: int, ready, go) -> None:
    """One process's share of the concurrent test: open the vault and store 300 entries in batches."""
    settings = Settings.model_validate_json(settings_json)
    vault = TokenVault.open(settings)
    ready.set()
    go.wait(30)
    for first in range(start, start + 300, 25):
        vault.store("acme", [VaultEntry(f"tok_email_{i:026d}", "email", f"user{i}@example.com", "") for i in range(first, first + 25)])
    vault.close()


def test_two_processes_storing_at_once_keep_every_entry_once(database_settings):
    settings = database_settings
    symmetric_key(settings, ENCRYPTION_KEY)  # the local key, made before the race (security.keys' own concern)
    TokenVault.open(settings).close()
    context = multiprocessing.get_context("spawn")
    go = context.Event()
    workers = []
    for start in (0, 150):  # entries 150..299 are stored by both
        ready = context.Event()
        worker = context.Process(target=_store_many, args=(settings.model_dump_json(), start, ready, go))
        worker.start()
        assert ready.wait(60), "a storing process did not start"
        workers.append(worker)
    go.set()
    for worker in workers:
        worker.join(120)
        assert worker.exitcode == 0
    assert count_rows(settings) == 450
    vault = TokenVault.open(settings)
    try:
        assert [vault.reveal("acme", f"tok_email_{i:026d}") for i in (0, 149, 150, 299, 449)] == [
            f"user{i}@example.com" for i in (0, 149, 150, 299, 449)
        ]
    finally:
        vault.close()
