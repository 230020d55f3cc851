"""Key material by name: from the secrets provider, or generated once for local use.

    key = symmetric_key(settings, "pii-token-key")                 # 32 bytes
    pem = key_text(settings, "jwt-signing-key", make_private_pem)   # any text a generator makes

A deployment keeps its keys in its secrets store (``security.secrets``: env, file or Vault).
Where the store has no such secret and ``security.generate_keys`` is on (the default, so that
``make demo`` needs no set-up), the key is generated once into ``<home>/keys/<name>`` (mode 0600)
and read from there afterwards by every process of a local cluster alike: it is written whole
under a temporary name and linked into place, so concurrent first users agree on one key.
Production turns ``generate_keys`` off, and a missing key is then a ``MissingSecret`` naming how
to set it.
"""

from __future__ import annotations

import base64
import binascii
import os
import secrets as random
from collections.abc import Callable
from pathlib import Path

from rtml.settings import Settings
from security.secrets import MissingSecret, open_secrets

KEY_BYTES = 32


def symmetric_key(settings: Settings, name: str) -> bytes:
    """The ``KEY_BYTES``-byte key ``name``, stored as base64 text."""
    text = key_text(settings, name, lambda: base64.b64encode(random.token_bytes(KEY_BYTES)).decode())
    try:
        key = base64.b64decode(text, validate=True)
    except binascii.Error:
        key = b""
    if len(key) != KEY_BYTES:
        raise MissingSecret(f"secret {name!r} is not {KEY_BYTES} bytes in base64: make one with `openssl rand -base64 {KEY_BYTES}`")
    return key


def key_text(settings: Settings, name: str, generate: Callable[[], str]) -> str:
    """The secret ``name`` from the provider; else, when ``security.generate_keys`` is on, the
    content of ``<home>/keys/<name>``, made by ``generate()`` on first use."""
    try:
        return open_secrets(settings).get(name)
    except MissingSecret:
        if not settings.security.generate_keys:
            raise
    return _local_key(settings.home_dir / "keys" / name, generate)


def _local_key(path: Path, generate: Callable[[], str]) -> str:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        staging = path.with_name(f".{path.name}.{os.getpid()}.{random.token_hex(4)}")
        descriptor = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as file:
            file.write(generate())
        try:
            os.link(staging, path)  # fails if another process linked its key first: theirs is the key
        except FileExistsError:
            pass
        finally:
            staging.unlink()
    return path.read_text()
