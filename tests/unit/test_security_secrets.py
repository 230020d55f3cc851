"""The secrets providers: the same tests run against the env and the file provider, then the choice
between them by settings."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from rtml.settings import Settings
from security.secrets import EnvSecrets, FileSecrets, MissingSecret, SecretsProvider, env_variable, open_secrets


@dataclass
class Store:
    secrets: SecretsProvider
    put: Callable[[str, str], None]  # how a person sets a secret for this provider
    where: Callable[[str], str]  # what the missing-secret message must point at


@pytest.fixture(params=["env", "file"])
def store(request, monkeypatch, tmp_path) -> Store:
    for variable in [v for v in os.environ if v.startswith("RTML_SECRET_")]:
        monkeypatch.delenv(variable)
    if request.param == "env":
        return Store(EnvSecrets(), lambda name, value: monkeypatch.setenv(env_variable(name), value), env_variable)
    return Store(FileSecrets(tmp_path), lambda name, value: (tmp_path / name).write_text(value), lambda name: str(tmp_path / name))


def test_a_secret_that_was_set_is_read_back(store):
    store.put("llm-api-key", "sk-1")
    store.put("neo4j.password", "pw-2")
    assert store.secrets.get("llm-api-key") == "sk-1"
    assert store.secrets.get("neo4j.password") == "pw-2"


def test_a_missing_secret_names_itself_the_provider_and_how_to_set_it(store):
    with pytest.raises(MissingSecret) as missing:
        store.secrets.get("opsgenie-api-key")
    message = str(missing.value)
    assert "'opsgenie-api-key'" in message and store.where("opsgenie-api-key") in message
    assert ("'env'" if isinstance(store.secrets, EnvSecrets) else "'file'") in message
    assert isinstance(missing.value, LookupError)


def test_an_empty_secret_counts_as_missing(store):
    store.put("llm-api-key", "")
    with pytest.raises(MissingSecret, match="llm-api-key"):
        store.secrets.get("llm-api-key")


def test_env_names_are_upper_cased_with_dashes_and_dots_as_underscores():
    assert env_variable("llm-api-key") == "RTML_SECRET_LLM_API_KEY"
    assert env_variable("neo4j.password") == "RTML_SECRET_NEO4J_PASSWORD"


def test_a_file_secret_loses_its_trailing_newline_only(tmp_path):
    (tmp_path / "key").write_text("  spaced value \n")
    assert FileSecrets(tmp_path).get("key") == "  spaced value "


def with_security(settings: Settings, **security) -> Settings:
    return settings.model_copy(update={"security": settings.security.model_copy(update=security)})


def test_settings_choose_the_provider_and_the_directory(tmp_path):
    base = Settings(home=tmp_path / "home")
    assert isinstance(open_secrets(base), EnvSecrets)
    default_dir = open_secrets(with_security(base, secrets_provider="file"))
    assert isinstance(default_dir, FileSecrets) and default_dir.directory == (tmp_path / "home").resolve() / "secrets"
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "llm-api-key").write_text("sk-file\n")
    chosen = open_secrets(with_security(base, secrets_provider="file", secrets_dir=str(tmp_path / "elsewhere")))
    assert chosen.get("llm-api-key") == "sk-file" and Path(chosen.directory) == tmp_path / "elsewhere"
