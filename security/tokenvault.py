"""The token vault: each PII token's original value, sealed, so that an admin can reverse a token
and erasure can make a subject's tokens irreversible.

    vault = TokenVault.open(settings)
    vault.store("acme", tokenized.entries)      # before the tokenized event is handed on
    vault.reveal("acme", "tok_email_...")       # "bob@example.com"; the caller audits who asked
    vault.erase(tokenizer.subject_token("user-42"), tenant=None)   # rows removed, in every tenant

One table, ``pii_tokens(tenant, token, subject_token, kind, ciphertext, created_at)``, keyed by
``(tenant, token, subject_token)``: each subject's use of a value is its own row, so erasing one
subject leaves a value that another subject of the tenant also used revealable, while the erased
subject's own rows are gone (and with them the only way back from its tokens to its data: the
tokens in the lakehouse, logs and indexes stay, now meaningless). Events that name no subject
keep their rows under the subject token ``""``.

Ciphertexts are sealed by ``security.pii.open_pii_keys`` (AES-GCM with the key
``pii-encryption-key``, or Vault transit) bound to their tenant and token, so a row altered or
copied to another tenant or token does not reveal (``CiphertextRejected``).

The database is ``security.token_vault_url`` (SQLAlchemy; default SQLite at
``<home>/pii/tokens.db``, in WAL mode with a busy timeout so that the processes of a local cluster
share it; PostgreSQL in production). ``store`` is insert-or-ignore, so any number of processes may
store the same entries at once; each process remembers (``security.pii_cache_size``) the entries
it has stored and skips them next time. Thread-safe.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path

from cachetools import LRUCache
from sqlalchemy import Column, DateTime, Engine, Index, MetaData, String, Table, Text, create_engine, delete, event, inspect, make_url, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DatabaseError

from rtml.errors import RtmlError
from rtml.settings import Settings
from security.pii import PiiKeys, VaultEntry, open_pii_keys

TABLE = "pii_tokens"
SQLITE_BUSY_TIMEOUT_S = 30.0
_INSERTS = {"sqlite": sqlite.insert, "postgresql": postgresql.insert}

_metadata = MetaData()
pii_tokens = Table(
    TABLE,
    _metadata,
    Column("tenant", String(64), primary_key=True),
    Column("token", String(64), primary_key=True),
    Column("subject_token", String(64), primary_key=True),
    Column("kind", String(16), nullable=False),
    Column("ciphertext", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Index("pii_tokens_by_subject", "subject_token", "tenant"),
)


class TokenNotFound(LookupError):
    """A token the vault cannot reverse in a tenant: never stored there, or its subject was erased."""


class TokenVault:
    """Tokens' sealed originals in one database (module docstring)."""

    def __init__(self, engine: Engine, keys: PiiKeys, cache_size: int):
        if engine.dialect.name not in _INSERTS:
            raise RtmlError(
                f"the token vault runs on {' or '.join(_INSERTS)}, not {engine.dialect.name}: set security.token_vault_url "
                "to a sqlite:/// or postgresql+psycopg2:// URL"
            )
        self._engine = engine
        self._keys = keys
        self._insert = _INSERTS[engine.dialect.name]
        self._stored: LRUCache[tuple[str, str, str], bool] = LRUCache(cache_size)
        self._lock = threading.Lock()
        _create_table(engine)

    @classmethod
    def open(cls, settings: Settings) -> TokenVault:
        """The vault at ``security.token_vault_url``, its table created when missing."""
        url = make_url(vault_url(settings))
        if url.get_backend_name() == "sqlite":
            if url.database and url.database != ":memory:":
                Path(url.database).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S})
            event.listen(engine, "connect", _sqlite_wal)
        else:
            engine = create_engine(url, pool_pre_ping=True)
        return cls(engine, open_pii_keys(settings), settings.security.pii_cache_size)

    def store(self, tenant: str, entries: Iterable[VaultEntry]) -> None:
        """Seal and keep ``entries`` of ``tenant``; those already kept (by this process's memory or
        the database's key) are left as they are. Returns once they are committed."""
        with self._lock:
            fresh = {(tenant, e.token, e.subject_token): e for e in entries if (tenant, e.token, e.subject_token) not in self._stored}
        if not fresh:
            return
        now = datetime.now(timezone.utc)
        rows = [
            {
                "tenant": tenant,
                "token": entry.token,
                "subject_token": entry.subject_token,
                "kind": entry.kind,
                "ciphertext": self._keys.seal(entry.plaintext.encode("utf-8", "surrogatepass"), _context(tenant, entry.token)),
                "created_at": now,
            }
            for entry in fresh.values()
        ]
        with self._engine.begin() as connection:
            connection.execute(self._insert(pii_tokens).on_conflict_do_nothing(), rows)
        with self._lock:
            for key in fresh:
                self._stored[key] = True

    def reveal(self, tenant: str, token: str) -> str:
        """The value behind ``token`` in ``tenant`` (normalised: ``security.pii``). Raises
        ``TokenNotFound`` when the vault has none, ``CiphertextRejected`` when its row was altered."""
        query = select(pii_tokens.c.ciphertext).where(pii_tokens.c.tenant == tenant, pii_tokens.c.token == token).limit(1)
        with self._engine.connect() as connection:
            ciphertext = connection.execute(query).scalar_one_or_none()
        if ciphertext is None:
            raise TokenNotFound(
                f"the token vault has no value for {token!r} in tenant {tenant!r}: it was never stored there "
                "(check the token and the tenant) or its data subject was erased"
            )
        return self._keys.unseal(ciphertext, _context(tenant, token)).decode("utf-8", "surrogatepass")

    def erase(self, subject_token: str, tenant: str | None = None) -> int:
        """Delete the rows of the subject ``subject_token`` in ``tenant`` (every tenant when None),
        here and in this process's memory; returns how many rows were removed."""
        statement = delete(pii_tokens).where(pii_tokens.c.subject_token == subject_token)
        if tenant is not None:
            statement = statement.where(pii_tokens.c.tenant == tenant)
        with self._engine.begin() as connection:
            removed = connection.execute(statement).rowcount
        with self._lock:
            for key in [key for key in self._stored if key[2] == subject_token and tenant in (None, key[0])]:
                del self._stored[key]
        return removed

    def close(self) -> None:
        self._engine.dispose()


def vault_url(settings: Settings) -> str:
    """The token vault's SQLAlchemy URL: ``security.token_vault_url``, or SQLite under ``<home>/pii``."""
    return settings.security.token_vault_url or f"sqlite:///{settings.home_dir / 'pii' / 'tokens.db'}"


def _context(tenant: str, token: str) -> bytes:
    """What a ciphertext is bound to: its row's tenant and token."""
    return f"{tenant}\0{token}".encode()


def _sqlite_wal(connection, _record) -> None:
    # WAL lets readers and one writer work at once; the busy timeout (set by the driver's timeout)
    # makes concurrent writers of other processes wait rather than fail.
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.close()


def _create_table(engine: Engine) -> None:
    """Create the table when missing; another process creating it at the same time is fine."""
    try:
        _metadata.create_all(engine)
    except DatabaseError:
        if not inspect(engine).has_table(TABLE):
            raise
