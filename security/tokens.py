"""Who is calling: signed JWTs that name a tenant and a role (PyJWT).

    tokens = TokenAuthority(settings)
    token = tokens.issue("acme", Role.WRITER, subject="etl-job", ttl_s=3600)
    principal = tokens.verify(token)           # Principal(subject, tenant, role, token_id, expires_at)
    tokens.jwks()                              # the public keys, for other verifiers

Tokens are ES256-signed (the one algorithm a verifier accepts, so
neither ``alg: none`` nor an HS256 token "signed" with the public key gets through). A token
names its key in the ``kid`` header: the signing key is ``security.jwt_key_id``, and
``security.jwt_previous_key_ids`` are still accepted (rotation: sign with a new key, keep the
old one verifying until the tokens it signed have expired, then drop it). Each key is the
secret ``jwt-signing-key-<kid>`` (a PEM private key) from the secrets provider, or generated
locally (``security.keys``). A token must carry ``iss``, ``aud``, ``sub``, ``iat``, ``nbf``,
``exp``, ``jti``, ``tenant`` and ``role``; issuer and audience must equal the settings', and the
times are checked with at most ``security.jwt_leeway_s`` of clock skew. A token lives at most
``security.jwt_max_ttl_s``.

Roles are ordered: a ``writer`` may do what a ``reader`` may (and ingest, predict, give
feedback), an ``admin`` what a ``writer`` may (and promote, set weights, roll out, erase, read
the audit trail and reveal tokenized values).

Every failure is an ``AuthError`` with ``status`` 401 (not authenticated) or 403 (authenticated,
not allowed), whose message says what was wrong and what to do; it never echoes the token.
"""

from __future__ import annotations

import enum
import threading
import time
from dataclasses import dataclass
from functools import cached_property

import jwt
from cachetools import LRUCache
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import TypeAdapter, ValidationError

from rtml.errors import RtmlError
from rtml.schemas import TenantId, new_id
from rtml.settings import Settings
from security.keys import key_text

SIGNING_KEY_SECRET = "jwt-signing-key-{kid}"
# The one algorithm tokens are signed and verified with (P-256 keys).
ALGORITHM = "ES256"
REQUIRED_CLAIMS = ("iss", "aud", "sub", "iat", "nbf", "exp", "jti", "tenant", "role")
# Verified tokens kept per process, so that a client's repeated calls cost one signature check.
VERIFIED_CACHE_SIZE = 4096
_TENANT = TypeAdapter(TenantId)


class Role(str, enum.Enum):
    READER = "reader"
    WRITER = "writer"
    ADMIN = "admin"

    def allows(self, needed: Role) -> bool:
        """Whether this role may do what ``needed`` may."""
        order = list(Role)
        return order.index(self) >= order.index(needed)


class AuthError(Exception):
    """A request refused for who made it: ``status`` 401 (no valid token) or 403 (not allowed)."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class Principal:
    """A verified caller: who (``subject``), for which tenant, in which role."""

    subject: str
    tenant: str
    role: Role
    token_id: str
    expires_at: float

    def require(self, needed: Role, what: str) -> None:
        """Raise ``AuthError(403)`` unless this caller's role allows ``needed``; ``what`` names the action."""
        if not self.role.allows(needed):
            raise AuthError(403, f"{what} needs the {needed.value} role; this token's role is {self.role.value}: ask an admin of tenant {self.tenant} for a {needed.value} token")

    @property
    def actor(self) -> str:
        """How the audit trail names this caller."""
        return f"{self.subject} ({self.role.value}, token {self.token_id})"


