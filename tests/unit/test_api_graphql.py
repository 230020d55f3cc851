"""The GraphQL API in-process: a real SQLite-catalog lakehouse under tmp_path, the ASGI app of
``api.graphql`` driven by starlette's TestClient over HTTP and WebSocket (graphql-transport-ws),
the live feed a real ``MemoryFeed``. The running app's operations (router feedback, promotions,
rollouts) are an in-process implementation of ``api.operations.Operations`` over the same
lakehouse registry. No Ray."""

from __future__ import annotations

import json
from collections.abc import Iterator
import logging
import threading
import time
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest
from graphql import GraphQLEnumType, GraphQLInputObjectType, GraphQLObjectType
from pyiceberg.expressions import EqualTo
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect
from typer.testing import CliRunner

from api.cli import app as api_cli
from api.cli import query as query_command
from api.erasure import LocalAgentStores
from api.data import DataAccess
from api.graphql import graphql_app
from api.schema import schema
from deployments.ensemble import OnlineAccuracy, reweight
from lakehouse import Lakehouse

from rtml.schemas import SHADOW_PREFIX, ModelStatus, ModelVersion, Refusal, ScoreRequest, ScoreResult, prediction_table
from rtml.settings import Settings
from streaming.feed import MemoryFeed, prediction_items
from tests.auth import auth_headers, token

BASE = datetime(2024, 3, 1, tzinfo=timezone.utc)
ROWS = 30  # predictions per tenant, one a minute from BASE
ENTITIES = {"acme": ["pump-0", "pump-1", "pump-2"], "globex": ["fan-0", "fan-1"]}

PAGE = """
query Page($first: Int, $after: String, $entity: String, $start: DateTime, $end: DateTime, $model: String,
           $decision: Decision, $asOf: DateTime, $snapshotId: ID) {
  predictions(first: $first, after: $after, entity: $entity, start: $start, end: $end, model: $model,
              decision: $decision, asOf: $asOf, snapshotId: $snapshotId) {
    edges { cursor node { predictionId tenant entity eventTime ensembleScore isAnomaly decision
                          scores { model score } shadowScores { model score } modelVersions { name version } subject } }
    pageInfo { hasNextPage endCursor }
    snapshotId
  }
}"""


class InProcessOperations(LocalAgentStores):
    """``api.operations.Operations`` without Serve: what the router answers, computed here over the
    lakehouse registry (multiplicative re-weighting as the router does, ``deployments.ensemble``);
    an erasure's search index and graph are the embedded ones of the test's home."""

    def __init__(self, lake: Lakehouse, settings: Settings):
        super().__init__(settings)
        self.lake = lake
        self.rollouts: dict[str, tuple[str, float]] = {}
        self.refreshes = 0
        self.generation = 0
        self.accuracy = OnlineAccuracy()
        self.fail_with: Exception | None = None

    async def feedback(self, items):
        answers = []
        for item in items:
            found = self.lake.read("predictions", tenant=item.tenant, where=EqualTo("prediction_id", item.prediction_id)).to_pylist()
            if not found:
                answers.append({"prediction_id": item.prediction_id, "error": f"tenant {item.tenant!r} has no prediction {item.prediction_id!r}"})
                continue
            scores = {key: score for key, score in found[0]["scores"] if not key.startswith(SHADOW_PREFIX)}
            self.accuracy.record(scores, item.is_anomaly, 0.5)
            weights = self.lake.registry.update_weights(
                item.tenant, lambda stored: reweight({key: stored[key] for key in scores}, scores, item.is_anomaly, 0.5)
            )
            answers.append({"prediction_id": item.prediction_id, "weights": {key: weights[key] for key in scores}, "online_accuracy": self.accuracy.of(scores)})
        return answers

    async def ensemble(self, tenant):
        if self.fail_with is not None:
            raise self.fail_with
        active = self.lake.registry.active(tenant)
        if not active:
            return None
        owned = {model.key: model for model in self.lake.registry.list(tenant=tenant)}
        rollouts = {key: {"mode": mode, "fraction": fraction, "weight": owned[key].ensemble_weight} for key, (mode, fraction) in self.rollouts.items() if key in owned}
        return {
            "tenant": tenant,
            "members": {model.key: {"kind": model.kind, "weight": model.ensemble_weight} for model in active},
            "rollouts": rollouts,
            "online_accuracy": self.accuracy.of([*(model.key for model in active), *rollouts]),
            "unhealthy": [],
            "generation": self.generation,
        }

    async def promote(self, name, version):
        self.generation += 1
        return self.lake.registry.promote(name, version)

    async def set_rollout(self, model_key, mode, fraction):
        self.generation += 1
        if mode is None:
            self.rollouts.pop(model_key, None)
        else:
            self.rollouts[model_key] = (mode, fraction)

    async def refresh(self):
        self.refreshes += 1


def register(lake: Lakehouse, tenant: str, name: str, kind: str, promote: bool) -> ModelVersion:
    """A real registry entry (the scorer's artifact is never loaded here: nothing scores)."""
    model = lake.registry.register(ModelVersion(name=name, version=0, kind=kind, tenant=tenant, artifact_uri=f"file:///models/{name}", metrics={"mae": 0.1}))
    return lake.registry.promote(model.name, model.version) if promote else model


