"""The OpenAPI 3.1 document of every REST route the Ingress serves (``GET /openapi.json``).

The event schema is the kernel's (``rtml.schemas.Event``, as pydantic writes its JSON Schema), so
the document cannot drift from what ``/v1/events`` validates with; the predict formats are those of
``deployments.wire`` (described here, since that module parses them by hand for speed). Routes are
relative to the app's route prefix, which the document's ``servers`` entry names.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import orjson

from api.tenancy import JWKS_PATH
from rtml.schemas import TENANT_PATTERN, Event
from rtml.settings import Settings

_REF_TEMPLATE = "#/components/schemas/{model}"


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


_TENANT_SCHEMA = {"type": "string", "pattern": TENANT_PATTERN, "minLength": 1, "maxLength": 64}
# Every route but the public ones takes a bearer token (security.tokens): the caller's tenant and role.
_BEARER = [{"bearerAuth": []}]
_UNAUTHORIZED = {
    "401": _error("No bearer token, or one that is not valid (expired, wrong issuer or audience, bad signature)."),
    "403": _error("The token's role may not do this, or the request names another tenant than the token's."),
}
_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "integer"}}}
_INGEST_RESPONSES = {
    "202": {
        "description": "At least one event was accepted; each accepted event is durable in the event log (or the events table).",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Ingested"}}},
    },
    "400": {
        "description": "No event was accepted (each rejected event's index and reason are listed), or the body is not JSON.",
        # anyOf, not oneOf: an Ingested answer with nothing accepted also carries an "error", so it is an Error too.
        "content": {"application/json": {"schema": {"anyOf": [{"$ref": "#/components/schemas/Ingested"}, {"$ref": "#/components/schemas/Error"}]}}},
    },
    **_UNAUTHORIZED,
    "413": _error("The body, or its number of events, is over the limit."),
    "415": _error("An unsupported content type."),
    "429": {**_error("The tenant is over its rate limit."), "headers": _RETRY_AFTER},
    "503": {**_error("The event log cannot take events right now."), "headers": _RETRY_AFTER},
}


@cache
def _document(route_prefix: str) -> bytes:
    event_schema = Event.model_json_schema(ref_template=_REF_TEMPLATE)
    components = {name: schema for name, schema in event_schema.pop("$defs", {}).items()}
    components["Event"] = event_schema
    components["Error"] = {
        "type": "object",
        "description": "Why a request was refused, in words a person can act on.",
        "properties": {"error": {"type": "string"}},
        "required": ["error"],
    }
    components["Ingested"] = {
        "type": "object",
        "description": "What an ingestion request did with each of its events.",
        "properties": {
            "accepted": {"type": "integer", "description": "Events accepted (durable when this is answered)."},
            "rejected": {
                "type": "array",
                "description": "Each rejected event, by its position in the request.",
                "items": {"type": "object", "properties": {"index": {"type": "integer"}, "reason": {"type": "string"}}, "required": ["index", "reason"]},
            },
            "event_ids": {"type": "array", "items": {"type": ["string", "null"]}, "description": "Per position: the id stored, null where rejected."},
            "error": {"type": "string"},
        },
        "required": ["accepted", "rejected", "event_ids"],
    }
    window = {"type": "array", "items": {"type": "number"}, "minItems": 1}
    components["PredictRequest"] = {
        "type": "object",
        "description": "One window (`window`) or a batch (`windows`) to score; see deployments/wire.py.",
        "properties": {
            "tenant": {**_TENANT_SCHEMA, "description": "Default: the token's tenant; another is refused (403)."},
            "data_type": {"type": "string", "enum": ["metric", "image"]},
            "window": window,
            "windows": {"type": "array", "items": window, "minItems": 1},
            "entity": {"type": "string"},
            "entities": {"type": "array", "items": {"type": "string"}},
            "event_id": {"type": "string"},
            "event_ids": {"type": "array", "items": {"type": "string"}},
            "event_time": {"type": "string", "format": "date-time"},
            "event_times": {"type": "array", "items": {"type": "string", "format": "date-time"}},
            "subject": {"type": "string"},
            "subjects": {"type": "array", "items": {"type": ["string", "null"]}},
        },
    }
    frame_headers = [
        {"name": "x-rtml-entity", "in": "header", "required": True, "description": "The series the frame belongs to.", "schema": {"type": "string"}},
        {"name": "x-rtml-event-time", "in": "header", "required": True, "description": "ISO 8601 time of the frame.", "schema": {"type": "string", "format": "date-time"}},
        {"name": "x-rtml-frame-shape", "in": "header", "required": True, "description": "Height and width, e.g. `28x28`.", "schema": {"type": "string", "pattern": r"^\d+x\d+$"}},
        {"name": "x-rtml-frame-dtype", "in": "header", "required": False, "description": "`uint8` (default, scaled to [0, 1]) or `float32`.", "schema": {"type": "string", "enum": ["uint8", "float32"]}},
        {"name": "x-rtml-data-type", "in": "header", "required": False, "description": "`image` (the default for frames).", "schema": {"type": "string", "enum": ["image"]}},
        {"name": "x-rtml-key", "in": "header", "required": False, "description": "The event id; retries with the same id are one event.", "schema": {"type": "string"}},
        {"name": "x-rtml-subject", "in": "header", "required": False, "description": "The data subject the frame is about.", "schema": {"type": "string"}},
    ]
    paths = {
        "/v1/events": {
            "post": {
                "summary": "Ingest events: one JSON object, a JSON array of them, or NDJSON (one per line).",
                "operationId": "ingestEvents",
                "security": _BEARER,
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": {"oneOf": [{"$ref": "#/components/schemas/Event"}, {"type": "array", "items": {"$ref": "#/components/schemas/Event"}}]}},
                        "application/x-ndjson": {"schema": {"type": "string", "description": "One event object per line."}},
                    },
                },
                "responses": _INGEST_RESPONSES,
            }
        },
        "/v1/events/binary": {
            "post": {
                "summary": "Ingest one binary frame (an image event); its fields travel in headers.",
                "operationId": "ingestFrame",
                "security": _BEARER,
                "parameters": frame_headers,
                "requestBody": {"required": True, "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
                "responses": _INGEST_RESPONSES,
            }
        },
        "/v1/predict": {
            "post": {
                "summary": "Score windows with the tenant's ensemble (JSON, .npy or Arrow IPC).",
                "operationId": "predict",
                "security": _BEARER,
                "parameters": [
                    {"name": "tenant", "in": "query", "required": False, "description": "The tenant (default: the token's; another is refused).", "schema": _TENANT_SCHEMA},
                    {"name": "data_type", "in": "query", "required": False, "schema": {"type": "string", "enum": ["metric", "image"]}},
                    {"name": "entity", "in": "query", "required": False, "schema": {"type": "string"}},
                ],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/PredictRequest"}},
                        "application/x-npy": {"schema": {"type": "string", "format": "binary"}},
                        "application/vnd.apache.arrow.stream": {"schema": {"type": "string", "format": "binary"}},
                    },
                },
                "responses": {
                    "200": {"description": "Per-model scores, the ensemble score and decision, model versions, weights and prediction ids.", "content": {"application/json": {"schema": {"type": "object"}}}},
                    "400": _error("The request is not a valid predict request."),
                    **_UNAUTHORIZED,
                    "404": _error("The tenant has no active model for the data type."),
                    "413": _error("Too many windows or too large a body."),
                    "415": _error("An unsupported content type."),
                    "422": _error("The windows do not have the shape the tenant's models take."),
                    "503": {**_error("The models are overloaded or the predictions cannot be stored right now."), "headers": _RETRY_AFTER},
                },
            }
        },
        "/graphql": {
            "post": {
                "summary": "The GraphQL API (also over WebSocket, graphql-transport-ws); `rtml api schema` prints its SDL.",
                "operationId": "graphql",
                "security": _BEARER,
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "properties": {"query": {"type": "string"}, "variables": {"type": ["object", "null"]}, "operationName": {"type": ["string", "null"]}},
                                "required": ["query"],
                            }
                        }
                    },
                },
                "responses": {
                    "200": {"description": "`data` and/or `errors` (each with `extensions.code`).", "content": {"application/json": {"schema": {"type": "object"}}}},
                    "400": {"description": "Not a GraphQL request, or one that does not validate.", "content": {"application/json": {"schema": {"type": "object"}}}},
                    "401": {"description": "No valid bearer token (UNAUTHENTICATED).", "content": {"application/json": {"schema": {"type": "object"}}}},
                    "403": {"description": "A field the token's role may not use (FORBIDDEN).", "content": {"application/json": {"schema": {"type": "object"}}}},
                },
            }
        },
        "/openapi.json": {"get": {"summary": "This document.", "operationId": "openapi", "responses": {"200": {"description": "OpenAPI 3.1", "content": {"application/json": {"schema": {"type": "object"}}}}}}},
        "/healthz": {
            "get": {
                "summary": "Whether the model router answers (and the app's stream lag).",
                "operationId": "health",
                "responses": {"200": {"description": "Healthy.", "content": {"application/json": {"schema": {"type": "object"}}}}, "503": _error("The router does not answer.")},
            }
        },
        JWKS_PATH: {
            "get": {
                "summary": "The public keys (JWKS) API tokens are verified with.",
                "operationId": "jwks",
                "responses": {"200": {"description": "A JSON Web Key Set.", "content": {"application/json": {"schema": {"type": "object"}}}}},
            }
        },
    }
    document = {
        "openapi": "3.1.0",
        "info": {"title": "rtml", "version": "1", "description": "Real-time ML serving: ingestion, scoring and the GraphQL API."},
        "servers": [{"url": route_prefix.rstrip("/") or "/"}],
        "paths": paths,
        "components": {"schemas": components, "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}}},
    }
    return orjson.dumps(document)


def openapi_document(settings: Settings) -> bytes:
    """The document as JSON bytes (built once per route prefix)."""
    return _document(settings.serving.route_prefix)
