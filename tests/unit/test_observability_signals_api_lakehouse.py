"""The ingestion, API and lakehouse signals of ``observability.metrics``, on real parts in this
process (prometheus-client's registry): the Ingestor over the embedded event log and a lakehouse on
a SQLite catalog, the rate limiter over the limits library's in-process storage, the Ingress's ASGI
app under Starlette's test client, and racing lakehouse writers.

Counters are process-wide, so each test compares the samples before and after what it does, and
checks that nothing else moved."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Callable
from contextlib import closing
from datetime import datetime, timedelta, timezone

import numpy as np
import orjson
import pytest
from prometheus_client import REGISTRY
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from api.ingest import Ingestor, counting_refusals, parse_json_body
from api.ratelimit import TenantRateLimiter
from deployments.ingress import ingress_app
from lakehouse import Lakehouse
from lakehouse.tables import EVENTS, to_arrow
from lakehouse.writer import append_idempotent
from rtml.schemas import Refusal
from rtml.settings import ApiSettings, RateLimit, Settings
from streaming.eventlog import log_file, open_event_log_writer
from tests.unit.test_api_ingest import T, _event, settings  # noqa: F401 - settings is a fixture

T0 = datetime(2025, 3, 1, tzinfo=timezone.utc)
INGESTED = "rtml_ingested_events_total"
REJECTED = "rtml_ingest_rejected_events_total"


def _samples(name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Every sample of ``name`` in this process's registry, by its labels."""
    return {
        tuple(sorted(sample.labels.items())): sample.value
        for family in REGISTRY.collect()
        for sample in family.samples
        if sample.name == name
    }


def _moved(before: dict, after: dict) -> dict:
    """The samples that changed, by how much."""
    return {labels: value - before.get(labels, 0.0) for labels, value in after.items() if value != before.get(labels, 0.0)}


class Changes:
    """What the named metrics did between construction and ``moved()``."""

    def __init__(self, *names: str):
        self._names = names
        self._before = {name: _samples(name) for name in names}

    def moved(self) -> dict[str, dict]:
        return {name: moved for name in self._names if (moved := _moved(self._before[name], _samples(name)))}


def _labels(**labels: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(labels.items()))


@pytest.fixture
def ingestor(settings):
    lake = Lakehouse.open(settings)
    ingestor = Ingestor(settings, open_event_log_writer(settings), lambda: lake.writer("events"))
    yield ingestor
    ingestor.close()


# ingestion ---------------------------------------------------------------------------------------


def test_accepted_events_count_per_path_and_refused_ones_per_cause_for_the_callers_tenant(ingestor):
    body = b"\n".join(
        [
            orjson.dumps(_event(event_id="m-1")),  # a metric: stream path
            orjson.dumps(_event(event_id="m-2")),
            orjson.dumps({"event_id": "r-1", "entity": "order-1", "data_type": "record", "event_time": T}),  # batch path
            b"{not json",
            orjson.dumps(_event(value=None)),
            orjson.dumps(_event(data_type="image", value=None)),
            orjson.dumps(_event(tenant="globex")),  # another tenant's
        ]
    )
    changes = Changes(INGESTED, REJECTED)
    result = ingestor.ingest_documents("acme", parse_json_body(body, "application/x-ndjson"))

    assert result.accepted == 3
    assert changes.moved() == {
        INGESTED: {_labels(tenant="acme", path="stream"): 2, _labels(tenant="acme", path="batch"): 1},
        REJECTED: {_labels(tenant="acme", reason="invalid"): 3, _labels(tenant="acme", reason="forbidden"): 1},
    }
    assert [(rejected.index, rejected.cause) for rejected in result.rejected] == [(3, "invalid"), (4, "invalid"), (5, "invalid"), (6, "forbidden")]