def prediction_rows(tenant: str, indexes, *, minute_offset: float = 0.0, seed: int = 0, ids: str = "p"):
    """Prediction rows of ``tenant`` as the scoring path builds them (``prediction_table``): row i
    at BASE + i minutes (+ ``minute_offset``), id ``<ids>-i``, event ``ev-i``; acme's are scored by
    two models and a shadow, globex's by one."""
    indexes = list(indexes)
    count = len(indexes)
    rng = np.random.default_rng(seed + (1 if tenant == "acme" else 2))
    if tenant == "acme":
        scores = {"acme-rnn@1": rng.random(count), "acme-cnn@1": rng.random(count)}
        versions = {"acme-rnn": "1", "acme-cnn": "1"}
        shadows = {"acme-rnn@2": rng.random(count)}
    else:
        scores, versions, shadows = {"globex-rnn@1": rng.random(count)}, {"globex-rnn": "1"}, None
    ensemble = np.mean(np.stack(list(scores.values())), axis=0)
    entities = ENTITIES[tenant]
    times = np.array([int((BASE + timedelta(minutes=i + minute_offset)).timestamp() * 1e6) for i in indexes], np.int64)
    request = ScoreRequest(
        tenant=tenant,
        windows=np.zeros((count, 1), np.float32),
        entities=[entities[i % len(entities)] for i in indexes],
        event_ids=[f"ev-{ids}-{i}" for i in indexes],
        event_times_us=times,
        subjects=["alice" if i % 10 == 0 else None for i in indexes],
    )
    result = ScoreResult(
        prediction_ids=[f"{ids}-{i}" for i in indexes],
        ensemble_scores=ensemble,
        is_anomaly=ensemble >= 0.5,
        scores=scores,
        model_versions=versions,
    )
    return prediction_table(request, result, BASE.timestamp(), shadows)


class World:
    """A lakehouse with two tenants whose predictions share ids, their models, and the app over it."""

    def __init__(self, home, **api):
        self.settings = Settings(home=home, api=api)
        self.lake = Lakehouse.open(self.settings)
        self.models = {
            "acme-rnn@1": register(self.lake, "acme", "acme-rnn", "rnn", True),
            "acme-cnn@1": register(self.lake, "acme", "acme-cnn", "cnn", True),
            "acme-rnn@2": register(self.lake, "acme", "acme-rnn", "rnn", False),
            "globex-rnn@1": register(self.lake, "globex", "globex-rnn", "rnn", True),
        }
        for tenant in ("acme", "globex"):
            self.lake.append_idempotent("predictions", prediction_rows(tenant, range(ROWS)))
        self.operations = InProcessOperations(self.lake, self.settings)
        self.feed = MemoryFeed()
        self.access = DataAccess(self.settings, self.operations, self.feed, self.lake)
        self.client = TestClient(graphql_app(self.access, self.settings))

    def gql(self, query: str, tenant: str | None = "acme", role: str = "admin", **variables) -> dict:
        headers = auth_headers(self.settings, tenant, role) if tenant is not None else {}
        response = self.client.post("/", json={"query": query, "variables": variables}, headers=headers)
        body = response.json()
        assert "Traceback" not in response.text and "stacktrace" not in response.text
        return body

    def ok(self, query: str, tenant: str = "acme", role: str = "admin", **variables) -> dict:
        body = self.gql(query, tenant, role, **variables)
        assert "errors" not in body, body.get("errors")
        return body["data"]

    def rows(self, tenant: str) -> list[dict]:
        """The tenant's rows as the lakehouse holds them, newest first (the listing's order)."""
        rows = self.lake.read("predictions", tenant=tenant).to_pylist()
        return sorted(rows, key=lambda row: (row["event_time"], row["prediction_id"]), reverse=True)


def codes(body: dict) -> list[str]:
    return [error["extensions"]["code"] for error in body.get("errors", [])]


def nodes(data: dict, field: str = "predictions") -> list[dict]:
    return [edge["node"] for edge in data[field]["edges"]]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Iterator[World]:
    """Shared by the read-only tests."""
    world = World(tmp_path_factory.mktemp("graphql-world"))
    yield world
    world.access.close()


@pytest.fixture
def fresh(tmp_path) -> Iterator[World]:
    """Its own lakehouse, for tests that change data."""
    world = World(tmp_path)
    yield world
    world.access.close()


# schema ---------------------------------------------------------------------------------------


def test_every_type_field_argument_and_enum_value_is_described():
    missing = []
    for name, graphql_type in schema.graphql_schema.type_map.items():
        if name.startswith("__") or name in ("String", "Int", "Float", "Boolean", "ID"):
            continue
        if not graphql_type.description:
            missing.append(name)
        if isinstance(graphql_type, (GraphQLObjectType, GraphQLInputObjectType)):
            for field_name, field in graphql_type.fields.items():
                if not field.description:
                    missing.append(f"{name}.{field_name}")
                for arg_name, arg in getattr(field, "args", {}).items():
                    if not arg.description:
                        missing.append(f"{name}.{field_name}({arg_name})")
        if isinstance(graphql_type, GraphQLEnumType):
            missing += [f"{name}.{value}" for value, member in graphql_type.values.items() if not member.description]
    assert not missing


def test_rtml_api_schema_prints_the_sdl():
    result = CliRunner().invoke(api_cli, ["schema"])
    assert result.exit_code == 0
    assert "type Query" in result.stdout and "type Subscription" in result.stdout
    assert "submitFeedback(" in result.stdout


