"""HashiCorp Vault through hvac: secrets from the KV v2 engine (``VaultSecrets``, the "vault"
secrets provider) and keyed operations of the transit engine (``VaultTransit``), both over one
``VaultConnection``.

    secrets = open_secrets(settings)                  # security.secrets_provider = "vault"
    secrets.get("llm-api-key")                        # KV v2 secret/rtml/llm-api-key, field "value"
    transit = VaultTransit(settings)
    transit.hmac("rtml-pii", b"alice@example.com")    # "vault:v1:..."; the same input, the same answer
    transit.decrypt("rtml-pii", transit.encrypt("rtml-pii", b"x")) == b"x"

The secret ``name`` is the field ``value`` of the KV v2 secret ``<security.vault_kv_prefix>/<name>``
in the engine mounted at ``security.vault_kv_mount`` (put it with ``vault kv put -mount=secret
rtml/<name> value=...``). Values are cached per name for ``security.vault_cache_ttl_s``, at most
``security.vault_cache_size`` of them; missing secrets are not cached.

The token is ``VAULT_TOKEN``, else the content of ``security.vault_token_file`` (``vault login``
writes ``~/.vault-token``). On connecting, rtml asks ``sys/health`` (a sealed Vault is said so) and
looks the token up (``auth/token/lookup-self``). A renewable token with a TTL is renewed
(``renew-self``) once less than a third of its TTL is left, checked before each Vault call: there is
no background thread, so a process that makes no Vault call for two thirds of the token's TTL lets
it expire, and the next call then fails naming the token's source. Renewal stops, with a warning,
once Vault no longer extends the token (its maximum TTL).

Every failure is a ``VaultError`` (an ``RtmlError``) that names Vault's address and what to do:
``VaultUnavailable`` (unreachable, timed out, TLS, sealed, failing), ``VaultDenied`` (no token, a
refused token, or a policy that lacks the path: it names the policy rule to add), ``VaultRefused``
(a transit request Vault rejects: an unknown key, a tampered ciphertext); a secret Vault does not
have is ``MissingSecret``, naming the KV path and the ``vault kv put`` command that creates it.
"""

from __future__ import annotations

import base64
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import hvac
import hvac.exceptions
import requests
from cachetools import TTLCache

from rtml.errors import RtmlError
from rtml.settings import SecuritySettings, Settings
from security.secrets import MissingSecret

log = logging.getLogger(__name__)

T = TypeVar("T")

TOKEN_VARIABLE = "VAULT_TOKEN"
VALUE_FIELD = "value"  # the KV field that holds a secret's value


class VaultError(RtmlError):
    """A Vault problem the person running rtml has to fix; the message says how."""


class VaultUnavailable(VaultError):
    """Vault cannot be reached, did not answer in time, is sealed, or failed."""


class VaultDenied(VaultError):
    """No token, a token Vault refuses (expired, revoked, wrong), or a policy without the path."""


class VaultRefused(VaultError):
    """A request Vault rejected as invalid (a transit key that does not exist, a tampered
    ciphertext)."""


def _setting(name: str) -> str:
    return f"security.{name} (RTML_SECURITY__{name.upper()})"


