"""Fuzzing the API of the Serve app on the session's local Ray cluster: Schemathesis against
``/openapi.json`` (every REST route) and in its GraphQL mode against ``/graphql``, then hypothesis
fuzz over plain httpx: malformed JSON, random JSON values, oversized bodies, deeply nested
documents, NDJSON with bad lines, binary frames with bad headers, huge/deep/malformed GraphQL.

The bar (issue 11): no 5xx, no crash, no hang. Every answer is a 2xx or 4xx with a JSON body,
every request returns within ``REQUEST_TIMEOUT_S`` (a timeout fails the test), no GraphQL answer
carries an INTERNAL error (an unexpected exception on the server); afterwards ``/healthz`` still
answers 200 and a good event is still accepted and scored by the app's stream.

The app runs with real trained models, its stream on, small body limits (so oversized bodies stay
small) and a tenant with a tight rate limit (so 429s are part of what is checked). Every run is
derandomized: CI sees the same examples each time.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import httpx
import orjson
import pytest
import schemathesis
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from deployments import control
from deployments.demo_models import sensor_series, train_and_register
from rtml.settings import Settings
from test_serving_deploy import _free_ports
from tests.auth import auth_headers

pytestmark = pytest.mark.timeout(900)
TENANT = "acme"  # has models
LIMITED = "limited"  # a burst of 20 events, then 429s for the rest of the module
WINDOW_LENGTH = 16
BODY_LIMIT = 64 * 1024  # api.max_ingest_bytes and serving.max_request_bytes here
# The longest any one request may take before it counts as a hang; generous for a busy 2-core machine.
REQUEST_TIMEOUT_S = 30.0
WAIT_S = 180.0
NESTING = 10_000
START = datetime(2026, 3, 1, tzinfo=timezone.utc)
# Bounded and reproducible: few examples per operation, no per-example deadline (a 2-core machine
# under a Ray cluster is slow at times), the same examples on every run.
FUZZ = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)


@dataclass
class App:
    settings: Settings
    url: str
    client: httpx.Client


@pytest.fixture(scope="module")
def app(ray_cluster, tmp_path_factory) -> App:
    from ray import serve

    from lakehouse import Lakehouse

    home = tmp_path_factory.mktemp("fuzz")
    settings = Settings(
        home=home,
        # Nothing here explains anomalies: the app starts without the agent graph's three replicas.
        agents={"enabled": False},
        models={"window_length": WINDOW_LENGTH},
        streaming={"consumers": 1},
        serving={
            "app_name": "rtml-fuzz",
            "route_prefix": "/rtml-fuzz",
            "http_port": _free_ports(1)[0],
            "model_kinds": ["rnn", "cnn"],
            "registry_refresh_s": 2.0,
            "max_request_bytes": BODY_LIMIT,
        },
        api={
            "max_ingest_bytes": BODY_LIMIT,
            "max_graphql_bytes": BODY_LIMIT,
            # A window of 2,000 s: within the module the limited tenant never gets tokens back.
            "rate_limits": {LIMITED: {"events_per_second": 0.01, "burst": 20}},
        },
    )
    lake = Lakehouse.open(settings)
    for tenant in (TENANT, LIMITED):
        for kind in ("rnn", "cnn"):
            train_and_register(lake, tenant, kind, home / "models", window_length=WINDOW_LENGTH)
    control.deploy(settings)
    with httpx.Client(timeout=REQUEST_TIMEOUT_S) as client:
        yield App(settings, f"{control.http_address()}/rtml-fuzz", client)
    serve.delete(settings.serving.app_name)


def answered(response: httpx.Response) -> object:
    """The JSON body of a fuzzed request's answer, which must be a 2xx or 4xx."""
    assert response.status_code < 500, f"{response.request.method} {response.request.url.path} answered {response.status_code}: {response.text[:500]}"
    assert 200 <= response.status_code, response.status_code
    assert response.headers.get("content-type", "").startswith("application/json"), (response.status_code, response.headers.get("content-type"), response.text[:200])
    return response.json()


def post(app: App, path: str, body: bytes, content_type: str | None = "application/json", tenant: str = TENANT, **headers: str) -> object:
    """POST ``body`` and check the answer (``answered``); an httpx timeout fails the test as a hang."""
    sent = {**auth_headers(app.settings, tenant), **headers}
    if content_type is not None:
        sent["content-type"] = content_type
    return answered(app.client.post(f"{app.url}{path}", content=body, headers=sent))


