"""A local double of the HashiCorp Vault HTTP API endpoints rtml's Vault provider uses, since no Vault
or OpenBao server can be obtained here (the Go module proxy refuses OpenBao; Vault's module cannot
be ``go install``ed). Shapes follow https://developer.hashicorp.com/vault/api-docs:

- ``GET /v1/sys/health`` (unauthenticated): 200, or 503 with ``"sealed": true`` when sealed;
- ``GET /v1/auth/token/lookup-self``, ``POST /v1/auth/token/renew-self`` (token auth: ``ttl``,
  ``creation_ttl``, ``renewable``; a renewal grants the token's TTL again, capped by its
  ``explicit_max_ttl``; a request's ``increment`` is not honoured);
- KV v2 at each of ``kv_mounts``: ``GET|POST|DELETE /v1/<mount>/data/<path>`` (read, optionally
  ``?version=N``; write a new version; soft-delete the latest). A missing secret is 404
  ``{"errors": []}``; a deleted version is 404 whose body still carries its metadata
  (``deletion_time`` set), as Vault answers;
- transit at each of ``transit_mounts``: ``POST /v1/<mount>/keys/<name>`` (create),
  ``/hmac/<name>`` (HMAC-SHA256, ``vault:v1:<base64>``), ``/encrypt/<name>`` (AES-256-GCM with a
  fresh nonce, ``vault:v1:<base64 of nonce + ciphertext + tag>``; creates the key on first use, as
  Vault's upsert does) and ``/decrypt/<name>`` (a tampered ciphertext fails authentication: 400
  ``cipher: message authentication failed``). HMAC and decrypt with an unknown key: 400
  ``encryption key not found``.

Every other request needs ``X-Vault-Token`` naming a live token (``add_token``; the root token
``root_token`` never expires and may do anything): otherwise 403 ``{"errors": ["permission
denied"]}``, which is also the answer to a live token whose ``paths`` (fnmatch patterns of API paths
without ``/v1/``, ``None`` for all) do not cover the request; lookup-self and renew-self are always
allowed, as in Vault's default policy. ``sealed = True`` answers 503 ``{"errors": ["Vault is
sealed"]}`` to everything. With ``tls`` (a server ``ssl.SSLContext``) it speaks https. Token
lifetimes follow ``clock`` (default ``time.monotonic``), so a test can pass the same fake clock to
the double and the provider. ``requests`` records every request; ``count(method, path)`` counts
them.

    with VaultDouble() as vault:
        vault.add_token("t", ttl_s=60, renewable=True, paths=["secret/data/rtml/*"])
        ... settings with security.vault_url = vault.url, VAULT_TOKEN=t ...
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import ssl
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from fnmatch import fnmatchcase
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

NONCE_BYTES = 12  # Vault's aes256-gcm96 keys: a 96-bit nonce before the ciphertext


@dataclass
class Token:
    id: str
    ttl_s: int  # 0: never expires (a root token)
    renewable: bool
    max_ttl_s: int  # explicit_max_ttl; 0: none
    paths: list[str] | None
    created_at: float  # on the double's clock
    expires_at: float | None = None

    def __post_init__(self):
        if self.ttl_s:
            self.expires_at = self.created_at + self.ttl_s


@dataclass
class KvVersion:
    data: dict[str, Any]
    created_time: str
    deletion_time: str = ""

    def metadata(self, version: int) -> dict[str, Any]:
        return {"created_time": self.created_time, "custom_metadata": None, "deletion_time": self.deletion_time, "destroyed": False, "version": version}


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: Any
    status: int


@dataclass
class VaultDouble:
    root_token: str = "double-root-token"
    kv_mounts: tuple[str, ...] = ("secret",)
    transit_mounts: tuple[str, ...] = ("transit",)
    clock: Callable[[], float] = time.monotonic
    sealed: bool = False
    tls: ssl.SSLContext | None = None  # a server context: the double speaks https
    requests: list[Recorded] = field(default_factory=list)

    def __post_init__(self):
        self._lock = threading.Lock()
        self._tokens: dict[str, Token] = {}
        self._kv: dict[tuple[str, str], list[KvVersion]] = {}
        self._transit: dict[tuple[str, str], bytes] = {}
        self.add_token(self.root_token, ttl_s=0, renewable=False)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        if self.tls is not None:
            self._server.socket = self.tls.wrap_socket(self._server.socket, server_side=True)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="vault-double", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"{'https' if self.tls else 'http'}://{host}:{port}"

    def __enter__(self) -> VaultDouble:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def add_token(self, token: str, *, ttl_s: int, renewable: bool, max_ttl_s: int = 0, paths: list[str] | None = None) -> None:
        with self._lock:
            self._tokens[token] = Token(token, ttl_s, renewable, max_ttl_s, paths, self.clock())

    def revoke(self, token: str) -> None:
        with self._lock:
            self._tokens.pop(token, None)

    def count(self, method: str, path: str) -> int:
        with self._lock:
            return sum(1 for r in self.requests if r.method == method and r.path == path)

    # --- the API -------------------------------------------------------------------------------

    def handle(self, method: str, path: str, query: dict[str, list[str]], headers: dict[str, str], body: Any) -> tuple[int, dict | None]:
        route = path.removeprefix("/v1/")
        if route == "sys/health" and method == "GET":
            return self._health()
        if self.sealed:
            return 503, {"errors": ["Vault is sealed"]}
        with self._lock:
            token = self._live(headers.get("x-vault-token", ""))
            if token is None or not self._allows(token, route):
                return 403, {"errors": ["permission denied"]}
            if route == "auth/token/lookup-self" and method == "GET":
                return 200, _response(data=self._lookup(token))
            if route == "auth/token/renew-self" and method == "POST":
                return self._renew(token)
            mount, _, rest = route.partition("/")
            operation, _, name = rest.partition("/")
            if mount in self.kv_mounts and operation == "data" and name:
                return self._kv_data(method, mount, name, query, body)
            if mount in self.transit_mounts and method == "POST" and name and operation in _TRANSIT:
                return _TRANSIT[operation](self, mount, name, body if isinstance(body, dict) else {})
        return 404, {"errors": [f'no handler for route "{route}". route entry not found.']}

    def _health(self) -> tuple[int, dict]:
        return (503 if self.sealed else 200), {
            "initialized": True, "sealed": self.sealed, "standby": False, "performance_standby": False,
            "replication_performance_mode": "disabled", "replication_dr_mode": "disabled",
            "server_time_utc": int(time.time()), "version": "1.19.0", "cluster_name": "vault-double", "cluster_id": "double",
        }  # fmt: skip

    def _live(self, token_id: str) -> Token | None:
        token = self._tokens.get(token_id)
        if token is not None and token.expires_at is not None and token.expires_at <= self.clock():
            del self._tokens[token_id]  # an expired token is revoked
            return None
        return token

    def _allows(self, token: Token, route: str) -> bool:
        if token.paths is None or route in ("auth/token/lookup-self", "auth/token/renew-self"):
            return True
        return any(fnmatchcase(route, pattern) for pattern in token.paths)

    def _remaining(self, token: Token) -> int:
        return 0 if token.expires_at is None else max(0, int(token.expires_at - self.clock()))

    def _lookup(self, token: Token) -> dict[str, Any]:
        remaining = self._remaining(token)
        expire_time = None if token.expires_at is None else _iso(datetime.now(UTC) + timedelta(seconds=remaining))
        return {
            "accessor": f"accessor-{token.id[:6]}", "creation_time": int(time.time()), "creation_ttl": token.ttl_s,
            "display_name": "token", "entity_id": "", "expire_time": expire_time, "explicit_max_ttl": token.max_ttl_s,
            "id": token.id, "issue_time": _now(), "meta": None, "num_uses": 0, "orphan": True, "path": "auth/token/create",
            "policies": _policies(token), "renewable": token.renewable, "ttl": remaining, "type": "service",
        }  # fmt: skip

    def _renew(self, token: Token) -> tuple[int, dict]:
        if not token.renewable or token.expires_at is None:
            return 400, {"errors": ["lease is not renewable"]}
        ttl, warnings = token.ttl_s, None
        if token.max_ttl_s:
            left = int(token.created_at + token.max_ttl_s - self.clock())
            if ttl > left:
                ttl, warnings = max(0, left), ["TTL of the token is capped by its explicit max TTL"]
        token.expires_at = self.clock() + ttl
        auth = {
            "client_token": token.id, "accessor": f"accessor-{token.id[:6]}", "policies": _policies(token),
            "token_policies": _policies(token), "metadata": None, "lease_duration": ttl,
            "renewable": token.renewable, "entity_id": "", "token_type": "service", "orphan": True,
        }  # fmt: skip
        return 200, _response(auth=auth, warnings=warnings)

    def _kv_data(self, method: str, mount: str, path: str, query: dict[str, list[str]], body: Any) -> tuple[int, dict | None]:
        if method == "POST":
            return self._kv_write(mount, path, body)
        versions = self._kv.get((mount, path), [])
        if method == "DELETE":
            if versions:
                versions[-1].deletion_time = _now()
            return 204, None
        if method != "GET":
            return 405, {"errors": [f"unsupported operation {method}"]}
        number = int(query.get("version", ["0"])[0]) or len(versions)
        if not 1 <= number <= len(versions):
            return 404, {"errors": []}
        version = versions[number - 1]
        if version.deletion_time:
            return 404, _response(data={"data": None, "metadata": version.metadata(number)})
        return 200, _response(data={"data": version.data, "metadata": version.metadata(number)})

    def _kv_write(self, mount: str, path: str, body: Any) -> tuple[int, dict]:
        if not isinstance(body, dict) or not isinstance(body.get("data"), dict):
            return 400, {"errors": ["no data provided"]}
        versions = self._kv.setdefault((mount, path), [])
        versions.append(KvVersion(body["data"], _now()))
        return 200, _response(data=versions[-1].metadata(len(versions)))

    def _transit_create(self, mount: str, name: str, body: dict) -> tuple[int, None]:
        self._transit.setdefault((mount, name), AESGCM.generate_key(bit_length=256))
        return 204, None

    def _transit_hmac(self, mount: str, name: str, body: dict) -> tuple[int, dict]:
        key = self._transit.get((mount, name))
        if key is None:
            return 400, {"errors": ["encryption key not found"]}
        data = _b64(body.get("input"))
        if data is None:
            return 400, {"errors": ["unable to decode input as base64"]}
        digest = hmac.new(key, data, hashlib.sha256).digest()
        return 200, _response(data={"hmac": "vault:v1:" + base64.b64encode(digest).decode()})

    def _transit_encrypt(self, mount: str, name: str, body: dict) -> tuple[int, dict]:
        plaintext = _b64(body.get("plaintext"))
        if plaintext is None:
            return 400, {"errors": ["failed to base64-decode plaintext"]}
        key = self._transit.setdefault((mount, name), AESGCM.generate_key(bit_length=256))
        nonce = os.urandom(NONCE_BYTES)
        sealed = nonce + AESGCM(key).encrypt(nonce, plaintext, None)
        return 200, _response(data={"ciphertext": "vault:v1:" + base64.b64encode(sealed).decode(), "key_version": 1})

    def _transit_decrypt(self, mount: str, name: str, body: dict) -> tuple[int, dict]:
        key = self._transit.get((mount, name))
        if key is None:
            return 400, {"errors": ["encryption key not found"]}
        ciphertext = str(body.get("ciphertext") or "")
        if not ciphertext.startswith("vault:v"):
            return 400, {"errors": ["invalid ciphertext: no prefix"]}
        if not ciphertext.startswith("vault:v1:"):
            return 400, {"errors": ["invalid ciphertext: wrong key version"]}
        sealed = _b64(ciphertext.removeprefix("vault:v1:"))
        if sealed is None or len(sealed) <= NONCE_BYTES:
            return 400, {"errors": ["invalid ciphertext: could not decode"]}
        try:
            plaintext = AESGCM(key).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], None)
        except InvalidTag:
            return 400, {"errors": ["cipher: message authentication failed"]}
        return 200, _response(data={"plaintext": base64.b64encode(plaintext).decode()})


_TRANSIT = {
    "keys": VaultDouble._transit_create,
    "hmac": VaultDouble._transit_hmac,
    "encrypt": VaultDouble._transit_encrypt,
    "decrypt": VaultDouble._transit_decrypt,
}


def _response(*, data: Any = None, auth: Any = None, warnings: list[str] | None = None) -> dict[str, Any]:
    """Vault's envelope around every answer."""
    return {"request_id": str(uuid.uuid4()), "lease_id": "", "renewable": False, "lease_duration": 0,
            "data": data, "wrap_info": None, "warnings": warnings, "auth": auth}  # fmt: skip


