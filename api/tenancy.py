"""Who is calling: the one place the API decides a request's tenant.

Every GraphQL request (HTTP, or a WebSocket connection's ``connection_init``) names its tenant in
the ``x-rtml-tenant`` header, and ``caller_tenant`` turns that header into the tenant the data
layer scopes every read and write to (``api.data.DataAccess.scoped``). Nothing else reads the
header. Until the security issue lands the header is trusted as it is; that issue's JWT check
plugs in here, in ``caller_tenant``, and every entry point gets it at once.
"""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import TypeAdapter, ValidationError

from rtml.schemas import Refusal, TenantId

TENANT_HEADER = "x-rtml-tenant"

_TENANT = TypeAdapter(TenantId)


def caller_tenant(headers: Mapping[str, str]) -> str:
    """The tenant ``headers`` name in ``x-rtml-tenant`` (any letter case): an HTTP request's
    headers, or the headers-like payload of a WebSocket ``connection_init``. A missing or invalid
    one is a ``Refusal(401)`` whose reason names the header and what it must hold."""
    value = headers.get(TENANT_HEADER)
    if value is None:  # a plain dict (a connection_init payload) may spell the name in any case
        value = next((item for name, item in headers.items() if isinstance(name, str) and name.lower() == TENANT_HEADER), None)
    if value is None:
        raise Refusal(401, f"no tenant: send the {TENANT_HEADER} header with the id of your tenant")
    try:
        return _TENANT.validate_python(value)
    except ValidationError:
        raise Refusal(
            401, f"the {TENANT_HEADER} header {str(value)[:80]!r} is not a tenant id: 1 to 64 letters, digits, '_', '.' or '-'"
        ) from None