def graphql_errors(document: object) -> list[dict]:
    """The errors of a GraphQL answer, none of them INTERNAL (an unexpected exception on the server)."""
    errors = document.get("errors") or [] if isinstance(document, dict) else []
    internal = [error for error in errors if (error.get("extensions") or {}).get("code") == "INTERNAL"]
    assert not internal, internal
    return errors


# --- Schemathesis -----------------------------------------------------------------------------


@pytest.fixture(scope="module", params=[TENANT, LIMITED])
def openapi(app, request):
    """The app's OpenAPI document, its requests sent as one tenant: one with models, and the
    limited one (whose ingestion soon gets 429s)."""
    schema = schemathesis.openapi.from_url(f"{app.url}/openapi.json", timeout=REQUEST_TIMEOUT_S)
    schema.config.update(base_url=app.url, headers=auth_headers(app.settings, request.param))
    return schema


@pytest.fixture(scope="module")
def graphql(app):
    headers = auth_headers(app.settings, TENANT)
    schema = schemathesis.graphql.from_url(f"{app.url}/graphql", timeout=REQUEST_TIMEOUT_S, headers=headers)
    schema.config.update(headers=headers)
    return schema


OPENAPI_CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance, response_schema_conformance]


def fuzz_operations(schema, subtests, examples: int, check) -> None:
    """``check`` each of ``examples`` cases per operation of ``schema``, valid and invalid ones
    alike, each operation a subtest (so that one failing operation does not hide another's).
    The schemas come from fixtures (the app's URL is known only once it runs), so the cases are
    drawn by hypothesis here, from Schemathesis's strategies, rather than by its pytest plugin."""
    for result in schema.get_all_operations():
        operation = result.ok()

        @settings(FUZZ, max_examples=examples)
        @given(case=st.one_of([operation.as_strategy(generation_mode=mode) for mode in GenerationMode]))
        def fuzz(case):
            check(case)

        with subtests.test(operation=operation.label):
            fuzz()


def test_every_rest_operation_answers_as_documented(openapi, subtests):
    """No 5xx, and status, content type, headers and body as /openapi.json documents them."""
    fuzz_operations(openapi, subtests, 25, lambda case: case.call_and_validate(checks=OPENAPI_CHECKS, timeout=REQUEST_TIMEOUT_S))


def test_every_graphql_operation_answers_without_a_server_error(graphql, subtests):
    """No 5xx and no INTERNAL error for any query, mutation or subscription the schema allows."""

    def check(case):
        response = case.call(timeout=REQUEST_TIMEOUT_S)
        assert response.status_code < 500, (case.body, response.status_code, response.text[:500])
        graphql_errors(response.json())

    fuzz_operations(graphql, subtests, 10, check)


# --- hypothesis over httpx --------------------------------------------------------------------

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5), max_leaves=25)
times = st.datetimes(min_value=datetime(1970, 1, 2), max_value=datetime(2100, 1, 1)).map(lambda moment: moment.isoformat()) | json_values
# Events that are often valid or nearly so: each field a plausible value or a random JSON one.
events = st.fixed_dictionaries(
    {},
    optional={
        "event_id": st.text(min_size=1, max_size=10) | json_values,
        "tenant": st.sampled_from([TENANT, "someone-else"]) | json_values,
        "entity": st.sampled_from(["pump-1", "pump-2"]) | json_values,
        "data_type": st.sampled_from(["metric", "image", "record"]) | json_values,
        "event_time": times,
        "value": st.floats(allow_nan=False, allow_infinity=False) | json_values,
        "attributes": st.dictionaries(st.text(max_size=8), json_values, max_size=4) | json_values,
        "subject": st.text(max_size=10) | json_values,
        "extra": json_values,
    },
)
header_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)
NDJSON = "application/x-ndjson"


def dumps(value: object) -> bytes:
    """JSON of generated values with the standard library: orjson does not write integers beyond 64 bits."""
    return json.dumps(value).encode()


def nested(opening: bytes, closing: bytes, depth: int, inner: bytes = b"1") -> bytes:
    return opening * depth + inner + closing * depth


def deep_object(depth: int) -> dict:
    document: dict = {}
    level = document
    for _ in range(depth):
        level["a"] = {}
        level = level["a"]
    return document


def good_event(entity: str, minute: int, value: float) -> dict:
    return {"event_id": f"{entity}-{minute}", "entity": entity, "event_time": (START + timedelta(minutes=minute)).isoformat(), "value": value}


