"""Who is calling: the one place the API decides a request's caller, and with it its tenant.

Every request to the API (REST routes, GraphQL over HTTP, a WebSocket's ``connection_init``)
carries ``Authorization: Bearer <JWT>``; ``Authenticator.caller`` verifies it
(``security.tokens``) and returns the ``Principal``: who, which tenant, which role. The data layer
is scoped to that tenant (``api.data.DataAccess.scoped``); nothing else reads the credentials.
The public routes (health, the OpenAPI document and the JWKS document) take none.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rtml.schemas import Refusal
from rtml.settings import Settings
from security.tokens import AuthError, Principal, Role, TokenAuthority, bearer_token

AUTHORIZATION = "authorization"
FORWARDED_FOR = "x-forwarded-for"
JWKS_PATH = "/.well-known/jwks.json"


class Authenticator:
    """Verifies the callers of one API process (one ``TokenAuthority`` and its cache of verified tokens)."""

    def __init__(self, settings: Settings):
        self._tokens = TokenAuthority(settings)

    def caller(self, headers: Mapping[str, Any]) -> Principal:
        """The caller whose bearer token is in ``headers`` (an HTTP request's headers, or the
        headers-like payload of a ``connection_init``: any letter case); ``Refusal(401)`` naming
        what is wrong otherwise."""
        value = headers.get(AUTHORIZATION)
        if value is None:  # a plain dict (a connection_init payload) may spell the name in any case
            value = next((item for name, item in headers.items() if isinstance(name, str) and name.lower() == AUTHORIZATION), None)
        try:
            return self._tokens.verify(bearer_token(value if isinstance(value, str) else None))
        except AuthError as error:
            raise Refusal(error.status, error.reason) from None

    def jwks(self) -> dict:
        """The public keys tokens are verified with (``GET /.well-known/jwks.json``)."""
        return self._tokens.jwks()


def require(principal: Principal, needed: Role, what: str) -> None:
    """``Refusal(403)`` unless ``principal``'s role allows ``needed`` (``what`` names the action)."""
    try:
        principal.require(needed, what)
    except AuthError as error:
        raise Refusal(error.status, error.reason) from None


def client_address(connection: Any) -> str | None:
    """Where a request (starlette's ``Request`` or ``WebSocket``) came from, for the audit trail:
    the peer's address, and the ``X-Forwarded-For`` a proxy in front (the TLS entry) set, as the
    proxy's claim (a client without such a proxy could send one itself)."""
    peer = connection.client.host if connection.client else None
    forwarded = connection.headers.get(FORWARDED_FOR)
    return f"{peer} (forwarded for {forwarded[:200]})" if forwarded else peer