def _policies(token: Token) -> list[str]:
    return ["root"] if token.paths is None else ["default", "rtml"]


def _now() -> str:
    return _iso(datetime.now(UTC))


def _iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def _b64(text: Any) -> bytes | None:
    try:
        return base64.b64decode(str(text), validate=True) if text is not None else None
    except (binascii.Error, ValueError):
        return None


def _handler(double: VaultDouble) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self._serve("GET")

        def do_POST(self):
            self._serve("POST")

        def do_PUT(self):  # Vault takes PUT as POST
            self._serve("POST")

        def do_DELETE(self):
            self._serve("DELETE")

        def _serve(self, method: str) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            try:
                body = json.loads(raw) if raw else None
            except json.JSONDecodeError:
                body = None
            split = urlsplit(self.path)
            headers = {name.lower(): value for name, value in self.headers.items()}
            status, answer = double.handle(method, split.path, parse_qs(split.query), headers, body)
            with double._lock:
                double.requests.append(Recorded(method, split.path, headers, body, status))
            payload = b"" if answer is None else json.dumps(answer).encode()
            self.send_response(status)
            if answer is not None:
                self.send_header("Content-Type", "application/json")  # exactly this: hvac reads errors only then
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format, *args):  # noqa: A002 - the stdlib's signature
            """Quiet: the double's requests are in ``double.requests``."""

    return Handler