# tenant scope ---------------------------------------------------------------------------------


def test_each_tenant_sees_only_its_own_rows_though_ids_are_shared(world):
    for tenant in ("acme", "globex"):
        data = world.ok(PAGE, tenant, first=100)
        found = nodes(data)
        assert len(found) == ROWS
        assert {node["tenant"] for node in found} == {tenant}
        assert {node["entity"] for node in found} == set(ENTITIES[tenant])
        assert {node["predictionId"] for node in found} == {f"p-{i}" for i in range(ROWS)}  # the same ids in both
        assert [node["ensembleScore"] for node in found] == [row["ensemble_score"] for row in world.rows(tenant)]

        lineage = world.ok("query($id: ID!) { lineage(predictionId: $id) { prediction { tenant entity } models { key } } }", tenant, id="p-3")
        assert lineage["lineage"]["prediction"]["tenant"] == tenant
        assert {model["key"] for model in lineage["lineage"]["models"]} <= {key for key in world.models if key.startswith(tenant)}

        models = world.ok("{ models { key status } ensemble { members { model } } tenant }", tenant)
        assert {model["key"] for model in models["models"]} == {key for key in world.models if key.startswith(tenant)}
        assert {member["model"] for member in models["ensemble"]["members"]} <= {key for key in world.models if key.startswith(tenant)}
        assert models["tenant"] == tenant

        windows = world.ok("query($s: DateTime!, $e: DateTime!) { analytics(start: $s, end: $e, window: 3600) { count } }", tenant, s=BASE.isoformat(), e=(BASE + timedelta(hours=1)).isoformat())
        assert windows["analytics"][0]["count"] == ROWS


def test_a_request_without_a_valid_token_is_refused_before_anything_runs(world):
    for headers in ({}, {"authorization": "Bearer not-a-jwt"}, {"authorization": "Basic dXNlcjpwYXNz"}, {"x-rtml-tenant": "acme"}):
        for query in (PAGE, "{ __schema { queryType { name } } }", "{ predictions { edges "):
            response = world.client.post("/", json={"query": query}, headers=headers)
            assert response.status_code == 401
            assert codes(response.json()) == ["UNAUTHENTICATED"]
            assert "Bearer" in response.json()["errors"][0]["message"] or "JWT" in response.json()["errors"][0]["message"]
    assert world.ok("{ __schema { queryType { name } } }", "acme", "reader")["__schema"]["queryType"]["name"] == "Query"


def test_a_role_without_the_fields_right_is_forbidden_before_the_operation_runs(fresh):
    erase = 'mutation { requestErasure(subject: "alice") { rowsRemoved } }'
    for role in ("reader", "writer"):
        response = fresh.client.post("/", json={"query": erase}, headers=auth_headers(fresh.settings, "acme", role))
        assert response.status_code == 403
        assert codes(response.json()) == ["FORBIDDEN"] and "admin" in response.json()["errors"][0]["message"]
        # hidden behind a fragment or an alias, alike
        hidden = "mutation { ...E } fragment E on Mutation { gone: requestErasure(subject: \"alice\") { rowsRemoved } }"
        assert codes(fresh.gql(hidden, "acme", role)) == ["FORBIDDEN"]
        assert codes(fresh.gql("{ auditEntries { edges { cursor } } }", "acme", role)) == ["FORBIDDEN"]
        assert codes(fresh.gql('mutation { promoteModel(name: "acme-rnn", version: 2) { key } }', "acme", role)) == ["FORBIDDEN"]
    assert sum(row["subject"] == "alice" for row in fresh.rows("acme")) == 3
    assert fresh.lake.registry.get("acme-rnn", 2).status == ModelStatus.CANDIDATE
    assert codes(fresh.gql(FEEDBACK, "acme", "reader", verdicts=[{"predictionId": "p-1", "isAnomaly": True}])) == ["FORBIDDEN"]
    assert fresh.ok(FEEDBACK, "acme", "writer", verdicts=[{"predictionId": "p-1", "isAnomaly": True}])["submitFeedback"]
    assert fresh.ok(PAGE, "acme", "reader", first=1)["predictions"]["edges"]


def test_every_call_is_audited_with_who_which_rows_and_from_where(fresh):
    fresh.ok(PAGE, "acme", "reader", first=3)
    fresh.ok("{ models { key } }", "globex", "reader")
    fresh.access.flush_audit(30)
    entries = [json.loads(entry["details"]) | entry for entry in nodes(fresh.ok("{ auditEntries(first: 100) { edges { node { action actor tableName rowCount details } } } }", "acme"), "auditEntries")]
    read = next(entry for entry in entries if entry["action"] == "read" and entry["tableName"] == "predictions")
    assert read["rowCount"] == 3 and len(read["rows"]) == 3 and read["role"] == "reader" and read["tenant"] == "acme"
    assert read["from"] == "testclient" and "test-reader" in read["actor"]
    assert not [entry for entry in entries if entry["tableName"] == "models" and entry["action"] == "read"]  # globex's read is globex's


def test_queries_run_over_get_too_but_mutations_do_not(world):
    asked = world.client.get("/", params={"query": "{ tenant }"}, headers=auth_headers(world.settings, "globex"))
    assert asked.json() == {"data": {"tenant": "globex"}}
    refused = world.client.get("/", params={"query": 'mutation { requestErasure(subject: "alice") { rowsRemoved } }'}, headers=auth_headers(world.settings, "globex"))
    assert codes(refused.json()) == ["BAD_USER_INPUT"]
    assert sum(row["subject"] == "alice" for row in world.rows("globex")) == 3