class TokenAuthority:
    """Issues and verifies the tokens of one deployment (its settings' keys, issuer and audience)."""

    def __init__(self, settings: Settings):
        self._settings = settings
        self._security = settings.security
        self._verified: LRUCache[str, Principal] = LRUCache(VERIFIED_CACHE_SIZE)
        self._lock = threading.Lock()

    @cached_property
    def _private_keys(self) -> dict[str, ec.EllipticCurvePrivateKey]:
        kids = [self._security.jwt_key_id, *self._security.jwt_previous_key_ids]
        return {kid: _load_private_key(key_text(self._settings, SIGNING_KEY_SECRET.format(kid=kid), _new_private_pem), kid) for kid in kids}

    def issue(self, tenant: str, role: Role | str, subject: str, ttl_s: float | None = None) -> str:
        """A signed token for ``subject`` acting for ``tenant`` in ``role``, valid from now for
        ``ttl_s`` seconds (default ``security.jwt_default_ttl_s``, at most ``jwt_max_ttl_s``)."""
        try:
            tenant = _TENANT.validate_python(tenant)
        except ValidationError:
            raise ValueError(f"{tenant!r} is not a tenant id: 1 to 64 letters, digits, '_', '.' or '-'") from None
        role = Role(role)
        ttl_s = self._security.jwt_default_ttl_s if ttl_s is None else ttl_s
        if not 0 < ttl_s <= self._security.jwt_max_ttl_s:
            raise ValueError(f"a token lives more than 0 and at most {self._security.jwt_max_ttl_s:g} s (security.jwt_max_ttl_s); {ttl_s:g} s was asked")
        now = int(time.time())
        claims = {
            "iss": self._security.jwt_issuer,
            "aud": self._security.jwt_audience,
            "sub": subject,
            "iat": now,
            "nbf": now,
            "exp": now + int(ttl_s),
            "jti": new_id(),
            "tenant": tenant,
            "role": role.value,
        }
        kid = self._security.jwt_key_id
        return jwt.encode(claims, self._private_keys[kid], algorithm=ALGORITHM, headers={"kid": kid})

    def verify(self, token: str) -> Principal:
        """The caller ``token`` proves, or ``AuthError(401)`` saying why it proves nothing."""
        with self._lock:
            known = self._verified.get(token)
        if known is not None:
            if known.expires_at + self._security.jwt_leeway_s > time.time():
                return known
            with self._lock:
                self._verified.pop(token, None)
        principal = self._verify(token)
        with self._lock:
            self._verified[token] = principal
        return principal

    def _verify(self, token: str) -> Principal:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.DecodeError:
            raise AuthError(401, "the bearer token is not a JWT: send `Authorization: Bearer <token>` with a token from `rtml token issue`") from None
        kid = header.get("kid")
        key = self._private_keys.get(kid) if isinstance(kid, str) else None
        if key is None:
            raise AuthError(401, "the token's key id (kid) is not one of this deployment's signing keys: get a new token")
        try:
            claims = jwt.decode(
                token,
                key.public_key(),
                algorithms=[ALGORITHM],
                audience=self._security.jwt_audience,
                issuer=self._security.jwt_issuer,
                leeway=self._security.jwt_leeway_s,
                options={"require": list(REQUIRED_CLAIMS)},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError(401, "the token has expired: get a new one") from None
        except jwt.ImmatureSignatureError:
            raise AuthError(401, "the token is not valid yet (nbf/iat in the future): check the issuer's clock") from None
        except jwt.InvalidAudienceError:
            raise AuthError(401, f"the token is for another audience; this API is {self._security.jwt_audience!r}") from None
        except jwt.InvalidIssuerError:
            raise AuthError(401, f"the token has another issuer; this API accepts {self._security.jwt_issuer!r}") from None
        except jwt.InvalidAlgorithmError:
            raise AuthError(401, f"the token's algorithm is not accepted: tokens must be {ALGORITHM}-signed") from None
        except jwt.MissingRequiredClaimError as error:
            raise AuthError(401, f"the token lacks the {error.claim!r} claim: get a token from `rtml token issue`") from None
        except jwt.InvalidTokenError as error:  # bad signature, malformed claims, ...
            raise AuthError(401, f"the token is not valid ({type(error).__name__}): get a new one") from None
        return _principal(claims)

    def jwks(self) -> dict:
        """The JSON Web Key Set of the keys tokens may be signed with (public parts only)."""
        keys = []
        for kid, key in self._private_keys.items():
            jwk = jwt.algorithms.ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
            keys.append({**jwk, "kid": kid, "use": "sig", "alg": ALGORITHM})
        return {"keys": keys}


def bearer_token(authorization: str | None) -> str:
    """The token of an ``Authorization: Bearer <token>`` header value, or ``AuthError(401)``."""
    if not authorization:
        raise AuthError(401, "no credentials: send `Authorization: Bearer <token>` (a token from `rtml token issue --tenant T --role R`)")
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError(401, "the Authorization header must be `Bearer <token>`")
    return token.strip()


def _principal(claims: dict) -> Principal:
    try:
        tenant = _TENANT.validate_python(claims["tenant"])
        role = Role(claims["role"])
    except (ValidationError, ValueError):
        raise AuthError(401, "the token's tenant or role is not valid: get a token from `rtml token issue`") from None
    return Principal(str(claims["sub"]), tenant, role, str(claims["jti"]), float(claims["exp"]))


def _new_private_pem() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()


def _load_private_key(pem: str, kid: str) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(pem.encode(), password=None)
    except ValueError:
        key = None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise RtmlError(
            f"the signing key {SIGNING_KEY_SECRET.format(kid=kid)!r} is not a P-256 EC private key in PEM: make one with "
            "`openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256`",
        )
    return key
