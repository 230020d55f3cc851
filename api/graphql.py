"""The GraphQL ASGI app: ``graphql_app(access, settings)`` serves ``api.schema`` over HTTP (POST, and
GET for queries) and WebSocket (the ``graphql-transport-ws`` protocol of the npm ``graphql-ws``
client and Apollo Client), with ariadne's ASGI ``GraphQL``.

Every request is authenticated before anything else is read (``api.tenancy.Authenticator``): an
HTTP request by its ``Authorization: Bearer`` header (none or an invalid one: HTTP 401,
UNAUTHENTICATED), a WebSocket by its ``connection_init`` payload (an ``Authorization`` entry, flat
or under ``headers``), else the upgrade request's header; a connection that proves no caller is
closed with 4403 (graphql-transport-ws's "Forbidden") before it is acknowledged. Each operation's
context is a ``schema.Caller``: the ``TenantData`` of the caller's tenant. An operation that
selects a root field whose role (``schema.REQUIRED_ROLES``) the caller's token lacks is refused
before it runs: FORBIDDEN, HTTP 403.

Requests over HTTP: a POST of ``application/json`` or a GET with ``query`` (and ``variables``,
``operationName``) parameters; the body is read within ``api.max_graphql_bytes`` (413 beyond it)
and decoded by orjson, whose depth limit refuses a deeply nested document (the standard library's
json, ariadne's own, recurses into a RecursionError instead). A request that cannot be read is
answered with a GraphQL error in JSON, as every other answer (ariadne's own answer is plain text).

Limits, checked before anything runs: the document's tokens (graphql-core's parser stops past
``api.max_query_tokens``: parsing and validation run on the event loop, and cost grows with the
tokens), selection depth (graphene's depth limit, ``api.max_query_depth``) and cost (ariadne's
cost validator, ``api.max_query_cost``): every object field costs 1, times the ``first`` of each
paginated field above it (its default when not given).

Errors carry ``extensions.code``: GRAPHQL_PARSE_FAILED, GRAPHQL_VALIDATION_FAILED, QUERY_TOO_DEEP,
QUERY_TOO_COSTLY, REQUEST_TOO_LARGE, BAD_USER_INPUT (also a request that cannot be read, and
variables that do not fit their types), NOT_FOUND,
UNAUTHENTICATED, FORBIDDEN, UNAVAILABLE (``api.data``) and INTERNAL: anything unexpected, logged here with its
traceback and answered with a generic message, never the trace.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from functools import partial
from typing import Any

import orjson
from ariadne.asgi import GraphQL
from ariadne.asgi.handlers import GraphQLHTTPHandler, GraphQLTransportWSHandler
from ariadne.validation import cost_validator
from graphene.validation import depth_limit_validator
from graphql import DocumentNode, GraphQLError, GraphQLObjectType, GraphQLSchema, GraphQLSyntaxError, parse, validate
from graphql.validation import ValidationRule
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from api.data import BAD_USER_INPUT, FORBIDDEN, UNAUTHENTICATED, ApiError, DataAccess
from api.ingest import read_body
from api.schema import REQUIRED_ROLES, Caller, schema
from api.tenancy import Authenticator, client_address
from rtml.schemas import Refusal
from rtml.settings import Settings
from security.tokens import Principal

log = logging.getLogger(__name__)

GRAPHQL_PARSE_FAILED = "GRAPHQL_PARSE_FAILED"
GRAPHQL_VALIDATION_FAILED = "GRAPHQL_VALIDATION_FAILED"
QUERY_TOO_DEEP = "QUERY_TOO_DEEP"
QUERY_TOO_COSTLY = "QUERY_TOO_COSTLY"
REQUEST_TOO_LARGE = "REQUEST_TOO_LARGE"
INTERNAL = "INTERNAL"
# HTTP statuses of answers whose every error is one of these (others are answered as ariadne does).
_STATUS_OF_CODE = {UNAUTHENTICATED: 401, FORBIDDEN: 403}
INTERNAL_MESSAGE = "internal error: it has been logged on the server; try again, and report it if it persists"

# Where a request (HTTP: its state; WebSocket: its scope) keeps the caller it was authenticated as.
_PRINCIPAL = "rtml_principal"


def graphql_app(access: DataAccess, settings: Settings, authenticator: Authenticator | None = None) -> GraphQL:
    """The ASGI app of ``api.schema`` over ``access`` (mount it at ``/graphql``); callers are
    verified by ``authenticator`` (default: one over ``settings``)."""
    limits = settings.api
    costs = cost_map(schema.graphql_schema)
    too_deep = _coded(depth_limit_validator(limits.max_query_depth), QUERY_TOO_DEEP)
    authenticator = authenticator or Authenticator(settings)

    def rules(context: Caller, _document: Any, data: dict) -> list[type[ValidationRule]]:
        # The cost validator reads `first` from the request's variables, so it is made per request.
        return [
            _roles_of(context.data.principal),
            too_deep,
            cost_validator(limits.max_query_cost, cost_map=costs, variables=data.get("variables")),
        ]

    return GraphQL(
        schema.graphql_schema,
        context_value=partial(_caller, access),
        query_parser=partial(_parse, limits.max_query_tokens),
        query_validator=_validate,
        validation_rules=rules,
        execute_get_queries=True,
        debug=False,
        introspection=True,
        logger=_ErrorLog(log, {}),
        error_formatter=format_error,
        http_handler=_HTTPHandler(limits.max_graphql_bytes, authenticator),
        websocket_handler=_WebSocketHandler(authenticator),
    )


class _HTTPHandler(GraphQLHTTPHandler):
    """ariadne's HTTP handler, reading a request as the module docstring says."""

    def __init__(self, max_bytes: int, authenticator: Authenticator):
        super().__init__()
        self._max_bytes = max_bytes
        self._authenticator = authenticator

    async def graphql_http_server(self, request: Request) -> Response:
        try:
            setattr(request.state, _PRINCIPAL, self._authenticator.caller(request.headers))
            return await super().graphql_http_server(request)
        except Refusal as refusal:  # not authenticated, or from extract_data_from_request: the request could not be read
            code = {401: UNAUTHENTICATED, 403: FORBIDDEN, 413: REQUEST_TOO_LARGE}.get(refusal.status, BAD_USER_INPUT)
            return JSONResponse({"errors": [{"message": refusal.reason, "extensions": {"code": code}}]}, status_code=refusal.status)

    async def create_json_response(self, request: Request, result: dict, success: bool) -> Response:
        codes = {(error.get("extensions") or {}).get("code") for error in result.get("errors") or ()}
        if len(codes) == 1 and (status := _STATUS_OF_CODE.get(codes.pop())) is not None:
            return JSONResponse(result, status_code=status)
        return await super().create_json_response(request, result, success)

    async def extract_data_from_request(self, request: Request) -> Any:
        media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if media_type == "application/json":
            return _json(await read_body(request, self._max_bytes, "api.max_graphql_bytes"), "the body")
        params = request.query_params
        if request.method == "GET" and params.get("query"):
            variables = params.get("variables", "").strip()
            return {
                "query": params["query"],
                "operationName": params.get("operationName") or None,
                "variables": _json(variables.encode(), "the 'variables' parameter") if variables else None,
            }
        sent = media_type or "no content type"
        raise Refusal(400, f"a {request.method} of {sent}: send a POST of application/json or a GET with a 'query' parameter")