def test_an_unknown_prediction_of_another_tenant_is_not_found(world):
    world.lake.append_idempotent("predictions", prediction_rows("acme", [0], ids="only-acme"))
    body = world.gql("{ lineage(predictionId: \"only-acme-0\") { prediction { tenant } } }", "globex")
    assert codes(body) == ["NOT_FOUND"]
    assert "only-acme-0" in body["errors"][0]["message"]
    assert world.ok("{ lineage(predictionId: \"only-acme-0\") { prediction { tenant } } }", "acme")["lineage"]["prediction"]["tenant"] == "acme"


# reads ----------------------------------------------------------------------------------------


def test_filters_select_by_entity_time_model_and_decision(world):
    rows = world.rows("acme")
    start, end = BASE + timedelta(minutes=5), BASE + timedelta(minutes=17)

    def ids(**variables) -> list[str]:
        return [node["predictionId"] for node in nodes(world.ok(PAGE, "acme", first=100, **variables))]

    def expected(keep) -> list[str]:
        return [row["prediction_id"] for row in rows if keep(row)]

    assert ids(entity="pump-1") == expected(lambda row: row["entity"] == "pump-1")
    assert ids(start=start.isoformat(), end=end.isoformat()) == expected(lambda row: start <= row["event_time"] < end)
    assert ids(decision="ANOMALY") == expected(lambda row: row["is_anomaly"])
    assert ids(decision="NORMAL") == expected(lambda row: not row["is_anomaly"])
    assert ids(model="acme-rnn") == expected(lambda row: True)
    assert ids(model="acme-rnn@1") == expected(lambda row: True)
    assert ids(model="acme-rnn@2") == []  # a shadow of every row, but it scored none into the ensemble
    anomalies = world.ok("{ anomalies(first: 100) { edges { node { predictionId isAnomaly } } } }")
    assert [node["predictionId"] for node in nodes(anomalies, "anomalies")] == expected(lambda row: row["is_anomaly"])
    assert 0 < len(expected(lambda row: row["is_anomaly"])) < ROWS

    node = nodes(world.ok(PAGE, "acme", first=1))[0]
    assert {score["model"] for score in node["scores"]} == {"acme-rnn@1", "acme-cnn@1"}
    assert [score["model"] for score in node["shadowScores"]] == ["acme-rnn@2"]
    assert node["decision"] == ("ANOMALY" if node["isAnomaly"] else "NORMAL")


def test_pages_stay_on_their_snapshot_while_rows_arrive(fresh):
    before = [row["prediction_id"] for row in fresh.rows("acme")]
    first = fresh.ok(PAGE, "acme", first=7)["predictions"]
    seen = [node["predictionId"] for node in nodes({"predictions": first})]
    after = first["pageInfo"]["endCursor"]
    arrivals = 0
    while first["pageInfo"]["hasNextPage"]:
        # rows arrive between pages: newer ones, and ones whose times fall among the pages still to come
        arrivals += 1
        fresh.lake.append_idempotent("predictions", prediction_rows("acme", [ROWS + arrivals], ids="new"))
        fresh.lake.append_idempotent("predictions", prediction_rows("acme", [3], minute_offset=0.5, seed=arrivals, ids=f"mid{arrivals}"))
        first = fresh.ok(PAGE, "acme", first=7, after=after)["predictions"]
        seen += [node["predictionId"] for node in nodes({"predictions": first})]
        after = first["pageInfo"]["endCursor"]
    assert arrivals == 4
    assert seen == before  # every row once, in order, none of the arrivals
    newest = [node["predictionId"] for node in nodes(fresh.ok(PAGE, "acme", first=100))]
    assert len(newest) == ROWS + 2 * arrivals and newest[0] == f"new-{ROWS + arrivals}"


def test_analytics_windows_match_numpy_on_the_same_rows(world):
    start, end = BASE + timedelta(minutes=2), BASE + timedelta(minutes=29, seconds=30)
    query = """query($s: DateTime!, $e: DateTime!, $byEntity: Boolean) {
      analytics(start: $s, end: $e, window: 300, byEntity: $byEntity) {
        start end entity count anomalies anomalyRate eventsPerSecond p50 p90 p99 } }"""
    rows = [row for row in world.rows("acme") if start <= row["event_time"] < end]
    for by_entity in (False, True):
        windows = world.ok(query, "acme", s=start.isoformat(), e=end.isoformat(), byEntity=by_entity)["analytics"]
        entities = sorted({row["entity"] for row in rows}) if by_entity else [None]
        assert len(windows) == 6 * len(entities)  # 27.5 minutes in windows of 5: the last is 2.5 minutes
        for window in windows:
            w_start, w_end = datetime.fromisoformat(window["start"]), datetime.fromisoformat(window["end"])
            inside = [row for row in rows if w_start <= row["event_time"] < w_end and (window["entity"] is None or row["entity"] == window["entity"])]
            scores = np.array([row["ensemble_score"] for row in inside])
            assert window["count"] == len(inside)
            assert window["anomalies"] == sum(row["is_anomaly"] for row in inside)
            assert window["eventsPerSecond"] == pytest.approx(len(inside) / (w_end - w_start).total_seconds())
            if inside:
                assert window["anomalyRate"] == pytest.approx(window["anomalies"] / len(inside))
                for key, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
                    assert window[key] == pytest.approx(float(np.quantile(scores, q)))
            else:
                assert window["p50"] is None and window["anomalyRate"] == 0.0
        assert datetime.fromisoformat(windows[-1]["end"]) == end
        assert sum(window["count"] for window in windows) == len(rows)


