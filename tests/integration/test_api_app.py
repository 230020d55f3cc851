"""The API on the app as `rtml up` runs it (its own Ray cluster, Serve's throughput mode, HAProxy in
front, two Ingress replicas sharing rate limits in the real Redis), driven by real HTTP and
WebSocket clients: httpx, a Python graphql-transport-ws client over `websockets`, and the npm
`graphql-ws` client the dashboard's Apollo Client uses.

Events POSTed to /v1/events go into the embedded event log, the app's stream scores them, and
GraphQL reads the predictions back; the subscription receives an anomaly of a replayed stream, and
the agent graph's enrichment of it.
Waits are bounded polls (a busy 2-core machine), never assertions on speed."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest
import websockets

from deployments.demo_models import sensor_series
from rtml_up import rtml_up

pytestmark = pytest.mark.timeout(900)
TENANT = "demo"  # `rtml up` trains and promotes its models
# Rate-limit counters live in the shared Redis for the window (1,000 s): a tenant of its own per run.
LIMITED = f"limited-{uuid.uuid4().hex[:8]}"
DRIFTING = "drifting"  # a tenant whose live values leave its training distribution (test_prometheus_*)
WINDOW_LENGTH = 16
JS_CLIENTS = Path(__file__).resolve().parents[1] / "js"
WAIT_S = 180.0
START = datetime(2026, 3, 1, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def app(tmp_path_factory, redis_url, prometheus_url):
    from cluster import services

    env = {
        # `rtml up` registers the cluster with the services' Prometheus (test_prometheus_*).
        "RTML_OBSERVABILITY__PROMETHEUS_SD_DIR": str(services.get("prometheus").targets_dir),
        "RTML_MODELS__WINDOW_LENGTH": str(WINDOW_LENGTH),
        "RTML_SERVING__MODEL_KINDS": '["rnn", "cnn"]',
        "RTML_SERVING__INGRESS_REPLICAS": "2",
        "RTML_SERVING__REGISTRY_REFRESH_S": "2",
        "RTML_STREAMING__CONSUMERS": "1",
        # Drift is checked on small windows, so that the few hundred events test_prometheus_* sends suffice.
        "RTML_OBSERVABILITY__DRIFT_WINDOW_EVENTS": "200",
        "RTML_OBSERVABILITY__DRIFT_MIN_EVENTS": "100",
        "RTML_API__RATE_LIMIT_STORAGE": redis_url,
        # A window of 1,000 s: the test never sees it roll over, so the count is exact.
        "RTML_API__RATE_LIMITS": json.dumps({LIMITED: {"events_per_second": 0.01, "burst": 10}}),
    }
    with rtml_up(tmp_path_factory.mktemp("api"), env=env) as cluster:
        assert "/graphql" in cluster.up_output
        registered = Path(cluster.up_output.split("Prometheus scrapes the cluster: ", 1)[1].split()[0])
        try:
            yield cluster
        finally:
            registered.unlink(missing_ok=True)


def _events(entity: str, values, start: datetime = START, **extra) -> list[dict]:
    return [
        {"event_id": f"{entity}-{i}", "entity": entity, "event_time": (start + timedelta(minutes=i)).isoformat(), "value": float(v), **extra}
        for i, v in enumerate(values)
    ]


def _post(app, events, tenant: str = TENANT, content_type: str = "application/json") -> httpx.Response:
    body = orjson.dumps(events) if content_type == "application/json" else b"\n".join(orjson.dumps(e) for e in events)
    return httpx.post(f"{app.http}/v1/events", content=body, headers={"content-type": content_type, **app.auth(tenant, "writer")}, timeout=60)


def _graphql(app, query: str, variables: dict | None = None, tenant: str = TENANT) -> dict:
    answer = httpx.post(f"{app.http}/graphql", json={"query": query, "variables": variables}, headers=app.auth(tenant), timeout=60)
    assert answer.status_code == 200, answer.text
    result = answer.json()
    assert not result.get("errors"), result["errors"]
    return result["data"]


PREDICTIONS = """query($entity: String, $asOf: DateTime) {
  predictions(entity: $entity, first: 500, asOf: $asOf) { edges { node { predictionId eventId isAnomaly } } }
}"""


def _predicted(app, entity: str, as_of: str | None = None) -> dict[str, dict]:
    edges = _graphql(app, PREDICTIONS, {"entity": entity, "asOf": as_of})["predictions"]["edges"]
    return {edge["node"]["eventId"]: edge["node"] for edge in edges}


def _wait_for_predictions(app, entity: str, event_ids: set[str]) -> dict[str, dict]:
    deadline = time.monotonic() + WAIT_S
    while not event_ids <= (found := _predicted(app, entity)).keys():
        assert time.monotonic() < deadline, f"after {WAIT_S:.0f}s, {len(event_ids - found.keys())} of {len(event_ids)} events have no prediction"
        time.sleep(1.0)
    return found


def test_an_event_posted_is_readable_via_graphql_as_a_prediction_and_history_keeps_the_earlier_state(app):
    series = sensor_series(count=1, length=60, seed=3)[0]
    first = _events("pump-1", series[:40])
    answer = _post(app, first)
    assert answer.status_code == 202, answer.text
    assert answer.json()["accepted"] == 40 and answer.json()["rejected"] == []
    # Every reading is scored (the first ones on what the series has so far).
    scored = {event["event_id"] for event in first}
    found = _wait_for_predictions(app, "pump-1", scored)
    assert set(found) == scored
    before = datetime.now(timezone.utc).isoformat()

    # NDJSON, continuing the series; then the state before it is still what time travel reads.
    later = _events("pump-1", series[40:], start=START + timedelta(minutes=40))
    for position, event in enumerate(later):
        event["event_id"] = f"pump-1-{40 + position}"
    assert _post(app, later, content_type="application/x-ndjson").status_code == 202
    _wait_for_predictions(app, "pump-1", scored | {event["event_id"] for event in later})
    assert set(_predicted(app, "pump-1", as_of=before)) == scored


def test_a_batch_with_bad_events_keeps_the_good_ones(app):
    events = _events("pump-2", sensor_series(count=1, length=24, seed=4)[0])
    events[3] = {**events[3], "value": "high"}  # not a number
    events[7] = {"event_id": "pump-2-7", "entity": "pump-2", "value": 1.0}  # no event time
    events[9] = {**events[9], "tenant": "someone-else"}  # another tenant's event
    answer = _post(app, events)
    assert answer.status_code == 202, answer.text
    body = answer.json()
    assert body["accepted"] == 21
    rejected = {item["index"]: item["reason"] for item in body["rejected"]}
    assert set(rejected) == {3, 7, 9}
    assert "value" in rejected[3] and "event_time" in rejected[7] and "someone-else" in rejected[9]
    # The good ones go on, and only they.
    good = {event["event_id"] for position, event in enumerate(events) if position not in (3, 7, 9)}
    assert set(_wait_for_predictions(app, "pump-2", good)) == good

    nothing_good = _post(app, [{"entity": "pump-2"}, "not an event"])
    assert nothing_good.status_code == 400
    assert [item["index"] for item in nothing_good.json()["rejected"]] == [0, 1]


def test_a_tenant_over_its_limit_gets_429_across_ingress_replicas(app):
    answers = [_post(app, _events(f"meter-{i}", [1.0, 2.0]), tenant=LIMITED) for i in range(12)]
    statuses = [answer.status_code for answer in answers]
    # Its burst of 10 events is counted once in Redis, whichever of the two replicas took a request.
    assert statuses == [202] * 5 + [429] * 7, statuses
    assert all(int(answer.headers["retry-after"]) >= 1 for answer in answers[5:])
    assert "rate limit" in answers[-1].json()["error"]
    # Other tenants are not affected.
    assert _post(app, _events("pump-3", [1.0])).status_code == 202


def test_feedback_changes_the_weights_the_models_query_reports(app):
    found = _wait_for_predictions(app, "pump-1", {"pump-1-0"})
    prediction = next(iter(found.values()))
    ensemble = "{ ensemble { members { model weight } } }"
    before = {m["model"]: m["weight"] for m in _graphql(app, ensemble)["ensemble"]["members"]}
    verdict = not prediction["isAnomaly"]  # the ensemble was wrong: the models that said so lose weight
    mutation = "mutation($id: ID!, $verdict: Boolean!) { submitFeedback(verdicts: [{predictionId: $id, isAnomaly: $verdict}]) { error weights { model weight } } }"
    [result] = _graphql(app, mutation, {"id": prediction["predictionId"], "verdict": verdict})["submitFeedback"]
    assert result["error"] is None
    returned = {w["model"]: w["weight"] for w in result["weights"]}
    assert set(returned) == set(before) and returned != before
    after = {m["model"]: m["weight"] for m in _graphql(app, ensemble)["ensemble"]["members"]}
    assert after == pytest.approx(returned)


async def _python_subscription(url: str, token_payload: dict, query: str, received: list, ready: asyncio.Event) -> None:
    """A graphql-transport-ws client: connection_init with the bearer token, one subscribe, every `next`."""
    async with websockets.connect(url, subprotocols=["graphql-transport-ws"]) as socket:
        await socket.send(json.dumps({"type": "connection_init", "payload": token_payload}))
        assert json.loads(await socket.recv())["type"] == "connection_ack"
        await socket.send(json.dumps({"id": "1", "type": "subscribe", "payload": {"query": query}}))
        ready.set()
        async for message in socket:
            frame = json.loads(message)
            if frame["type"] == "ping":
                await socket.send(json.dumps({"type": "pong"}))
            elif frame["type"] == "next":
                received.append(frame["payload"])
                return
            else:
                raise AssertionError(f"unexpected frame {frame}")


def test_a_subscription_receives_an_anomaly_of_a_replayed_stream(app):
    ws_url = app.http.replace("http://", "ws://") + "/graphql"
    query = 'subscription { anomalies(entity: "pump-9") { predictionId eventId entity isAnomaly ensembleScore } }'
    node = subprocess.Popen(
        ["node", str(JS_CLIENTS / "subscribe.mjs"), ws_url, app.auth(TENANT, "reader")["authorization"], "1", query],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        # The node client says "connected" once the server acknowledged it.
        assert node.stderr.readline().strip() == "connected"

        async def replay_under_subscription() -> list:
            received, ready = [], asyncio.Event()
            listening = asyncio.create_task(_python_subscription(ws_url, app.auth(TENANT, "reader"), query, received, ready))
            await asyncio.wait_for(ready.wait(), 60)
            await asyncio.sleep(1.0)  # the subscribe frame reaches the server's feed
            # A sensor's normal readings, then a reading far outside anything it was trained on.
            values = np.append(sensor_series(count=1, length=40, seed=5)[0], 500.0)
            answer = await asyncio.to_thread(_post, app, _events("pump-9", values))
            assert answer.status_code == 202, answer.text
            await asyncio.wait_for(listening, WAIT_S)
            return received

        [python_payload] = asyncio.run(replay_under_subscription())
        stdout, stderr = node.communicate(timeout=WAIT_S)
        assert node.returncode == 0, stderr
        node_payload = json.loads(stdout.splitlines()[0])
    finally:
        if node.poll() is None:
            node.kill()
    for payload in (python_payload, node_payload):
        anomaly = payload["data"]["anomalies"]
        assert anomaly["entity"] == "pump-9" and anomaly["isAnomaly"] is True
    # Both clients got the stream's first anomaly.
    assert python_payload["data"]["anomalies"]["eventId"] == node_payload["data"]["anomalies"]["eventId"]


ENRICHMENTS = """query($entity: String) {
  enrichments(entity: $entity, first: 10) { edges { node { enrichmentId predictionId entity source summary details } } }
}"""


def test_an_anomaly_of_the_stream_is_explained_stored_and_pushed_to_subscribers(app):
    """The stream's sink hands its durable anomalies to the app's AgentGraph, whose enrichment
    reaches the enrichments subscription and the lakehouse (read back through GraphQL)."""
    ws_url = app.http.replace("http://", "ws://") + "/graphql"
    query = 'subscription { enrichments(entity: "pump-7") { enrichmentId predictionId entity source summary } }'

    async def explain_under_subscription() -> list:
        received, ready = [], asyncio.Event()
        listening = asyncio.create_task(_python_subscription(ws_url, app.auth(TENANT, "reader"), query, received, ready))
        await asyncio.wait_for(ready.wait(), 60)
        await asyncio.sleep(1.0)  # the subscribe frame reaches the server's feed
        values = np.append(sensor_series(count=1, length=40, seed=6)[0], 500.0)
        answer = await asyncio.to_thread(_post, app, _events("pump-7", values, start=START + timedelta(days=1)))
        assert answer.status_code == 202, answer.text
        await asyncio.wait_for(listening, WAIT_S)
        return received

    [payload] = asyncio.run(explain_under_subscription())
    pushed = payload["data"]["enrichments"]
    assert pushed["entity"] == "pump-7" and pushed["source"] == "agent-graph"
    assert "template" in pushed["summary"].lower()  # the embedded reasoner says what it is
    deadline = time.monotonic() + WAIT_S
    while not (edges := _graphql(app, ENRICHMENTS, {"entity": "pump-7"})["enrichments"]["edges"]):
        assert time.monotonic() < deadline, "the pushed enrichment never reached the lakehouse"
        time.sleep(1.0)
    stored = edges[0]["node"]
    assert stored["enrichmentId"] == pushed["enrichmentId"] and stored["predictionId"] == pushed["predictionId"]
    details = json.loads(stored["details"])
    assert details["reasoning"]["provider"] == "template" and details["partial"] == []
    anomalous = {edge["node"]["predictionId"] for edge in _graphql(app, PREDICTIONS, {"entity": "pump-7"})["predictions"]["edges"] if edge["node"]["isAnomaly"]}
    assert stored["predictionId"] in anomalous


def test_unknown_routes_and_bad_graphql_are_4xx_json(app):
    missing = httpx.get(f"{app.http}/nowhere", timeout=30)
    assert missing.status_code == 404 and "/v1/events" in missing.json()["error"]
    for route in ("/v1/events", "/v1/events/binary", "/v1/predict", "/graphql"):
        no_token = httpx.post(f"{app.http}{route}", content=b"{}", headers={"content-type": "application/json"}, timeout=30)
        assert no_token.status_code == 401 and "Bearer" in no_token.text, route
        reader = httpx.post(f"{app.http}{route}", content=b"{}", headers={"content-type": "application/json", **app.auth(TENANT, "reader")}, timeout=30)
        assert (reader.status_code not in (401, 403)) if route == "/graphql" else reader.status_code == 403, (route, reader.text)
    other_tenant = httpx.post(f"{app.http}/v1/predict", json={"tenant": LIMITED, "window": [0.0] * WINDOW_LENGTH}, headers=app.auth(TENANT, "writer"), timeout=30)
    assert other_tenant.status_code == 403 and LIMITED in other_tenant.json()["error"]
    document = httpx.get(f"{app.http}/openapi.json", timeout=30).json()
    assert {"/v1/events", "/v1/events/binary", "/v1/predict", "/graphql", "/healthz", "/.well-known/jwks.json"} <= set(document["paths"])
    assert [key["kid"] for key in httpx.get(f"{app.http}/.well-known/jwks.json", timeout=30).json()["keys"]] == ["k1"]
    health = httpx.get(f"{app.http}/healthz", timeout=30).json()
    assert health["status"] == "ok" and "stream_lag_events" in health


def _prometheus(prometheus_url: str, expression: str) -> list[dict]:
    answer = httpx.get(f"{prometheus_url}/api/v1/query", params={"query": expression}, timeout=30)
    assert answer.status_code == 200, f"{expression}: {answer.text}"
    return answer.json()["data"]["result"]


def test_prometheus_scrapes_the_app_and_every_dashboard_and_rule_expression_returns_series(app, prometheus_url):
    """After the tests above (ingestion, rejects, 429s, feedback, a replayed stream with anomalies
    and their enrichment), the services' Prometheus, which `rtml up` registered the cluster with,
    holds the app's series under rtml's names; every query of the Grafana dashboard and every
    alert rule evaluates, and returns series."""
    from lakehouse import Lakehouse
    from observability import queries
    from rtml.schemas import Event, ModelVersion
    from rtml.settings import Settings

    # A tenant whose model names the events it was trained on (the drift reference), then sends
    # values three standard deviations higher: the stream's drift gauges get its series.
    lake = Lakehouse.open(Settings(home=app.home))
    rng = np.random.default_rng(7)
    lake.append_idempotent(
        "events", [Event(tenant=DRIFTING, entity="line-0", event_time=START + timedelta(minutes=i), value=float(v)) for i, v in enumerate(rng.normal(0, 1, 1000))]
    )
    demo_rnn = next(model for model in lake.registry.active(TENANT) if model.kind == "rnn")
    model = lake.registry.register(
        ModelVersion(
            name=f"{DRIFTING}-rnn", version=0, kind="rnn", tenant=DRIFTING, artifact_uri=demo_rnn.artifact_uri,
            training_snapshot_ids={"events": lake.snapshots("events")[-1].snapshot_id},
        )
    )  # fmt: skip
    lake.registry.promote(model.name, model.version)
    shifted = _events("line-0", rng.normal(3, 1, 300), START + timedelta(days=1))
    assert _post(app, shifted, tenant=DRIFTING).status_code == 202

    wanted = {
        "ingestion rate": f'sum by (tenant) (rate(rtml_ingested_events_total{{tenant="{TENANT}"}}[5m]))',
        "consumer lag": "max by (group, partition) (rtml_consumer_lag_events)",
        "decision latency": "histogram_quantile(0.99, sum by (le, group) (rate(rtml_event_to_decision_seconds_bucket[5m])))",
        "drift": f'max by (tenant) (rtml_drift_psi{{tenant="{DRIFTING}"}}) > 0.2',
    }
    deadline = time.monotonic() + WAIT_S
    while missing := [name for name, expression in wanted.items() if not _prometheus(prometheus_url, expression)]:
        assert time.monotonic() < deadline, f"after {WAIT_S:.0f}s Prometheus has no series for {missing}"
        time.sleep(2.0)
    lag = _prometheus(prometheus_url, wanted["consumer lag"])
    assert {series["metric"]["group"] for series in lag} == {"rtml-stream"}
    assert all(series["metric"]["partition"] for series in lag)

    expressions = [(f"panel {title}", expression) for title, expression in queries.dashboard_expressions()]
    for alert, expression, signal in queries.rule_expressions():
        expressions += [(f"rule {alert}", expression), (f"signal of {alert}", signal)]
    deadline = time.monotonic() + 60.0
    while True:
        answers = {name: _prometheus(prometheus_url, expression) for name, expression in expressions}  # each evaluates (200)
        # An alert's own expression is empty unless it fires; the quantity it compares is not.
        empty = [name for name, answer in answers.items() if not name.startswith("rule") and not answer]
        if not empty or time.monotonic() > deadline:
            break
        time.sleep(5.0)
    assert not empty, f"no series for {empty}"