def test_binary_events_count_once_accepted_or_refused(ingestor):
    frame = np.arange(12, dtype=np.uint8).tobytes()
    fields = {"entity": "camera-1", "event_time": T, "frame_shape": "3x4", "frame_dtype": "uint8"}
    changes = Changes(INGESTED, REJECTED)

    assert ingestor.ingest_frame("acme", fields, frame).accepted == 1
    assert ingestor.ingest_frame("acme", {**fields, "frame_shape": "4x4"}, frame).accepted == 0
    assert ingestor.ingest_frame("acme", {**fields, "tenant": "globex"}, frame).accepted == 0

    assert changes.moved() == {
        INGESTED: {_labels(tenant="acme", path="stream"): 1},
        REJECTED: {_labels(tenant="acme", reason="invalid"): 1, _labels(tenant="acme", reason="forbidden"): 1},
    }


def test_a_request_refused_as_a_whole_counts_all_its_events_under_its_cause_and_none_as_accepted(ingestor, settings):
    changes = Changes(INGESTED, REJECTED)
    with closing(sqlite3.connect(log_file(settings), isolation_level=None)) as other:
        other.execute("BEGIN IMMEDIATE")  # another writer holds the log's write lock too long
        with pytest.raises(Refusal) as refused, counting_refusals("acme", 3):
            ingestor.ingest_documents("acme", [_event(event_id=f"e-{i}") for i in range(2)] + [_event(value=None)])
        other.execute("ROLLBACK")

    assert refused.value.status == 503
    assert changes.moved() == {REJECTED: {_labels(tenant="acme", reason="unavailable"): 3}}


@pytest.mark.parametrize(("status", "cause"), [(429, "rate_limited"), (413, "too_large"), (503, "unavailable"), (400, "invalid"), (403, "forbidden")])
def test_a_refusals_status_decides_its_cause(status, cause):
    changes = Changes(REJECTED)
    with pytest.raises(Refusal), counting_refusals("acme", 7):
        raise Refusal(status, "refused")
    with counting_refusals("acme", 5):
        pass  # answered: the events were counted where they were accepted or rejected
    assert changes.moved() == {REJECTED: {_labels(tenant="acme", reason=cause): 7}}


def test_each_429_counts_once_for_its_tenant_and_nothing_else_does():
    limiter = TenantRateLimiter(ApiSettings(rate_limits={"small": RateLimit(events_per_second=0.01, burst=10)}, default_rate_limit=None))
    name = "rtml_rate_limited_requests_total"
    changes = Changes(name)

    async def run() -> list[int]:
        statuses = []
        for tenant, events in [("small", 10), ("small", 1), ("small", 2), ("small", 11), ("anyone-else", 10_000)]:
            try:
                await limiter.take(tenant, events)
                statuses.append(200)
            except Refusal as refusal:
                statuses.append(refusal.status)
        return statuses

    assert asyncio.run(run()) == [200, 429, 429, 413, 200]
    assert changes.moved() == {name: {_labels(tenant="small"): 2}}


# HTTP answers ------------------------------------------------------------------------------------


def test_every_http_answer_counts_by_route_template_and_status_class():
    async def found(request: Request) -> JSONResponse:
        return JSONResponse({"id": request.path_params["model_id"]})

    async def refused(request: Request) -> JSONResponse:
        raise Refusal(429, "over the limit", 1.0)

    async def broken(request: Request) -> JSONResponse:
        raise RuntimeError("a bug")

    app = ingress_app([Route("/v1/models/{model_id}", found), Route("/v1/events", refused, methods=["POST"]), Route("/v1/broken", broken)])
    name = "rtml_api_requests_total"
    changes = Changes(name)
    with TestClient(app, raise_server_exceptions=False) as client:
        statuses = [
            client.get("/v1/models/m-1").status_code,
            client.get("/v1/models/m-2").status_code,
            client.post("/v1/events").status_code,
            client.get("/v1/events").status_code,  # a method the route does not take
            client.get("/v1/no-such-thing/42").status_code,
            client.get("/v1/broken").status_code,
        ]

    assert statuses == [200, 200, 429, 405, 404, 500]
    assert changes.moved() == {
        name: {
            _labels(route="/v1/models/{model_id}", status="2xx"): 2,
            _labels(route="/v1/events", status="4xx"): 2,
            _labels(route="unmatched", status="4xx"): 1,
            _labels(route="/v1/broken", status="5xx"): 1,
        }
    }


# lakehouse ---------------------------------------------------------------------------------------