class VaultConnection:
    """One hvac client with its token, shared by ``VaultSecrets`` and ``VaultTransit``.

    ``call`` runs a request after renewing the token when due and turns hvac's and requests'
    failures into ``VaultError``s. Safe to use from several threads; ``clock`` (seconds, monotonic)
    is what token lifetimes are measured with."""

    def __init__(self, security: SecuritySettings, *, clock: Callable[[], float] = time.monotonic):
        self.url = security.vault_url
        self._timeout_s = security.vault_timeout_s
        self._clock = clock
        self._lock = threading.Lock()  # one renewal at a time
        token, self.token_source = _token(security)
        self.client = hvac.Client(
            url=security.vault_url,
            token=token,
            namespace=security.vault_namespace or None,
            timeout=security.vault_timeout_s,
            verify=_ca_bundle(security),
        )
        self._check_health()
        self._adopt(self._lookup_self(), self._clock())

    def call(self, request: Callable[[hvac.Client], T], *, path: str, capability: str) -> T:
        """``request(client)``'s answer. ``path`` (the API path without ``/v1/``) and
        ``capability`` are what a policy must grant for it, named when Vault denies it."""
        self._renew_if_due()
        try:
            return self._send(lambda: request(self.client))
        except hvac.exceptions.Forbidden:
            # Vault answers 403 both to a dead token and to a policy without the path; a token
            # that still looks itself up is alive, so the policy is what is missing.
            policies = ", ".join(self._lookup_self().get("policies") or []) or "none"
            raise VaultDenied(
                f"Vault at {self.url} denied {capability!r} on {path} to rtml's token (from {self.token_source}; its "
                f"policies: {policies}): add `path \"{path}\" {{ capabilities = [\"{capability}\"] }}` to one of them"
            ) from None

    # --- the token -------------------------------------------------------------------------------

    def _check_health(self) -> None:
        health = self._send(lambda: self.client.sys.read_health_status(method="GET"))
        status = getattr(health, "status_code", 200)  # hvac gives the JSON for a 200, else the response
        if status == 503:
            raise VaultUnavailable(f"Vault at {self.url} is sealed: unseal it (`vault operator unseal`), then retry")
        if status == 501:
            raise VaultUnavailable(f"Vault at {self.url} is not initialized: `vault operator init`, unseal it, then retry")

    def _lookup_self(self) -> dict[str, Any]:
        try:
            return self._send(self.client.auth.token.lookup_self)["data"]
        except hvac.exceptions.Forbidden:
            raise self._refused_token() from None

    def _refused_token(self) -> VaultDenied:
        return VaultDenied(
            f"Vault at {self.url} refused rtml's token (from {self.token_source}): it is expired, revoked or not a "
            f"token of this Vault; get a new one (`vault login`, or from whoever issues rtml's tokens) and set "
            f"{TOKEN_VARIABLE} or write it to the file {_setting('vault_token_file')} names"
        )

    def _adopt(self, lease: dict[str, Any], now: float) -> None:
        """Takes the token's lifetime from a lookup (``ttl``, ``creation_ttl``) or a renewal
        (``lease_duration``)."""
        ttl = int(lease.get("ttl", lease.get("lease_duration")) or 0)
        self._renewable = bool(lease.get("renewable")) and ttl > 0
        self._granted_s = int(lease.get("creation_ttl") or ttl)  # "its TTL": the lifetime last granted
        self._expires_at = now + ttl

    def _renew_if_due(self) -> None:
        with self._lock:
            now = self._clock()
            if not self._renewable or self._expires_at - now >= self._granted_s / 3:
                return
            before = self._expires_at
            try:
                auth = self._send(self.client.auth.token.renew_self)["auth"]
            except hvac.exceptions.Forbidden:
                raise self._refused_token() from None
            except hvac.exceptions.InvalidRequest as refused:  # no longer renewable: use it while it lasts
                log.warning("Vault did not renew rtml's token (from %s): %s", self.token_source, refused)
                self._renewable = False
                return
            self._adopt(auth, now)
            if self._expires_at <= before + 1:  # a second's slack: Vault counts whole seconds
                self._renewable = False
                log.warning(
                    "rtml's Vault token (from %s) has reached its maximum TTL and expires in %d s: give rtml a new one before then",
                    self.token_source, int(self._expires_at - now),
                )  # fmt: skip

    # --- transport --------------------------------------------------------------------------------

    def _send(self, request: Callable[[], T]) -> T:
        """``request()``, with the failures that say Vault is not there as ``VaultUnavailable``;
        Vault's answers about the request itself (403, 404, 400) pass through as hvac raises them."""
        try:
            return request()
        except requests.exceptions.SSLError as error:
            raise VaultUnavailable(
                f"TLS with Vault at {self.url} failed ({error}): set {_setting('vault_ca_cert')} to the CA bundle that "
                f"signed Vault's certificate"
            ) from error
        except requests.exceptions.Timeout as error:
            raise VaultUnavailable(
                f"Vault at {self.url} did not answer within {self._timeout_s:g} s ({_setting('vault_timeout_s')}): check "
                f"that it is up and reachable from here, or raise the timeout"
            ) from error
        except requests.exceptions.ConnectionError as error:
            raise VaultUnavailable(
                f"cannot reach Vault at {self.url} ({_setting('vault_url')}): start Vault there, or point the setting at "
                f"your Vault, or choose another security.secrets_provider ('env' or 'file')"
            ) from error
        except requests.exceptions.RequestException as error:
            raise VaultUnavailable(f"cannot send a request to Vault at {self.url} ({_setting('vault_url')}): {error}") from error
        except hvac.exceptions.VaultDown as error:
            raise VaultUnavailable(f"Vault at {self.url} is sealed ({error}): unseal it (`vault operator unseal`), then retry") from error
        except (
            hvac.exceptions.InternalServerError,
            hvac.exceptions.BadGateway,
            hvac.exceptions.VaultNotInitialized,
            hvac.exceptions.RateLimitExceeded,
            hvac.exceptions.UnexpectedError,
        ) as error:
            raise VaultUnavailable(f"Vault at {self.url} failed: {error}; retry later, and see Vault's log if it persists") from error