def _json(text: bytes, what: str) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as error:
        raise Refusal(400, f'{what} is not valid JSON ({error}): send {{"query": ..., "variables": {{...}}}}') from None


def _parse(max_tokens: int, _context: Any, data: dict) -> DocumentNode:
    """The request's document, parsed by graphql-core up to ``max_tokens`` tokens."""
    return parse(data["query"], max_tokens=max_tokens)


def cost_map(graphql_schema: GraphQLSchema) -> dict[str, dict[str, dict[str, Any]]]:
    """Every object field's cost for ariadne's cost validator: 1, times its ``first`` where it has one."""
    return {
        name: {
            field_name: {"complexity": 1, **({"multipliers": ["first"]} if "first" in field.args else {})}
            for field_name, field in graphql_type.fields.items()
        }
        for name, graphql_type in graphql_schema.type_map.items()
        if isinstance(graphql_type, GraphQLObjectType) and not name.startswith("__")
    }


def error_code(error: GraphQLError) -> str:
    """The ``extensions.code`` a GraphQL error is answered with (see the module docstring)."""
    original = error.original_error
    while isinstance(original, GraphQLError) and original.original_error is not None:
        original = original.original_error
    if isinstance(original, ApiError):
        return original.code
    code = (error.extensions or {}).get("code")
    if code:
        return code
    if isinstance(error, GraphQLSyntaxError):
        return GRAPHQL_PARSE_FAILED
    if error.path is None:  # not from a resolver: the request's shape or its variables' values
        return BAD_USER_INPUT
    return INTERNAL