def test_time_travel_reads_the_earlier_state(fresh):
    snapshots = fresh.ok("{ snapshots { snapshotId committedAt operation } }")["snapshots"]
    earlier = snapshots[-1]
    before = [row["prediction_id"] for row in fresh.rows("acme")]
    time.sleep(0.01)  # the next commit gets a later millisecond than the one travelled to
    fresh.lake.append_idempotent("predictions", prediction_rows("acme", range(ROWS, ROWS + 5)))
    assert len(nodes(fresh.ok(PAGE, "acme", first=100))) == ROWS + 5

    by_id = fresh.ok(PAGE, "acme", first=100, snapshotId=earlier["snapshotId"])["predictions"]
    by_time = fresh.ok(PAGE, "acme", first=100, asOf=earlier["committedAt"])["predictions"]
    for page in (by_id, by_time):
        assert [node["predictionId"] for node in nodes({"predictions": page})] == before
        assert page["snapshotId"] == earlier["snapshotId"]
    assert codes(fresh.gql(PAGE, "acme", snapshotId="12345")) == ["NOT_FOUND"]
    before_any = fresh.ok(PAGE, "acme", asOf=(BASE - timedelta(days=365 * 10)).isoformat())["predictions"]
    assert before_any["edges"] == [] and before_any["snapshotId"] is None
    assert len(fresh.ok("{ snapshots { snapshotId } }")["snapshots"]) == len(snapshots) + 1


def test_lineage_names_the_features_and_models_of_a_prediction(world):
    prediction = next(row for row in world.rows("acme") if row["prediction_id"] == "p-4")
    feature = {
        "tenant": "acme",
        "entity": prediction["entity"],
        "window_start": prediction["event_time"] - timedelta(minutes=1),
        "window_end": prediction["event_time"],
        "feature_set_version": "",
        "vector": [1.0, 2.0, 3.0],
    }
    world.lake.append_idempotent("features", [feature, {**feature, "tenant": "globex"}])
    lineage = world.ok(
        """{ lineage(predictionId: "p-4") { prediction { predictionId entity }
             features { entity windowEnd vector } models { key status trainingSnapshots { table } metrics { name value } }
             unregisteredModels { name } } }"""
    )["lineage"]
    assert lineage["prediction"] == {"predictionId": "p-4", "entity": prediction["entity"]}
    assert [row["vector"] for row in lineage["features"]] == [[1.0, 2.0, 3.0]]
    assert {model["key"] for model in lineage["models"]} == {"acme-rnn@1", "acme-cnn@1"}
    assert lineage["models"][0]["metrics"] == [{"name": "mae", "value": 0.1}]
    assert lineage["unregisteredModels"] == []


# limits and errors ----------------------------------------------------------------------------


def test_depth_and_cost_limits_refuse_with_codes(world, tmp_path):
    def limited(**limits) -> TestClient:
        return TestClient(graphql_app(world.access, world.settings.model_copy(update={"api": world.settings.api.model_copy(update=limits)})))

    def ask(client, query, variables=None) -> dict:
        return client.post("/", json={"query": query, "variables": variables}, headers=auth_headers(world.settings, "acme")).json()

    shallow = limited(max_query_depth=2)
    assert codes(ask(shallow, "{ lineage(predictionId: \"p-1\") { models { key } } }")) == []
    assert codes(ask(shallow, "{ lineage(predictionId: \"p-1\") { models { trainingSnapshots { table } } } }")) == ["QUERY_TOO_DEEP"]
    cheap = limited(max_query_cost=200)
    costly = "query($n: Int) { predictions(first: $n) { edges { node { predictionId entity } } } }"
    assert codes(ask(cheap, costly, {"n": 20})) == []
    assert codes(ask(cheap, costly, {"n": 100})) == ["QUERY_TOO_COSTLY"]
    assert codes(ask(cheap, "{ predictions { edges { node { predictionId entity } } } }")) == ["QUERY_TOO_COSTLY"]  # its default page of 50

    # The defaults let one full page of every field through, and refuse several in one document.
    page = "predictions(first: 500) { edges { cursor node { ...all } } pageInfo { hasNextPage endCursor } snapshotId }"
    fragment = """fragment all on Prediction { predictionId eventId tenant entity eventTime ensembleScore isAnomaly decision
      latencyMs createdAt subject scores { model score } shadowScores { model score } modelVersions { name version } }"""
    assert codes(world.gql(f"{{ {page} }} {fragment}")) == []
    assert codes(world.gql(f"{{ a: {page} b: {page} }} {fragment}")) == ["QUERY_TOO_COSTLY"]