def _ca_bundle(security: SecuritySettings) -> str | bool:
    """What requests verifies Vault's certificate with: the named CA bundle, else the system's."""
    if not security.vault_ca_cert:
        return True
    path = Path(security.vault_ca_cert).expanduser()
    if not path.exists():  # requests would say only "invalid path" on the first https request
        raise VaultError(
            f"{_setting('vault_ca_cert')} names {path}, which does not exist: point it at the PEM bundle of the CA that "
            f"signed Vault's certificate, or set it to \"\" to use the system's CAs"
        )
    return str(path)


def _token(security: SecuritySettings) -> tuple[str, str]:
    """rtml's Vault token and where it came from."""
    token = os.environ.get(TOKEN_VARIABLE, "").strip()
    if token:
        return token, f"the environment variable {TOKEN_VARIABLE}"
    path = Path(security.vault_token_file).expanduser() if security.vault_token_file else None
    try:
        token = path.read_text().strip() if path else ""
    except (FileNotFoundError, IsADirectoryError):
        token = ""
    if token:
        return token, f"the file {path}, {_setting('vault_token_file')}"
    raise VaultDenied(
        f"no Vault token: set the environment variable {TOKEN_VARIABLE}, or write the token to "
        f"{path or 'a file'} and name it in {_setting('vault_token_file')} (`vault login` writes ~/.vault-token)"
    )


class VaultSecrets:
    """The "vault" secrets provider: ``get(name)`` is the field ``value`` of the KV v2 secret
    ``<vault_kv_prefix>/<name>``, cached (``vault_cache_ttl_s``, ``vault_cache_size``)."""

    def __init__(self, settings: Settings, *, connection: VaultConnection | None = None, clock: Callable[[], float] = time.monotonic):
        security = settings.security
        self.connection = connection or VaultConnection(security, clock=clock)
        self.mount = security.vault_kv_mount
        self.prefix = security.vault_kv_prefix.strip("/")
        self._lock = threading.Lock()  # Serve replicas call from several threads; TTLCache is not thread-safe
        self._cache: TTLCache | None = None
        if security.vault_cache_ttl_s > 0 and security.vault_cache_size > 0:
            self._cache = TTLCache(maxsize=security.vault_cache_size, ttl=security.vault_cache_ttl_s, timer=clock)

    def path(self, name: str) -> str:
        """The KV path of the secret ``name``, within the mount."""
        return f"{self.prefix}/{name}" if self.prefix else name

    def get(self, name: str) -> str:
        if self._cache is not None:
            with self._lock:
                value = self._cache.get(name)
            if value is not None:
                return value
        value = self._read(name)
        if self._cache is not None:
            with self._lock:
                self._cache[name] = value
        return value

    def _read(self, name: str) -> str:
        path = self.path(name)
        put = f"`vault kv put -mount={self.mount} {path} {VALUE_FIELD}=...`"
        try:
            answer = self.connection.call(
                lambda client: client.secrets.kv.v2.read_secret_version(path=path, mount_point=self.mount, raise_on_deleted_version=True),
                path=f"{self.mount}/data/{path}",
                capability="read",
            )
        except hvac.exceptions.InvalidPath as missing:
            why = self._why_missing(path, missing)
            raise MissingSecret(f"secret {name!r} is not in Vault (security.secrets_provider = 'vault'): {why}; create it with {put}") from None
        data = (answer.get("data") or {}).get("data") or {}
        value = data.get(VALUE_FIELD)
        if not isinstance(value, str) or not value:
            raise MissingSecret(
                f"secret {name!r}: the KV secret {self.mount}/{path} in Vault has no non-empty text field {VALUE_FIELD!r} "
                f"(its fields: {', '.join(sorted(data)) or 'none'}): set it with {put}"
            )
        return value

    def _why_missing(self, path: str, missing: hvac.exceptions.InvalidPath) -> str:
        metadata = ((missing.json or {}).get("data") or {}).get("metadata") or {}
        if metadata.get("deletion_time"):
            version = metadata.get("version")
            return (
                f"the latest version ({version}) of the KV secret {self.mount}/{path} was deleted at {metadata['deletion_time']} "
                f"(`vault kv undelete -mount={self.mount} -versions={version} {path}` brings it back)"
            )
        if missing.errors:  # Vault's own words, e.g. no KV engine at the mount
            return f"Vault answered {'; '.join(missing.errors)} for {self.mount}/{path} (is {_setting('vault_kv_mount')} a KV v2 mount?)"
        return f"there is no KV secret {self.mount}/{path} (mount {_setting('vault_kv_mount')}, path {_setting('vault_kv_prefix')}/<name>)"