@FUZZ
@given(body=st.binary(max_size=2000) | json_values.map(lambda value: dumps(value)[:-1]))
def test_malformed_json_bodies(app, body):
    for path in ("/v1/events", "/v1/predict"):
        post(app, path, body)
    post(app, "/v1/events", body, NDJSON)


@FUZZ
@given(document=json_values)
def test_random_json_values(app, document):
    body = dumps(document)
    for path in ("/v1/events", "/v1/predict"):
        post(app, path, body)
    graphql_errors(post(app, "/graphql", body))


@FUZZ
@given(batch=st.lists(events, max_size=20) | events)
@example(batch=[{**good_event("pump-1", 0, 1.0), "attributes": {"big": 2**70}}])
@example(batch=[{**good_event("pump-1", 1, 1.0), "attributes": deep_object(300)}])
@example(batch=[{**good_event("pump-1", 2, 1.0), "data_type": "record", "attributes": deep_object(300)}])
def test_event_batches_with_bad_events(app, batch):
    answer = post(app, "/v1/events", dumps(batch))
    assert set(answer) >= {"accepted", "rejected", "event_ids"}, answer


@FUZZ
@given(lines=st.lists(events.map(dumps) | st.binary(max_size=50).filter(lambda line: b"\n" not in line and b"\r" not in line), max_size=20))
def test_ndjson_with_bad_lines(app, lines):
    body = b"\n".join(lines)
    if body.strip():
        answer = post(app, "/v1/events", body, NDJSON)
        assert len(answer["event_ids"]) == len([line for line in body.splitlines() if line.strip()]), answer


@FUZZ
@given(
    fields=st.fixed_dictionaries(
        {},
        optional={
            "x-rtml-entity": st.just("cam-1") | header_text,
            "x-rtml-event-time": st.just(START.isoformat()) | header_text,
            "x-rtml-frame-shape": st.sampled_from(["4x4", "2,8", "[4, 4]", "0x0", "-1x16", "99999999999x99999999999"]) | header_text,
            "x-rtml-frame-dtype": st.sampled_from(["uint8", "float32", "int64"]) | header_text,
            "x-rtml-data-type": st.sampled_from(["image", "record", "metric"]) | header_text,
            "x-rtml-key": header_text,
            "x-rtml-subject": header_text,
            "x-rtml-attributes": header_text,
        },
    ),
    frame=st.binary(max_size=300),
)
@example(fields={"x-rtml-entity": "cam-1", "x-rtml-event-time": START.isoformat(), "x-rtml-frame-shape": "2x2", "x-rtml-frame-dtype": "float32"}, frame=b"\x00" * 15)
def test_binary_frames_with_bad_headers(app, fields, frame):
    post(app, "/v1/events/binary", frame, "application/octet-stream", **fields)


@FUZZ
@given(
    content_type=st.sampled_from(["application/json", "application/x-npy", "application/vnd.apache.arrow.stream", "text/plain", ""]),
    body=st.binary(max_size=500)
    | st.fixed_dictionaries({"tenant": st.just(TENANT)}, optional={"window": json_values, "windows": json_values, "entity": json_values, "event_times": json_values}).map(dumps),
)
def test_predict_with_bad_bodies(app, content_type, body):
    post(app, "/v1/predict", body, content_type)


GRAPHQL_FRAGMENTS = ["{", "}", "(", ")", "[", "]", "...", "$x", ":", "@", "!", "=", '"', '"""', "#", "query", "mutation", "subscription", "fragment", "on", "predictions", "anomalies", "edges", "node", "first: 10", "first: -1", "first: 99999999999", "__typename", "__schema", "\n", " "]


@FUZZ
@given(
    query=st.lists(st.sampled_from(GRAPHQL_FRAGMENTS), max_size=40).map(" ".join) | st.text(max_size=200) | json_values,
    variables=json_values,
    operation=json_values,
)
def test_malformed_graphql_documents(app, query, variables, operation):
    for document in ({"query": query}, {"query": query, "variables": variables, "operationName": operation}):
        graphql_errors(post(app, "/graphql", dumps(document)))
    if isinstance(query, str) and query.strip():
        answer = app.client.get(f"{app.url}/graphql", params={"query": query, "variables": dumps(variables).decode()}, headers=auth_headers(app.settings, TENANT))
        graphql_errors(answered(answer))


def _deep(kind: str) -> bytes:
    return nested(b"[", b"]", NESTING) if kind == "array" else nested(b'{"a":', b"}", NESTING)


