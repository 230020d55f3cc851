"""``Ingress``: the HTTP face of the app, one ASGI app per replica (Serve's ``@serve.ingress``,
built on the replica by ``__serve_build_asgi_app__``):

- ``POST /v1/predict``: scores windows (formats: ``deployments.wire``);
- ``POST /v1/events`` (JSON object, array or NDJSON) and ``POST /v1/events/binary`` (a raw frame,
  its fields in ``X-Rtml-*`` headers): ingestion into the event log or the ``events`` table
  (``api.ingest``); answered once what was accepted is durable;
- ``/graphql``: the GraphQL API over HTTP and WebSocket (``graphql-transport-ws``; ``api.graphql``);
- ``GET /openapi.json`` (``api.openapi``), ``GET /healthz`` and ``GET /.well-known/jwks.json`` (the
  public keys API tokens are verified with).

Every route but the last three is authenticated by a bearer token, in one place
(``api.tenancy.Authenticator``): none or an invalid one is a 401, a role that may not use the
route a 403 (predict and ingestion need ``writer``; GraphQL decides per field). The token's tenant
is the request's: events without a tenant get it, and an event or predict request naming another
is refused. Personal data in a request (entities, event ids, subjects, attributes) is replaced by
keyed tokens before anything else sees it (``api.ingest.PiiFirstHop``, ``security.pii``). Each
predict and ingestion request is recorded in the audit trail (``api.data``: who,
tenant, which ids, from where). Every answer is JSON; unknown routes and methods get a JSON
404/405, and nothing a client sends makes a 500.

Predict: a request is parsed into numpy windows once, concurrent requests are batched by
``@serve.batch`` and each batch goes to the router in one call, so that the per-request cost on
the way to the models is one parse and a share of one handle call.

Limits: a body beyond ``serving.max_request_bytes`` (predict), ``api.max_ingest_bytes`` (events)
or ``api.max_graphql_bytes`` (GraphQL) is a 413, told by its Content-Length before it is read or as
soon as it grows past the limit (``api.ingest.read_body``), as is a request beyond ``serving.max_request_windows`` / ``api.max_ingest_events``. Within
them every predict is answered: a batch too large for one gRPC message goes to the router by
reference (``deployments.calls.sized``). Events count against their tenant's rate limit
(``api.ratelimit``): a tenant over it gets a 429 with ``Retry-After``.

Overload never hangs: past ``max_queued_requests`` Serve itself answers 503 with ``Retry-After``
(the deployment's back-pressure config), and a request that has waited ``request_timeout_s`` for
its scores gets a 503 with ``Retry-After`` too.

Metrics: every HTTP answer of the app counts in ``rtml_api_requests_total`` by its route template
and status class (``CountedAnswers``; Serve's own 503s never reach the app), and ingestion counts
each event once, accepted or refused (``api.ingest``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

import numpy as np
import orjson
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.graphql import graphql_app
from api.ingest import Ingested, Ingestor, PiiFirstHop, counting_refusals, parse_json_body, read_body
from api.openapi import openapi_document
from api.ratelimit import TenantRateLimiter
from api.tenancy import JWKS_PATH, Authenticator, client_address, require
from deployments.calls import awaited, batch_size, call_with_retry, payload_bytes, sized
from deployments.wire import JSON, encode_refusal, encode_result, parse_predict
from observability import metrics, tracing
from rtml.errors import RtmlError
from rtml.schemas import Refusal, ScoreRequest, ScoreResult
from rtml.settings import Settings
from security.pii import redact_logs
from security.tokens import Principal, Role

if TYPE_CHECKING:
    from api.data import DataAccess

log = logging.getLogger(__name__)
INGRESS_CONCURRENT_BATCHES = 4
PREDICT = "/v1/predict"
EVENTS = "/v1/events"
BINARY_EVENTS = "/v1/events/binary"
GRAPHQL = "/graphql"
OPENAPI = "/openapi.json"
HEALTHZ = "/healthz"
ROUTES = (f"POST {PREDICT}", f"POST {EVENTS}", f"POST {BINARY_EVENTS}", f"GET|POST {GRAPHQL}", f"GET {OPENAPI}", f"GET {HEALTHZ}", f"GET {JWKS_PATH}")
HEALTH_TIMEOUT_S = 5.0
# HTTP headers that carry a binary event's fields (POST /v1/events/binary), by event field.
FRAME_HEADERS = {
    "data_type": "x-rtml-data-type",
    "entity": "x-rtml-entity",
    "event_id": "x-rtml-key",
    "event_time": "x-rtml-event-time",
    "subject": "x-rtml-subject",
    "attributes": "x-rtml-attributes",
    "frame_shape": "x-rtml-frame-shape",
    "frame_dtype": "x-rtml-frame-dtype",
}


@serve.deployment
@serve.ingress()
class Ingress:
    def __init__(self, router: DeploymentHandle, settings: Settings, stream: DeploymentHandle | None = None):
        tracing.configure(settings, "rtml-ingress")
        self._router = router
        self._stream = stream
        self._all_settings = settings
        self._settings = settings.serving
        self._score.set_max_batch_size(batch_size(self._settings, INGRESS_CONCURRENT_BATCHES))
        self._score.set_batch_wait_timeout_s(self._settings.batch_wait_timeout_s)
        self._ingestor: Ingestor | None = None  # opened on the first event: predict-only replicas never pay for it
        self._limiter = TenantRateLimiter(settings.api)
        self._authenticator = Authenticator(settings)
        self._pii = PiiFirstHop(settings)
        redact_logs(self._pii.tokenizer)
        self._access: DataAccess | None = None  # made with the ASGI app

    def __serve_build_asgi_app__(self) -> Starlette:
        """The routes of the module docstring; Serve calls it on the replica after ``__init__``."""
        from api.data import DataAccess
        from deployments.operations import AppOperations  # it reaches deployments.control, which imports this module's app
        from streaming.feed import open_feed

        settings = self._all_settings
        self._access = access = DataAccess(settings, AppOperations(self._router, settings), open_feed(settings), first_hop=self._pii)
        graphql = graphql_app(access, settings, self._authenticator)
        return ingress_app(
            [
                Route(PREDICT, self._predict, methods=["POST"]),
                Route(EVENTS, self._events, methods=["POST"]),
                Route(BINARY_EVENTS, self._binary_events, methods=["POST"]),
                Route(OPENAPI, self._openapi, methods=["GET"]),
                Route(HEALTHZ, self._health, methods=["GET"]),
                Route(JWKS_PATH, self._jwks, methods=["GET"]),
                Route(GRAPHQL, graphql, methods=["GET", "POST"]),
                WebSocketRoute(GRAPHQL, graphql),
            ]
        )

    def _caller(self, request: Request, needed: Role, what: str) -> Principal:
        principal = self._authenticator.caller(request.headers)
        require(principal, needed, what)
        return principal

    def _audited(self, request: Request, principal: Principal, action: str, table: str, ids: list, row_count: int) -> None:
        if self._access is not None:
            self._access.scoped(principal, client_address(request)).record_access(action, table, [i for i in ids if i is not None], row_count)

    async def _predict(self, request: Request) -> Response:
        received_at = time.time()
        principal = self._caller(request, Role.WRITER, "predicting")
        body = await read_body(request, self._settings.max_request_bytes, "serving.max_request_bytes")
        query = {"tenant": principal.tenant, **request.query_params}
        score_request, shape = parse_predict(body, request.headers.get("content-type", JSON), query, self._settings.max_request_windows)
        if score_request.tenant != principal.tenant:
            raise Refusal(403, f"the request names tenant {score_request.tenant!r}; this token acts for {principal.tenant!r}")
        if score_request.entities is not None or score_request.event_ids is not None or score_request.subjects is not None:
            score_request = await asyncio.to_thread(self._pii.score_request, score_request)
        score_request.available_at = np.full(len(score_request), received_at)
        try:
            outcome = await asyncio.wait_for(self._score(score_request), self._settings.request_timeout_s)
        except (TimeoutError, BackPressureError):
            return _refusal(Refusal(503, "the models are overloaded; retry later", self._settings.retry_after_s))
        if isinstance(outcome, Refusal):
            return _refusal(outcome)
        self._audited(request, principal, "predict", "predictions", list(outcome.prediction_ids), len(score_request))
        return Response(encode_result(score_request, outcome, shape), media_type=JSON)

    @serve.batch(max_concurrent_batches=INGRESS_CONCURRENT_BATCHES)
    async def _score(self, requests: list[ScoreRequest]) -> list[ScoreResult | Refusal]:
        router = sized(self._router, payload_bytes(requests))
        return await call_with_retry(lambda: awaited(router.score_many.remote(requests)))

    async def _events(self, request: Request) -> Response:
        principal = self._caller(request, Role.WRITER, "ingesting events")
        tenant = principal.tenant
        limits = self._all_settings.api
        documents = parse_json_body(await read_body(request, limits.max_ingest_bytes, "api.max_ingest_bytes"), request.headers.get("content-type", JSON))
        with counting_refusals(tenant, len(documents)):
            if len(documents) > limits.max_ingest_events:
                raise Refusal(413, f"{len(documents)} events in one request; the limit is {limits.max_ingest_events} (api.max_ingest_events): split the batch")
            await self._limiter.take(tenant, len(documents))
            ingested = await asyncio.to_thread(self._ingest().ingest_documents, tenant, documents)
        self._audited(request, principal, "ingest", "events", ingested.event_ids, ingested.accepted)
        return _ingested(ingested)

    async def _binary_events(self, request: Request) -> Response:
        principal = self._caller(request, Role.WRITER, "ingesting events")
        tenant = principal.tenant
        fields = {name: request.headers[header] for name, header in FRAME_HEADERS.items() if header in request.headers}
        with counting_refusals(tenant, 1):
            frame = await read_body(request, self._all_settings.api.max_ingest_bytes, "api.max_ingest_bytes")
            await self._limiter.take(tenant, 1)
            ingested = await asyncio.to_thread(self._ingest().ingest_frame, tenant, fields, frame)
        self._audited(request, principal, "ingest", "events", ingested.event_ids, ingested.accepted)
        return _ingested(ingested)

    def _ingest(self) -> Ingestor:
        if self._ingestor is None:
            try:
                self._ingestor = Ingestor.open(self._all_settings, self._pii)  # one tokenizer per replica: an erasure empties its caches
            except RtmlError as error:  # an event log that cannot be opened now; the reason is the operator's
                log.error("cannot open the event log: %s", error)
                raise Refusal(503, "the event log cannot take events right now; retry later", self._settings.retry_after_s) from None
        return self._ingestor

    async def _jwks(self, request: Request) -> Response:
        return Response(orjson.dumps(self._authenticator.jwks()), media_type=JSON)

    async def _openapi(self, request: Request) -> Response:
        return Response(openapi_document(self._all_settings), media_type=JSON)

    async def _health(self, request: Request) -> Response:
        """200 when the router answers, with the app's stream's lag in events (when it runs); 503
        otherwise."""
        try:
            await asyncio.wait_for(awaited(self._router.health.remote()), HEALTH_TIMEOUT_S)
        except Exception as error:  # any failure to reach the router means "not healthy"
            log.warning("health check: the router does not answer: %s", error)
            return _refusal(Refusal(503, "the model router does not answer", self._settings.retry_after_s))
        document: dict = {"status": "ok"}
        if self._stream is not None:
            try:
                partitions = await asyncio.wait_for(awaited(self._stream.progress.remote()), HEALTH_TIMEOUT_S)
                document["stream_lag_events"] = sum(max(0, end - durable) for durable, end in partitions.values())
            except Exception as error:  # the stream is being restarted: the API still answers
                document["stream"] = f"not answering ({type(error).__name__})"
        return Response(orjson.dumps(document), media_type=JSON)


def ingress_app(routes: list[BaseRoute]) -> Starlette:
    """The Ingress's ASGI app over ``routes``: refusals and Starlette's own HTTP errors answered as
    JSON, every HTTP answer counted (``CountedAnswers``)."""
    return Starlette(
        routes=routes,
        exception_handlers={HTTPException: _http_error, Refusal: _refused},
        middleware=[Middleware(CountedAnswers)],
    )


class CountedAnswers:
    """ASGI middleware: counts each HTTP answer in ``rtml_api_requests_total`` by the template of
    the route that took the request (``UNMATCHED`` when none did: never the raw path, which may
    hold ids) and its status class (``2xx``, ``4xx``, ...). An exception that escapes the app
    before an answer started counts as the 500 Starlette then answers."""

    UNMATCHED = "unmatched"

    def __init__(self, app: ASGIApp):
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        status = 500

        async def answering(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self._app(scope, receive, answering)
        finally:
            route = scope.get("route")  # set by Starlette's router on the scope it was handed
            metrics.API_REQUESTS.labels(route=getattr(route, "path", self.UNMATCHED), status=f"{status // 100}xx").inc()


def _ingested(ingested: Ingested) -> Response:
    """202 with what was accepted and each rejected event's index and reason; 400 when nothing was."""
    document = {
        "accepted": ingested.accepted,
        "rejected": [{"index": rejected.index, "reason": rejected.reason} for rejected in ingested.rejected],
        "event_ids": ingested.event_ids,
    }
    if not ingested.accepted:
        document["error"] = "no event was accepted; see 'rejected' for each event's reason"
    return Response(orjson.dumps(document), status_code=202 if ingested.accepted else 400, media_type=JSON)


async def _refused(request: Request, refusal: Refusal) -> Response:
    return _refusal(refusal)


async def _http_error(request: Request, error: HTTPException) -> Response:
    """Starlette's own 404/405 (and other HTTP errors) as JSON refusals naming the routes."""
    if error.status_code == 404:
        reason = f"no such endpoint {request.url.path!r}; the endpoints are {', '.join(ROUTES)} (see {OPENAPI})"
    elif error.status_code == 405:
        reason = f"{request.method} is not allowed on {request.url.path!r}; see {OPENAPI}"
    else:
        reason = str(error.detail)
    return _refusal(Refusal(error.status_code, reason))


def _refusal(refusal: Refusal) -> Response:
    headers = {"Retry-After": str(max(1, round(refusal.retry_after_s)))} if refusal.retry_after_s is not None else None
    return Response(encode_refusal(refusal), status_code=refusal.status, media_type=JSON, headers=headers)