class VaultTransit:
    """Keyed operations of Vault's transit engine at ``security.vault_transit_mount``; the key never
    leaves Vault. Over the process's shared connection unless one is given."""

    def __init__(self, settings: Settings, *, connection: VaultConnection | None = None):
        self.connection = connection or shared_vault_secrets(settings).connection
        self.mount = settings.security.vault_transit_mount

    def hmac(self, key_name: str, data: bytes) -> str:
        """Vault's HMAC-SHA256 of ``data`` under the transit key ``key_name``, as Vault writes it:
        ``vault:v<key version>:<base64>``. The same data and key version give the same answer; the
        key must exist (``vault write -f <mount>/keys/<key_name>``)."""
        answer = self._post("hmac", key_name, lambda api: api.generate_hmac(name=key_name, hash_input=_b64(data), mount_point=self.mount))
        return answer["data"]["hmac"]

    def encrypt(self, key_name: str, plaintext: bytes) -> str:
        """``plaintext`` sealed with the transit key ``key_name`` (authenticated encryption with a
        fresh nonce: the same plaintext gives another ciphertext each time), ``vault:v<n>:...``.
        Vault creates the key on first use when the policy grants ``create``."""
        answer = self._post("encrypt", key_name, lambda api: api.encrypt_data(name=key_name, plaintext=_b64(plaintext), mount_point=self.mount))
        return answer["data"]["ciphertext"]

    def decrypt(self, key_name: str, ciphertext: str) -> bytes:
        """The plaintext ``encrypt`` sealed; ``VaultRefused`` when the ciphertext was altered or
        made with another key."""
        answer = self._post("decrypt", key_name, lambda api: api.decrypt_data(name=key_name, ciphertext=ciphertext, mount_point=self.mount))
        return base64.b64decode(answer["data"]["plaintext"])

    def _post(self, operation: str, key_name: str, request: Callable[[Any], T]) -> T:
        path = f"{self.mount}/{operation}/{key_name}"
        try:
            return self.connection.call(lambda client: request(client.secrets.transit), path=path, capability="update")
        except hvac.exceptions.InvalidRequest as refused:
            said = "; ".join(refused.errors or []) or str(refused)
            if "not found" in said:
                raise VaultRefused(
                    f"the transit key {key_name!r} does not exist in Vault at {self.url} (mount {self.mount!r}, "
                    f"{_setting('vault_transit_mount')}): create it with `vault write -f {self.mount}/keys/{key_name}`"
                ) from None
            hint = " (the ciphertext was altered, truncated, or made with another key)" if operation == "decrypt" else ""
            raise VaultRefused(f"Vault at {self.url} refused {operation} with the transit key {key_name!r}: {said}{hint}") from None
        except hvac.exceptions.InvalidPath:
            raise VaultRefused(
                f"Vault at {self.url} has no transit engine at {self.mount!r} ({_setting('vault_transit_mount')}): "
                f"enable it with `vault secrets enable -path={self.mount} transit`"
            ) from None

    @property
    def url(self) -> str:
        return self.connection.url


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


_shared: dict[tuple, VaultSecrets] = {}
_shared_lock = threading.Lock()


def shared_vault_secrets(settings: Settings) -> VaultSecrets:
    """The process's ``VaultSecrets`` for this Vault configuration and ``VAULT_TOKEN``: whoever asks
    (every ``open_secrets`` call, every ``VaultTransit``) shares one client, one token renewal and
    one cache. A configuration that failed to connect is tried again on the next call."""
    security = settings.security
    vault_fields = (value for field, value in sorted(security.model_dump().items()) if field.startswith("vault_"))
    key = (os.environ.get(TOKEN_VARIABLE, ""), *vault_fields)
    with _shared_lock:
        if key not in _shared:
            _shared[key] = VaultSecrets(settings)
        return _shared[key]
