"""``Ingress``: the HTTP face of the app (``POST /v1/predict``, ``GET /healthz``).

It parses a request into numpy windows once (``deployments.wire``), batches concurrent requests
with ``@serve.batch`` and sends each batch to the router in one call, so that the per-request cost
on the way to the models is one parse and a share of one handle call. Every answer is JSON.

Limits: a body beyond ``serving.max_request_bytes`` is a 413 (told by its Content-Length before it
is read, or as soon as it grows past the limit), as is a request beyond
``serving.max_request_windows``. Within them every request is answered: a batch too large for one
gRPC message goes to the router by reference (``deployments.calls.sized``).

Overload never hangs: past ``max_queued_requests`` Serve itself answers 503 with ``Retry-After``
(the deployment's back-pressure config), and a request that has waited ``request_timeout_s`` for
its scores gets a 503 with ``Retry-After`` too.
"""

from __future__ import annotations

import asyncio
import logging
import time

import numpy as np
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import Response

from deployments.calls import awaited, batch_size, call_with_retry, payload_bytes, sized
from deployments.wire import JSON, encode_refusal, encode_result, parse_predict
from rtml.schemas import Refusal, ScoreRequest, ScoreResult
from rtml.settings import ServingSettings

log = logging.getLogger(__name__)
INGRESS_CONCURRENT_BATCHES = 4
PREDICT = "/v1/predict"
HEALTHZ = "/healthz"
HEALTH_TIMEOUT_S = 5.0


@serve.deployment
class Ingress:
    def __init__(self, router: DeploymentHandle, settings: ServingSettings):
        self._router = router
        self._settings = settings
        self._score.set_max_batch_size(batch_size(settings, INGRESS_CONCURRENT_BATCHES))
        self._score.set_batch_wait_timeout_s(settings.batch_wait_timeout_s)

    async def __call__(self, request: Request) -> Response:
        path = request.url.path
        root = request.scope.get("root_path", "")  # the app's route prefix
        if root and path.startswith(root):
            path = path[len(root) :]
        path = path.rstrip("/") or "/"
        if path == PREDICT:
            return await self._predict(request) if request.method == "POST" else _refusal(Refusal(405, f"use POST {PREDICT}"))
        if path == HEALTHZ:
            return await self._health()
        return _refusal(Refusal(404, f"no such endpoint {path!r}; the endpoints are POST {PREDICT} and GET {HEALTHZ}"))

    async def _predict(self, request: Request) -> Response:
        received_at = time.time()
        try:
            score_request, shape = parse_predict(
                await self._body(request), request.headers.get("content-type", JSON), request.query_params, self._settings.max_request_windows
            )
        except Refusal as refusal:
            return _refusal(refusal)
        score_request.available_at = np.full(len(score_request), received_at)
        try:
            outcome = await asyncio.wait_for(self._score(score_request), self._settings.request_timeout_s)
        except (TimeoutError, BackPressureError):
            return _refusal(Refusal(503, "the models are overloaded; retry later", self._settings.retry_after_s))
        if isinstance(outcome, Refusal):
            return _refusal(outcome)
        return Response(encode_result(score_request, outcome, shape), media_type=JSON)

    async def _body(self, request: Request) -> bytes:
        limit = self._settings.max_request_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise Refusal(413, _too_large(f"{declared} bytes", limit))
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise Refusal(413, _too_large(f"more than {limit} bytes", limit))
            chunks.append(chunk)
        return b"".join(chunks)

    @serve.batch(max_concurrent_batches=INGRESS_CONCURRENT_BATCHES)
    async def _score(self, requests: list[ScoreRequest]) -> list[ScoreResult | Refusal]:
        router = sized(self._router, payload_bytes(requests))
        return await call_with_retry(lambda: awaited(router.score_many.remote(requests)))

    async def _health(self) -> Response:
        """200 when the router answers; 503 otherwise."""
        try:
            await asyncio.wait_for(awaited(self._router.health.remote()), HEALTH_TIMEOUT_S)
        except Exception as error:  # any failure to reach the router means "not healthy"
            log.warning("health check: the router does not answer: %s", error)
            return _refusal(Refusal(503, "the model router does not answer", self._settings.retry_after_s))
        return Response(b'{"status":"ok"}', media_type=JSON)


def _too_large(size: str, limit: int) -> str:
    return f"the request body has {size}; the limit is {limit} bytes (serving.max_request_bytes): split it into smaller requests"


def _refusal(refusal: Refusal) -> Response:
    headers = {"Retry-After": str(max(1, round(refusal.retry_after_s)))} if refusal.retry_after_s is not None else None
    return Response(encode_refusal(refusal), status_code=refusal.status, media_type=JSON, headers=headers)