def _events(count: int, start: int = 0, tenant: str = "acme") -> list[dict]:
    return [
        {"event_id": f"ev-{i}", "tenant": tenant, "entity": "pump-1", "data_type": "metric", "event_time": T0 + timedelta(seconds=i), "value": float(i)}
        for i in range(start, start + count)
    ]


CONFLICTS = "rtml_lakehouse_commit_conflicts_total"


def test_appends_count_their_new_rows_and_each_append(settings):
    lake = Lakehouse.open(settings)
    changes = Changes("rtml_lakehouse_rows_total", "rtml_lakehouse_append_seconds_count")
    lake.append_idempotent("events", _events(5))
    lake.append_idempotent("events", _events(5, start=3))  # two rows are there already
    assert changes.moved() == {
        "rtml_lakehouse_rows_total": {_labels(table="events"): 8},
        "rtml_lakehouse_append_seconds_count": {_labels(table="events"): 2},
    }


def _counting(load: Callable, runs: list[int]) -> Callable:
    """``load``, noting each call: each run of an append's unit of work loads the table once."""

    def counted():
        runs.append(1)
        return load()

    return counted


def test_a_commit_that_lost_a_race_counts_one_conflict_and_is_retried(settings):
    lake, other_writer = Lakehouse.open(settings), Lakehouse.open(settings)
    lake.append_idempotent("events", _events(1, start=100))
    runs: list[int] = []

    def load_then_lose_the_race():
        current = lake.table("events")
        if not runs:  # another writer commits after this unit read the table, before it commits
            other_writer.append_idempotent("events", _events(3, start=200))
        runs.append(1)
        return current

    changes = Changes(CONFLICTS)
    assert append_idempotent(load_then_lose_the_race, EVENTS, to_arrow(EVENTS, _events(4)), EVENTS.keys, settings.lakehouse.commit_retries) == 4
    assert len(runs) == 2
    assert changes.moved() == {CONFLICTS: {_labels(table="events"): 1}}
    assert lake.read("events").num_rows == 8


def test_two_writers_racing_count_one_conflict_per_retry(settings):
    Lakehouse.open(settings)  # the catalog and tables, before the writers open them
    changes = Changes(CONFLICTS)
    runs: list[list[int]] = [[], []]
    appends = [0, 0]
    failures: list[BaseException] = []

    def write(writer: int, first: int) -> None:
        try:
            lake = Lakehouse.open(settings)
            load = _counting(lambda: lake.table("events"), runs[writer])
            for start in range(first, first + 160, 20):  # many small commits, overlapping the other writer's
                append_idempotent(load, EVENTS, to_arrow(EVENTS, _events(20, start=start)), EVENTS.keys, settings.lakehouse.commit_retries)
                appends[writer] += 1
        except BaseException as error:
            failures.append(error)

    threads = [threading.Thread(target=write, args=(0, 0)), threading.Thread(target=write, args=(1, 80))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert not failures
    retries = sum(len(unit_runs) for unit_runs in runs) - sum(appends)
    assert changes.moved().get(CONFLICTS, {}).get(_labels(table="events"), 0) == retries
    stored = Lakehouse.open(settings).read("events", columns=("event_id",))["event_id"].to_pylist()
    assert sorted(stored) == sorted(f"ev-{i}" for i in range(240))


def test_a_writer_sets_the_small_files_gauge_to_the_current_snapshots_files_under_the_threshold(settings):
    lake = Lakehouse.open(settings)
    for start in range(3):
        lake.append_idempotent("events", _events(1, start=start))  # three one-row files
    lake.append_idempotent("events", _events(3000, start=1000))  # one far larger file
    sizes = lake.table("events").inspect.files()["file_size_in_bytes"].to_pylist()
    assert len(sizes) == 4
    # Small below the largest file's size: the three one-row files, and the writer's one below.
    threshold = max(sizes)
    counting = Lakehouse.open(settings.model_copy(update={"lakehouse": settings.lakehouse.model_copy(update={"compaction_small_file_bytes": threshold})}))
    with counting.writer("events") as writer:
        writer.submit(_events(1, start=10))
    assert REGISTRY.get_sample_value("rtml_lakehouse_small_files", {"table": "events"}) == 4