def format_error(error: GraphQLError, debug: bool = False) -> dict:
    """A GraphQL error as the client gets it: message, locations, path and ``extensions.code``;
    an unexpected one gets a generic message (its traceback is in the server's log)."""
    formatted = dict(error.formatted)
    code = error_code(error)
    if code == INTERNAL:
        formatted["message"] = INTERNAL_MESSAGE
        formatted["extensions"] = {"code": INTERNAL}
    else:
        formatted["extensions"] = {**(formatted.get("extensions") or {}), "code": code}
    return formatted


def _caller(access: DataAccess, connection: Any, _data: Any) -> Caller:
    """The context of one operation: the data of the caller the connection was authenticated as."""
    if isinstance(connection, Request):
        principal: Principal = getattr(connection.state, _PRINCIPAL)
    else:
        principal = connection.scope[_PRINCIPAL]
    return Caller(access.scoped(principal, client_address(connection)))


class _WebSocketHandler(GraphQLTransportWSHandler):
    """graphql-transport-ws, with the caller authenticated at ``connection_init`` (module docstring)."""

    def __init__(self, authenticator: Authenticator):
        super().__init__()
        self._authenticator = authenticator

    async def handle_websocket_connection_init_message(self, websocket: Any, message: dict, client_context: Any) -> None:
        if not client_context.connection_init_received:
            params = message.get("payload")
            headers: Mapping[str, Any] = websocket.headers
            if isinstance(params, Mapping):
                nested = params.get("headers")
                given = nested if isinstance(nested, Mapping) else params
                headers = {**headers, **{str(name).lower(): value for name, value in given.items()}}
            try:
                websocket.scope[_PRINCIPAL] = self._authenticator.caller(headers)
            except Refusal as refusal:
                await websocket.close(code=4403, reason=refusal.reason[:120])
                return
        await super().handle_websocket_connection_init_message(websocket, message, client_context)


def _roles_of(principal: Principal) -> type[ValidationRule]:
    """A validation rule refusing (FORBIDDEN) each root field ``principal``'s role may not use."""

    class Roles(ValidationRule):
        def enter_field(self, node: Any, *_args: Any) -> None:
            parent = self.context.get_parent_type()
            needed = REQUIRED_ROLES.get((parent.name, node.name.value)) if parent is not None else None
            if needed is not None and not principal.role.allows(needed):
                self.report_error(
                    GraphQLError(
                        f"{node.name.value} needs the {needed.value} role; this token's role is {principal.role.value}",
                        node,
                        extensions={"code": FORBIDDEN},
                    )
                )

    return Roles


def _validate(graphql_schema: GraphQLSchema, document: Any, rules: Any = None, max_errors: int | None = None, **kwargs: Any) -> list[GraphQLError]:
    """graphql-core's validation, its errors coded: the cost validator's QUERY_TOO_COSTLY, the
    spec's rules GRAPHQL_VALIDATION_FAILED (the depth limit codes its own)."""
    errors = validate(graphql_schema, document, rules=rules, max_errors=max_errors, **kwargs)
    for error in errors:
        extensions = error.extensions or {}
        if "code" not in extensions:
            error.extensions = {**extensions, "code": QUERY_TOO_COSTLY if "cost" in extensions else GRAPHQL_VALIDATION_FAILED}
    return errors


class _Coding:
    """A validation context seen through: the errors reported through it carry ``code``."""

    def __init__(self, context: Any, code: str):
        self._context, self._code = context, code

    def report_error(self, error: GraphQLError) -> None:
        error.extensions = {**(error.extensions or {}), "code": self._code}
        self._context.report_error(error)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


def _coded(rule: type[ValidationRule], code: str) -> type[ValidationRule]:
    """``rule`` with ``code`` on each error it reports."""

    class Coded(rule):  # type: ignore[valid-type,misc]
        def __init__(self, context: Any):
            super().__init__(_Coding(context, code))

    return Coded


class _ErrorLog(logging.LoggerAdapter):
    """ariadne logs every GraphQL error as an error with its traceback; here only unexpected ones
    (INTERNAL) are, and a client's mistakes are logged at debug level without one."""

    def log(self, level: int, msg: Any, *args: Any, exc_info: Any = None, **kwargs: Any) -> None:
        if isinstance(exc_info, GraphQLError) and error_code(exc_info) != INTERNAL:
            level, exc_info = logging.DEBUG, None
        super().log(level, msg, *args, exc_info=exc_info, **kwargs)
