"""Secrets by name, from the one provider that settings choose (``security.secrets_provider``).

    secrets = open_secrets(settings)
    key = secrets.get("llm-api-key")      # raises MissingSecret saying how to set it

"env" reads ``RTML_SECRET_<NAME>`` (the name upper-cased, ``-`` and ``.`` as ``_``); "file" reads
``<security.secrets_dir>/<name>`` (default ``<home>/secrets``), without its trailing newline; "vault"
reads the field ``value`` of the KV v2 secret ``<security.vault_kv_prefix>/<name>`` from HashiCorp
Vault (``security.vault``). Every provider has the one method ``get``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Protocol

from rtml.settings import Settings


class MissingSecret(LookupError):
    """A secret the provider does not have; the message names the secret, the provider and how to
    set it."""


class SecretsProvider(Protocol):
    def get(self, name: str) -> str:
        """The secret's value; raises ``MissingSecret`` when there is none (or it is empty)."""
        ...


def env_variable(name: str) -> str:
    """The environment variable the env provider reads the secret ``name`` from."""
    return "RTML_SECRET_" + re.sub(r"[-.]", "_", name).upper()


class EnvSecrets:
    """Secrets from environment variables ``RTML_SECRET_<NAME>``."""

    def get(self, name: str) -> str:
        variable = env_variable(name)
        value = os.environ.get(variable, "")
        if not value:
            raise MissingSecret(
                f"secret {name!r} is not set (security.secrets_provider = 'env'): set the environment variable {variable}, "
                f"e.g. `export {variable}=...`"
            )
        return value


class FileSecrets:
    """Secrets from the files of one directory, one file per secret, named as the secret."""

    def __init__(self, directory: Path | str):
        self.directory = Path(directory)

    def get(self, name: str) -> str:
        path = self.directory / name
        try:
            value = path.read_text().removesuffix("\n")
        except FileNotFoundError:
            value = ""
        if not value:
            raise MissingSecret(f"secret {name!r} is not set (security.secrets_provider = 'file'): write its value to the file {path}")
        return value


def open_secrets(settings: Settings) -> SecretsProvider:
    """The provider ``settings.security`` names. Vault's is shared by the whole process (one
    client, token renewal and cache per Vault configuration), so calling this often costs nothing."""
    security = settings.security
    if security.secrets_provider == "vault":
        from security.vault import shared_vault_secrets  # here: security.vault imports this module

        return shared_vault_secrets(settings)
    if security.secrets_provider == "file":
        return FileSecrets(Path(security.secrets_dir).expanduser() if security.secrets_dir else settings.home_dir / "secrets")
    return EnvSecrets()