@pytest.mark.parametrize("kind", ["array", "object"])
@pytest.mark.parametrize(
    "path, content_type",
    [("/v1/events", "application/json"), ("/v1/events", NDJSON), ("/v1/predict", "application/json"), ("/graphql", "application/json")],
)
def test_deeply_nested_json_documents(app, path, content_type, kind):
    post(app, path, _deep(kind), content_type)


def test_deeply_nested_values_inside_good_documents(app):
    event = {**good_event("pump-1", 3, 1.0), "attributes": orjson.Fragment(_deep("object"))}
    post(app, "/v1/events", orjson.dumps([event]))
    post(app, "/v1/predict", b'{"tenant": "acme", "window": ' + _deep("array") + b"}")
    graphql_errors(post(app, "/graphql", b'{"query": "{ __typename }", "variables": ' + _deep("object") + b"}"))
    answer = app.client.get(f"{app.url}/graphql", params={"query": "{ __typename }", "variables": _deep("array").decode()}, headers=auth_headers(app.settings, TENANT))
    graphql_errors(answered(answer))


@pytest.mark.parametrize("depth", [20, 1_000, NESTING])
def test_deeply_nested_graphql_documents(app, depth):
    selection = "{ predictions { edges { node { " * depth + "predictionId" + " } } }" * depth
    graphql_errors(post(app, "/graphql", orjson.dumps({"query": "{ __typename " + selection + " }"})))
    value = "[" * depth + "]" * depth
    graphql_errors(post(app, "/graphql", orjson.dumps({"query": f"{{ predictions(entity: {value}) {{ edges {{ cursor }} }} }}"})))


def test_huge_graphql_documents(app):
    """Just within the body limit: a document of many cheap fields, of many aliases of a paginated
    one, and one long string; each is answered (refused or run), none hangs."""
    budget = BODY_LIMIT - 200
    fields = "{ " + "__typename " * (budget // len("__typename ")) + "}"
    aliases = "{ " + " ".join(f"a{i}: predictions(first: 1) {{ edges {{ cursor }} }}" for i in range(budget // 60)) + " }"
    string = '{ predictions(entity: "' + "x" * budget + '") { edges { cursor } } }'
    for query in (fields, aliases, string):
        graphql_errors(post(app, "/graphql", orjson.dumps({"query": query})))


@pytest.mark.parametrize("path", ["/v1/events", "/v1/events/binary", "/v1/predict", "/graphql"])
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_oversized_bodies_are_refused_with_413(app, path, framing):
    body = b"[" + b" " * BODY_LIMIT + b"]"
    content = body if framing == "content-length" else iter([body[: BODY_LIMIT // 2], body[BODY_LIMIT // 2 :]])
    content_type = "application/octet-stream" if path.endswith("binary") else "application/json"
    response = app.client.post(f"{app.url}{path}", content=content, headers={**auth_headers(app.settings, TENANT), "content-type": content_type})
    answered(response)
    assert response.status_code == 413, response.text


def test_the_limited_tenant_is_answered_429_with_retry_after(app):
    for minute in range(25):
        response = app.client.post(f"{app.url}/v1/events", content=orjson.dumps([good_event("meter-1", minute, 1.0)]), headers={**auth_headers(app.settings, LIMITED), "content-type": "application/json"})
        answered(response)
        if response.status_code == 429:
            break
    assert response.status_code == 429, "the limited tenant's burst of 20 events never ran out"
    assert int(response.headers["retry-after"]) >= 1 and "rate limit" in response.json()["error"]


def test_after_the_fuzz_the_app_is_healthy_and_still_scores_a_good_event(app):
    health = app.client.get(f"{app.url}/healthz")
    assert health.status_code == 200, health.text
    series = sensor_series(count=1, length=3, seed=11)[0]
    sent = [good_event("after-fuzz", minute, float(value)) for minute, value in enumerate(series)]
    answer = post(app, "/v1/events", orjson.dumps(sent))
    assert answer["accepted"] == len(sent) and answer["rejected"] == [], answer
    query = '{ predictions(entity: "after-fuzz", first: 10) { edges { node { eventId } } } }'
    deadline = time.monotonic() + WAIT_S
    while True:
        document = post(app, "/graphql", orjson.dumps({"query": query}))
        assert not graphql_errors(document), document
        found = {edge["node"]["eventId"] for edge in document["data"]["predictions"]["edges"]}
        if found == {event["event_id"] for event in sent}:
            break
        assert time.monotonic() < deadline, f"after {WAIT_S:.0f}s the stream scored {sorted(found)} of {[e['event_id'] for e in sent]}"
        time.sleep(1.0)