@pytest.mark.parametrize(
    "query, variables",
    [
        (PAGE, {"first": 0}),
        ("query($n: Int) { predictions(first: $n) { edges { cursor } } }", {"n": 501}),  # beyond max_page_size
        (PAGE, {"after": "not-a-cursor"}),
        (PAGE, {"model": "acme-rnn@latest"}),
        (PAGE, {"start": "2024-03-02T00:00:00Z", "end": "2024-03-01T00:00:00Z"}),
        (PAGE, {"asOf": "2024-03-02T00:00:00Z", "snapshotId": "1"}),
        (PAGE, {"snapshotId": "abc"}),
        (PAGE, {"start": "yesterday"}),
        (PAGE, {"first": "ten"}),
        ("query($s: DateTime!) { analytics(start: $s, end: $s, window: 60) { count } }", {"s": "2024-03-01T00:00:00Z"}),
        ('{ analytics(start: "2024-03-01T00:00:00Z", end: "2024-03-02T00:00:00Z", window: 0) { count } }', None),
        ('{ analytics(start: "2024-01-01T00:00:00Z", end: "2025-01-01T00:00:00Z", window: 1) { count } }', None),
    ],
)
def test_a_bad_argument_is_bad_user_input_with_a_message(world, query, variables):
    body = world.gql(query, "acme", **(variables or {}))
    assert codes(body) == ["BAD_USER_INPUT"], body
    error = body["errors"][0]
    assert error["message"] and set(error["extensions"]) == {"code"}


def test_a_malformed_document_is_a_parse_or_validation_failure(world):
    assert codes(world.gql("{ predictions { edges ")) == ["GRAPHQL_PARSE_FAILED"]
    assert codes(world.gql("{ predictions { nonsense } }")) == ["GRAPHQL_VALIDATION_FAILED"]


def test_an_unexpected_error_is_internal_logged_and_without_details(fresh, caplog):
    fresh.operations.fail_with = RuntimeError("secret detail of the router")
    with caplog.at_level(logging.ERROR, logger="api.graphql"):
        body = fresh.gql("{ ensemble { members { model } } models { key } }")
    assert codes(body) == ["INTERNAL"]
    assert "secret detail" not in json.dumps(body)
    assert body["data"]["models"]  # the rest of the query is answered
    logged = [record for record in caplog.records if record.exc_info]
    assert logged and "secret detail of the router" in repr(logged[0].exc_info[1].original_error)


def test_a_refusal_of_the_running_app_keeps_its_reason_and_says_unavailable(fresh):
    fresh.operations.fail_with = Refusal(503, "the routers are restarting; retry in a second", 1.0)
    body = fresh.gql("{ ensemble { members { model } } }")
    assert codes(body) == ["UNAVAILABLE"] and body["errors"][0]["message"] == "the routers are restarting; retry in a second"


# mutations ------------------------------------------------------------------------------------

FEEDBACK = """mutation($verdicts: [VerdictInput!]!) { submitFeedback(verdicts: $verdicts) {
  predictionId weights { model weight } onlineAccuracy { model accuracy } error } }"""


def weights(world: World, tenant: str) -> dict[str, float]:
    return {model.key: model.ensemble_weight for model in world.lake.registry.list(tenant=tenant)}


def test_feedback_reweights_the_callers_ensemble_only(fresh):
    fresh.lake.append_idempotent("predictions", prediction_rows("acme", [0], ids="only-acme"))
    globex_before, acme_before = weights(fresh, "globex"), weights(fresh, "acme")
    refused = fresh.ok(FEEDBACK, "globex", verdicts=[{"predictionId": "only-acme-0", "isAnomaly": True}])["submitFeedback"]
    assert refused[0]["error"] and "only-acme-0" in refused[0]["error"]
    assert weights(fresh, "globex") == globex_before and weights(fresh, "acme") == acme_before

    answer = fresh.ok(FEEDBACK, "acme", verdicts=[{"predictionId": "p-1", "isAnomaly": True, "comment": "pump was on fire"}])["submitFeedback"][0]
    assert answer["error"] is None
    after = weights(fresh, "acme")
    assert {item["model"]: item["weight"] for item in answer["weights"]} == {key: after[key] for key in ("acme-rnn@1", "acme-cnn@1")}
    assert after != acme_before and weights(fresh, "globex") == globex_before
    assert sum(after[key] for key in ("acme-rnn@1", "acme-cnn@1")) == pytest.approx(2.0)  # the members keep their total
    assert codes(fresh.gql(FEEDBACK, "acme", verdicts=[{"predictionId": "p-1", "isAnomaly": True, "comment": "x" * 5000}])) == ["BAD_USER_INPUT"]


def test_promote_model_only_for_the_callers_models(fresh):
    promote = "mutation($name: String!, $version: Int!) { promoteModel(name: $name, version: $version) { key status } }"
    body = fresh.gql(promote, "globex", name="acme-rnn", version=2)
    assert codes(body) == ["NOT_FOUND"] and "globex" in body["errors"][0]["message"]
    assert codes(fresh.gql(promote, "acme", name="acme-rnn", version=9)) == ["NOT_FOUND"]
    assert fresh.lake.registry.get("acme-rnn", 2).status == ModelStatus.CANDIDATE

    assert fresh.ok(promote, "acme", name="acme-rnn", version=2)["promoteModel"] == {"key": "acme-rnn@2", "status": "ACTIVE"}
    assert fresh.lake.registry.get("acme-rnn", 1).status == ModelStatus.RETIRED
    audit = "{ auditEntries { edges { node { action actor details } } } }"
    entries = nodes(fresh.ok(audit, "acme"), "auditEntries")
    assert [(entry["action"], json.loads(entry["details"])["model"]) for entry in entries] == [("promote", "acme-rnn@2")]
    assert nodes(fresh.ok(audit, "globex"), "auditEntries") == []


def test_set_ensemble_weights_only_of_the_callers_models(fresh):
    mutation = "mutation($w: [ModelWeightInput!]!) { setEnsembleWeights(weights: $w) { model weight } }"
    before = weights(fresh, "acme")
    assert codes(fresh.gql(mutation, "globex", w=[{"model": "acme-rnn@1", "weight": 5.0}])) == ["NOT_FOUND"]
    assert codes(fresh.gql(mutation, "acme", w=[{"model": "acme-rnn@1", "weight": -1.0}])) == ["BAD_USER_INPUT"]
    assert codes(fresh.gql(mutation, "acme", w=[{"model": "acme-rnn", "weight": 1.0}])) == ["BAD_USER_INPUT"]
    assert weights(fresh, "acme") == before and fresh.operations.refreshes == 0

    after = fresh.ok(mutation, "acme", w=[{"model": "acme-rnn@1", "weight": 3.0}])["setEnsembleWeights"]
    assert {item["model"]: item["weight"] for item in after} == {**before, "acme-rnn@1": 3.0} == weights(fresh, "acme")
    assert fresh.operations.refreshes == 1


def test_rollouts_start_and_end_for_the_callers_candidates(fresh):
    start = "mutation($f: Float!) { startRollout(model: \"acme-rnn@2\", mode: CANARY, fraction: $f) { rollouts { model mode fraction } } }"
    assert codes(fresh.gql(start, "globex", f=0.2)) == ["NOT_FOUND"]
    assert codes(fresh.gql(start, "acme", f=1.5)) == ["BAD_USER_INPUT"]
    assert fresh.operations.rollouts == {}
    assert fresh.ok(start, "acme", f=0.2)["startRollout"]["rollouts"] == [{"model": "acme-rnn@2", "mode": "CANARY", "fraction": 0.2}]
    ended = fresh.ok("mutation { endRollout(model: \"acme-rnn@2\") { rollouts { model } } }")
    assert ended["endRollout"]["rollouts"] == [] and fresh.operations.rollouts == {}


def test_request_erasure_erases_the_callers_subject_only(fresh):
    def subjects(tenant: str) -> int:
        return sum(row["subject"] == "alice" for row in fresh.rows(tenant))

    assert subjects("acme") == subjects("globex") == 3
    erase = 'mutation { requestErasure(subject: "alice") { rowsRemoved tables { table rowsRemoved } stores { store removed } } }'
    report = fresh.ok(erase)["requestErasure"]
    assert report["rowsRemoved"] == 3
    assert {table["table"]: table["rowsRemoved"] for table in report["tables"]}["predictions"] == 3
    assert {store["store"]: store["removed"] for store in report["stores"]} == {"search": 0, "graph": 0, "token vault": 0, "lakehouse": 3}
    assert subjects("acme") == 0 and subjects("globex") == 3
    audit = "{ auditEntries(first: 20) { edges { node { action tableName details } } } }"
    [erasure] = [entry for entry in nodes(fresh.ok(audit, "acme"), "auditEntries") if entry["action"] == "erase"]  # one entry for every store
    assert erasure["tableName"] == "*"
    assert (json.loads(erasure["details"])["tenant"], json.loads(erasure["details"])["complete"]) == ("acme", True)
    assert nodes(fresh.ok(audit, "globex"), "auditEntries") == []
    assert codes(fresh.gql('mutation { requestErasure(subject: "  ") { rowsRemoved } }')) == ["BAD_USER_INPUT"]


# subscriptions --------------------------------------------------------------------------------


def _subscribe(ws, operation_id: str, query: str) -> None:
    ws.send_json({"id": operation_id, "type": "subscribe", "payload": {"query": query}})


def _settled(ws) -> None:
    """The server handles a connection's messages in order: once it answers this ping, every
    subscribe sent before it is subscribed to the feed."""
    ws.send_json({"type": "ping"})
    assert ws.receive_json() == {"type": "pong"}


def _live_items(tenant: str, index: int, anomaly: bool) -> list[dict]:
    rows = prediction_rows(tenant, [index], ids=f"live-{'a' if anomaly else 'n'}")
    items = prediction_items(rows)
    for item in items:
        item["is_anomaly"] = anomaly
    return items


@pytest.mark.timeout(60)
def test_subscriptions_deliver_the_callers_live_predictions_and_anomalies(world):
    fields = "predictionId tenant isAnomaly eventTime scores { model }"
    with world.client.websocket_connect("/", subprotocols=["graphql-transport-ws"]) as ws:
        ws.send_json({"type": "connection_init", "payload": auth_headers(world.settings, "acme", "reader")})
        assert ws.receive_json() == {"type": "connection_ack"}
        _subscribe(ws, "all", f"subscription {{ predictions {{ {fields} }} }}")
        _subscribe(ws, "anomalies", f"subscription {{ anomalies {{ {fields} }} }}")
        _settled(ws)
        world.feed.publish("predictions", _live_items("globex", 1, True))
        world.feed.publish("predictions", _live_items("acme", 2, False) + _live_items("acme", 3, True) + _live_items("acme", 4, True))
        received: dict[str, list[dict]] = {"all": [], "anomalies": []}
        while len(received["all"]) < 3 or len(received["anomalies"]) < 2:
            message = ws.receive_json()
            assert message["type"] == "next", message
            received[message["id"]].append(message["payload"]["data"][("predictions" if message["id"] == "all" else "anomalies")])
        assert [item["predictionId"] for item in received["all"]] == ["live-n-2", "live-a-3", "live-a-4"]
        assert [item["predictionId"] for item in received["anomalies"]] == ["live-a-3", "live-a-4"]
        assert {item["tenant"] for item in received["all"]} == {"acme"}
        assert received["all"][0]["scores"] and received["all"][0]["eventTime"].startswith("2024-03-01")
        ws.send_json({"id": "all", "type": "complete"})
        ws.send_json({"id": "anomalies", "type": "complete"})


@pytest.mark.timeout(60)
def test_a_subscription_takes_its_caller_from_the_upgrade_headers_or_is_closed_without_one(world):
    with world.client.websocket_connect("/", subprotocols=["graphql-transport-ws"], headers=auth_headers(world.settings, "globex", "reader")) as ws:
        ws.send_json({"type": "connection_init"})
        assert ws.receive_json() == {"type": "connection_ack"}
        _subscribe(ws, "1", "subscription { anomalies { predictionId tenant } }")
        _settled(ws)
        world.feed.publish("predictions", _live_items("acme", 5, True) + _live_items("globex", 6, True))
        message = ws.receive_json()
        assert message["payload"]["data"]["anomalies"] == {"predictionId": "live-a-6", "tenant": "globex"}
    for payload in ({}, {"authorization": "Bearer forged"}, {"x-rtml-tenant": "globex"}):
        with world.client.websocket_connect("/", subprotocols=["graphql-transport-ws"]) as ws:
            ws.send_json({"type": "connection_init", "payload": payload})
            with pytest.raises(WebSocketDisconnect) as closed:
                ws.receive_json()
            assert closed.value.code == 4403


# the query command against a served app -----------------------------------------------------


@pytest.mark.timeout(60)
def test_rtml_query_posts_to_a_running_app_and_fails_on_errors(world):
    import typer
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(graphql_app(world.access, world.settings), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.05)
        port = server.servers[0].sockets[0].getsockname()[1]
        command = typer.Typer()
        command.command()(query_command)
        url = f"http://127.0.0.1:{port}/"
        done = CliRunner().invoke(command, ["query($n: Int) { predictions(first: $n) { edges { node { tenant } } } }", "--token", token(world.settings, "globex", "reader"), "--url", url, "--variables", '{"n": 2}'])
        assert done.exit_code == 0, done.output
        assert [edge["node"]["tenant"] for edge in json.loads(done.stdout)["data"]["predictions"]["edges"]] == ["globex", "globex"]
        failed = CliRunner().invoke(command, ["{ predictions(first: 0) { edges { cursor } } }", "--token", token(world.settings, "globex", "reader"), "--url", url])
        assert failed.exit_code == 1
        assert "BAD_USER_INPUT: first must be between 1 and" in failed.stderr
    finally:
        server.should_exit = True
        thread.join()


def test_only_an_admin_reverses_a_token_of_its_own_tenant_and_it_is_audited(fresh):
    from api.ingest import PiiFirstHop

    first_hop = PiiFirstHop(fresh.settings)
    tokenized = first_hop.tokenizer.tokenize("acme", {"entity": "pump-1", "attributes": {"owner": "bob@example.com"}})
    first_hop.store("acme", tokenized.entries)
    token = tokenized.document["attributes"]["owner"]
    reveal = "mutation($t: String!) { revealToken(token: $t) }"
    assert fresh.ok(reveal, "acme", t=token) == {"revealToken": "bob@example.com"}
    assert codes(fresh.gql(reveal, "acme", "writer", t=token)) == ["FORBIDDEN"]
    assert codes(fresh.gql(reveal, "globex", t=token)) == ["NOT_FOUND"]
    entries = nodes(fresh.ok("{ auditEntries(first: 100) { edges { node { action details } } } }", "acme"), "auditEntries")
    revealed = [entry for entry in entries if entry["action"] == "reveal"]
    assert len(revealed) == 1 and json.loads(revealed[0]["details"])["token"] == token
    assert all("bob@example.com" not in entry["details"] for entry in entries)
    first_hop.close()


def test_an_entity_is_found_by_its_plain_value_and_audited_by_its_token(fresh):
    from api.ingest import PiiFirstHop

    card = "card 4111 1111 1111 1111"
    stored = PiiFirstHop(fresh.settings).score_request(
        ScoreRequest(tenant="acme", windows=np.zeros((1, 1), np.float32), entities=[card])
    ).entities[0]
    assert stored != card
    rows = prediction_rows("acme", [0], ids="carded").to_pylist()
    fresh.lake.append_idempotent("predictions", [{**row, "entity": stored} for row in rows])
    found = nodes(fresh.ok("query($e: String) { predictions(entity: $e) { edges { node { predictionId entity } } } }", "acme", e=card))
    assert [(node["predictionId"], node["entity"]) for node in found] == [("carded-0", stored)]
    fresh.access.flush_audit(30)
    entries = nodes(fresh.ok("{ auditEntries(first: 100) { edges { node { rowFilter details } } } }", "acme"), "auditEntries")
    assert any(stored in (entry["rowFilter"] or "") for entry in entries)
    assert not any("4111" in (entry["rowFilter"] or "") + entry["details"] for entry in entries)
