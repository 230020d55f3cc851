"""`rtml bench api`: the API of the Serve app (``POST /v1/events``, ``/graphql`` over HTTP and
WebSocket) measured against the work underneath it done in-process.

1. Ingestion. JSON batches of ``--batch`` valid metric events (``ENTITIES`` entities of a tenant
   with trained models) posted to ``/v1/events``: (a) events/s at full speed from ``--clients``
   closed-loop clients; (b) per-batch latency at an offered rate of half of (a), open loop (each
   batch sent at its scheduled time whether or not the earlier ones were answered; its latency
   counts from that time, so queueing anywhere, the client's connection pool included, counts).
   Side by side (c): the same batches appended straight to the embedded event log
   (``streaming.eventlog.open_event_log_writer(settings).append``) in this process, one after
   another: what HTTP, Serve, parsing, validation and re-encoding add on top of the durable append.
2. GraphQL on the demo's lakehouse (``<home>/demo``, which ``rtml demo`` writes; the bench refuses
   to measure an empty one): the dashboard's main queries, ``--repeats`` times each, one at a time,
   through HTTP ``/graphql``, beside the same reads done directly (``Lakehouse.read`` + pyarrow /
   DuckDB in this process). The app is deployed over that home with ``run_stream`` off, and only
   reads: nothing is posted to it.
3. Subscription latency: a graphql-transport-ws client (``websockets``) subscribed to ``anomalies``
   while rounds of events with spikes are posted to ``/v1/events`` of an app whose stream is on
   (a fresh home, so that its stream has no backlog); per anomaly received, the delay from its
   prediction's ``createdAt`` (when the ensemble scored it) to its receipt.

The apps run on one fresh local Ray cluster in a child process started with the Serve
configuration ``rtml up`` uses (throughput mode and the HAProxy ingress, as ``rtml bench serve``
runs its "haproxy" configuration; Serve's own proxy when no haproxy binary can be had), sized like
``rtml up``'s cluster (``deployments.control.cluster_cpus``). Ingestion and subscription use fresh
homes under /tmp, removed at the end. Every figure is written with the exact command to
``benchmarks/RESULTS.md`` (``--write``).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from benchmarks.results import RESULTS_FILE, machine, write_section
from benchmarks.serve import RAY_ENVS, _free_port, _haproxy_of_its_own, _stats, cpu_seconds, cpu_spent

TENANT = "bench"  # the ingestion and subscription tenant (its models are trained on the fresh home)
TOKEN_TTL_S = 86400.0  # the bench's bearer tokens outlive any run
JSON_BODY = {"content-type": "application/json"}
KINDS = ("rnn", "cnn")
ENTITIES = 10
SPIKE = 500.0  # far outside the generated series (about 10 +- 3): the ensemble flags it
WAIT_S = 180.0  # bounded waits for the app (a busy 2-core machine)


@dataclass
class Timing:
    """Latencies of one kind of request: how many, p50/p99 in ms, and what failed."""

    count: int
    p50_ms: float
    p99_ms: float
    errors: int = 0

    @classmethod
    def of(cls, seconds: list[float], errors: int = 0) -> Timing:
        p50, p99 = _stats(seconds)
        return cls(len(seconds), p50, p99, errors)


@dataclass
class QueryFigures:
    name: str
    graphql: Timing
    direct: Timing
    graphql_rows: int  # rows (or windows, or models) the last answer held: both sides read the same
    direct_rows: int


@dataclass
class Figures:
    batch: int
    clients: int
    seconds: float
    full_events_per_s: float
    full: Timing  # per batch at full speed
    full_cpu_ms_per_batch: dict[str, float]  # the Ray cluster's CPU per batch, by process
    client_cpu_ms_per_batch: float
    offered_events_per_s: float
    half: Timing  # per batch at the offered half rate (open loop)
    raw_events_per_s: float
    raw: Timing  # per append of the same batches to the embedded log, in-process
    demo_home: str
    demo_tenant: str
    demo_predictions: int
    analytics_range: tuple[str, str]
    queries: list[QueryFigures]
    subscription: Timing  # createdAt -> received
    subscription_since_posted: Timing  # the round's POST acknowledged -> received
    subscription_expected: int  # spikes posted in the measured rounds
    ray_env: str
    host: str  # benchmarks.results.machine() when the run started
    load_after: float = float("nan")
    error_statuses: dict[str, int] = field(default_factory=dict)  # ingestion answers other than 202, by status
    notes: list[str] = field(default_factory=list)


# events ------------------------------------------------------------------------------------------


def metric_batch(prefix: str, index: int, size: int, start: datetime, entities: int = ENTITIES) -> list[dict[str, Any]]:
    """Batch ``index`` of ``size`` metric events, round-robin over ``entities`` entities, with
    event ids ``<prefix>-<index>-<n>`` and event times one second apart per entity from ``start``
    (batch after batch, so that each entity's series moves forward)."""
    rng = np.random.default_rng(index)
    values = 10.0 + 3.0 * np.sin((index * size + np.arange(size)) / 40.0) + rng.normal(0.0, 0.3, size)
    per_entity = -(-size // entities)
    return [
        {
            "event_id": f"{prefix}-{index}-{n}",
            "entity": f"sensor-{n % entities}",
            "event_time": (start + timedelta(seconds=index * per_entity + n // entities)).isoformat(),
            "value": float(values[n]),
        }
        for n in range(size)
    ]


def spiked_round(prefix: str, round_index: int, entities: int, normal: int, start: datetime, offset: int) -> list[dict[str, Any]]:
    """One subscription round: per entity ``normal`` ordinary readings and then one spike, its
    event times continuing each entity's series at ``offset`` seconds after ``start``."""
    rng = np.random.default_rng(1000 + round_index)
    events = []
    for entity in range(entities):
        for step in range(normal + 1):
            value = SPIKE if step == normal else 10.0 + 3.0 * np.sin((offset + step) / 12.0) + rng.normal(0.0, 0.3)
            events.append(
                {
                    "event_id": f"{prefix}-r{round_index}-e{entity}-{step}",
                    "entity": f"pump-{entity}",
                    "event_time": (start + timedelta(seconds=offset + step)).isoformat(),
                    "value": float(value),
                }
            )
    return events


# pure figures -------------------------------------------------------------------------------------


def open_loop_latencies(scheduled: list[float], answered: list[float | None]) -> tuple[list[float], int]:
    """Per-request latencies of an open-loop run, each from its scheduled send time (so that a
    server that falls behind shows its queue instead of slowing the sender), and the number of
    requests without an answer."""
    latencies = [done - due for due, done in zip(scheduled, answered) if done is not None]
    return latencies, sum(done is None for done in answered)


def subscription_delays(received: list[tuple[float, dict]], posted: dict[str, float]) -> tuple[list[float], list[float]]:
    """For each received anomaly (wall-clock receipt time, ``next`` payload) of a measured round,
    the round being the key of ``posted`` its event id starts with and the value the time its POST
    was acknowledged: seconds from its ``createdAt`` (scored) to receipt, and from that
    acknowledgement to receipt. Anomalies of no measured round (the warm-up) are left out."""
    since_scored, since_posted = [], []
    for at, payload in received:
        anomaly = payload["data"]["anomalies"]
        acknowledged = next((when for prefix, when in posted.items() if anomaly["eventId"].startswith(prefix)), None)
        if acknowledged is not None:
            since_scored.append(at - datetime.fromisoformat(anomaly["createdAt"]).timestamp())
            since_posted.append(at - acknowledged)
    return since_scored, since_posted


def last_hour(latest: datetime) -> tuple[datetime, datetime]:
    """The hour of data ending at the first whole minute after ``latest``."""
    end = latest.replace(second=0, microsecond=0) + timedelta(minutes=1)
    return end - timedelta(hours=1), end


# (c) the embedded log in-process -------------------------------------------------------------------


def measure_raw_log(batch: int, batches: int) -> tuple[float, Timing]:
    """Events/s and per-append latency of ``batches`` batches appended one after another to a
    fresh embedded event log, each as the Ingestor would append it (one record per event, keyed
    ``tenant/entity``); encoding the records is not timed."""
    from rtml.settings import Settings
    from streaming.eventlog import LogRecord, open_event_log_writer
    from streaming.sources.kafka import record_key

    home = tempfile.mkdtemp(prefix="rtml-bench-api-log-")
    try:
        writer = open_event_log_writer(Settings(home=home, streaming={"source": "log"}))
        start = datetime.now(timezone.utc)
        prepared = [
            [LogRecord(record_key(TENANT, e["entity"]), orjson.dumps({**e, "tenant": TENANT})) for e in metric_batch("raw", i, batch, start)]
            for i in range(batches)
        ]
        writer.append(TENANT, prepared[0])  # creates the log
        latencies = []
        started = time.perf_counter()
        for records in prepared[1:]:
            began = time.perf_counter()
            writer.append(TENANT, records)
            latencies.append(time.perf_counter() - began)
        elapsed = time.perf_counter() - started
        writer.close()
    finally:
        shutil.rmtree(home, ignore_errors=True)
    return len(latencies) * batch / elapsed, Timing.of(latencies)


# 2. the dashboard's queries --------------------------------------------------------------------------

ANOMALIES = "{ anomalies(first: 100) { edges { node { predictionId entity eventTime ensembleScore createdAt } } } }"
ANALYTICS = (
    "query($start: DateTime!, $end: DateTime!) { analytics(start: $start, end: $end, window: 60) "
    "{ start end count anomalies anomalyRate eventsPerSecond p50 p90 p99 } }"
)
ENTITY_PAGE = (
    "query($entity: String) { predictions(entity: $entity, first: 50) "
    "{ edges { cursor node { predictionId eventTime ensembleScore isAnomaly latencyMs } } pageInfo { hasNextPage endCursor } } }"
)
MODELS = "{ models { key kind status ensembleWeight createdAt metrics { name value } } ensemble { members { model weight } generation } }"


def _answer_rows(name: str, data: dict) -> int:
    if name == "models":
        return len(data["models"])
    if name == "analytics":
        return len(data["analytics"])
    return len(data["anomalies" if name == "anomalies" else "predictions"]["edges"])


def graphql_queries(entity: str, start: datetime, end: datetime) -> dict[str, tuple[str, dict]]:
    """The dashboard's main queries by name, with their variables."""
    return {
        "anomalies": (ANOMALIES, {}),
        "analytics": (ANALYTICS, {"start": start.isoformat(), "end": end.isoformat()}),
        "entity page": (ENTITY_PAGE, {"entity": entity}),
        "models": (MODELS, {}),
    }


def direct_reads(lake, tenant: str, entity: str, start: datetime, end: datetime) -> dict[str, Any]:
    """The same reads as ``graphql_queries``, done with pyiceberg (``Lakehouse.read``) and
    pyarrow / DuckDB in this process; each returns its row count."""
    import duckdb
    from pyiceberg.expressions import EqualTo

    database = duckdb.connect(":memory:")
    newest = [("event_time", "descending"), ("prediction_id", "descending")]

    def anomalies() -> int:
        rows = lake.read(
            "predictions", tenant=tenant, where=EqualTo("is_anomaly", True), columns=("prediction_id", "entity", "event_time", "ensemble_score", "created_at")
        )
        return len(rows.sort_by(newest).slice(0, 100).to_pylist())

    def analytics() -> int:
        rows = lake.read("predictions", tenant=tenant, start=start, end=end, columns=("event_time", "ensemble_score", "is_anomaly"))
        with database.cursor() as cursor:
            cursor.register("rows", rows)
            windows = cursor.execute(
                "SELECT time_bucket(INTERVAL 60 SECOND, event_time, $start) AS window_start, count(*), count(*) FILTER (WHERE is_anomaly), "
                "quantile_cont(ensemble_score, [0.5, 0.9, 0.99]) FROM rows GROUP BY window_start ORDER BY window_start",
                {"start": start},
            ).fetchall()
        return len(windows)

    def entity_page() -> int:
        rows = lake.read(
            "predictions", tenant=tenant, where=EqualTo("entity", entity), columns=("prediction_id", "event_time", "ensemble_score", "is_anomaly", "latency_ms")
        )
        return len(rows.sort_by(newest).slice(0, 51).to_pylist()[:50])

    def models() -> int:
        versions = lake.registry.list(tenant=tenant)
        weights = {model.key: model.ensemble_weight for model in lake.registry.active(tenant)}
        return len(versions) if weights else 0  # 0: no ensemble to report, unlike the GraphQL answer

    return {"anomalies": anomalies, "analytics": analytics, "entity page": entity_page, "models": models}


def repeat(work, repeats: int, warmup: int = 3) -> tuple[Timing, Any]:
    """``work()`` ``warmup`` times unmeasured, then ``repeats`` times; its timing and last result."""
    for _ in range(warmup):
        result = work()
    latencies = []
    for _ in range(repeats):
        began = time.perf_counter()
        result = work()
        latencies.append(time.perf_counter() - began)
    return Timing.of(latencies), result


def demo_lakehouse(demo_home: Path):
    """The demo's settings, its busiest tenant, that tenant's first entity and the hour of its
    latest predictions; an error saying how to make one when ``demo_home`` has no predictions."""
    import pyarrow.compute as pc

    from lakehouse import Lakehouse
    from rtml.errors import RtmlError
    from rtml.settings import Settings

    catalog = demo_home / "lakehouse" / "catalog.db"
    if not catalog.exists():
        raise RtmlError(f"no demo lakehouse in {demo_home}: run `rtml demo` first (it writes one there), or pass --demo-home")
    settings = Settings(home=demo_home.resolve(), lakehouse={"catalog_uri": "", "warehouse": ""})
    lake = Lakehouse.open(settings)
    rows = lake.read("predictions", columns=("tenant", "entity", "event_time", "is_anomaly"))
    anomalous = rows.filter(rows["is_anomaly"])
    if anomalous.num_rows == 0:
        raise RtmlError(f"the demo lakehouse in {demo_home} has no anomalies to read ({rows.num_rows} predictions): run `rtml demo` again")
    counts = anomalous.group_by("tenant").aggregate([("tenant", "count")]).sort_by([("tenant_count", "descending")])
    tenant = counts["tenant"][0].as_py()
    own = rows.filter(pc.equal(rows["tenant"], tenant))
    entity = sorted(set(own["entity"].to_pylist()))[0]
    start, end = last_hour(pc.max(own["event_time"]).as_py())
    return settings, lake, tenant, entity, start, end, rows.num_rows


def measure_direct(demo_home: Path, repeats: int) -> dict[str, Any]:
    settings, lake, tenant, entity, start, end, count = demo_lakehouse(demo_home)
    measured = {name: repeat(read, repeats) for name, read in direct_reads(lake, tenant, entity, start, end).items()}
    return {"tenant": tenant, "entity": entity, "start": start, "end": end, "predictions": count, "measured": measured}


# the apps (child process) -----------------------------------------------------------------------------


def _shared_security(security, secrets_dir: Path):
    """``security`` reading its secrets from ``secrets_dir``, into which a fresh P-256 signing key is
    written: every app given it verifies the tokens of one ``TokenAuthority``, whatever its home."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from security.tokens import SIGNING_KEY_SECRET

    security = security.model_copy(update={"secrets_provider": "file", "secrets_dir": str(secrets_dir.resolve())})
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    path = secrets_dir / SIGNING_KEY_SECRET.format(kid=security.jwt_key_id)
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as file:
        file.write(pem)
    return security


def _bearer(token: str) -> dict[str, str]:
    """The headers (or ``connection_init`` payload) of a request made with ``token``."""
    return {"authorization": f"Bearer {token}"}


def _bench_settings(home: Path, app_name: str, port: int, run_stream: bool, kinds: tuple[str, ...], security):
    from rtml.settings import Settings

    return Settings(
        home=home.resolve(),
        security=security,
        # No rate limit: full speed must measure the server, not the tenant's limit (50,000 events/s
        # by default, which the first runs of this bench met: answers of 429).
        api={"default_rate_limit": None},
        streaming={"source": "log"},
        serving={"http_port": port, "model_kinds": list(kinds), "run_stream": run_stream, "app_name": app_name},
    )


def _wait_until_serving(base: str, token: str) -> None:
    import httpx

    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        try:
            answer = httpx.post(f"{base}/graphql", json={"query": "{ tenant }"}, headers=_bearer(token), timeout=10)
            if answer.status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{base}/graphql did not answer within {WAIT_S:.0f}s")


def measure_graphql(base: str, token: str, queries: dict[str, tuple[str, dict]], repeats: int) -> dict[str, tuple[Timing, int]]:
    import httpx

    results = {}
    with httpx.Client(headers=_bearer(token), timeout=60) as client:
        for name, (query, variables) in queries.items():

            def ask(query=query, variables=variables) -> dict:
                answer = client.post(f"{base}/graphql", json={"query": query, "variables": variables})
                document = answer.json()
                if answer.status_code != 200 or document.get("errors"):
                    raise RuntimeError(f"GraphQL {name!r} failed ({answer.status_code}): {document.get('errors') or document}")
                return document["data"]

            timing, data = repeat(ask, repeats)
            results[name] = (timing, _answer_rows(name, data))
    return results


async def _post_batches(url: str, token: str, bodies: list[bytes], clients: int, seconds: float, warmup_s: float) -> tuple[list[float], dict[str, int], float]:
    """Closed loop: ``clients`` clients post the bodies round-robin for ``warmup_s`` + ``seconds``;
    the latencies, the answers other than 202 by status, and the elapsed seconds of the measured part."""
    import aiohttp

    latencies: list[float] = []
    errors: dict[str, int] = {}
    state = {"next": 0, "measuring": False}
    headers = JSON_BODY | _bearer(token)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients), timeout=aiohttp.ClientTimeout(total=60)) as session:
        stop_at = time.perf_counter() + warmup_s + seconds

        async def client() -> None:
            while (began := time.perf_counter()) < stop_at:
                body = bodies[state["next"] % len(bodies)]
                state["next"] += 1
                try:
                    async with session.post(url, data=body, headers=headers) as answer:
                        await answer.read()
                        status = str(answer.status)
                except aiohttp.ClientError as error:
                    status = type(error).__name__
                if state["measuring"]:
                    if status == "202":
                        latencies.append(time.perf_counter() - began)
                    else:
                        errors[status] = errors.get(status, 0) + 1

        tasks = [asyncio.create_task(client()) for _ in range(clients)]
        await asyncio.sleep(warmup_s)
        state["measuring"] = True
        started = time.perf_counter()
        await asyncio.gather(*tasks)
        return latencies, errors, time.perf_counter() - started


async def _offer_batches(url: str, token: str, bodies: list[bytes], batches_per_s: float, seconds: float) -> tuple[list[float], int]:
    """Open loop: one batch every 1 / ``batches_per_s`` seconds for ``seconds``, each sent at its
    time on its own task; latencies from the scheduled times (``open_loop_latencies``)."""
    import aiohttp

    count = max(1, int(batches_per_s * seconds))
    headers = JSON_BODY | _bearer(token)
    answered: list[float | None] = [None] * count
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64), timeout=aiohttp.ClientTimeout(total=60)) as session:
        started = time.perf_counter() + 0.1
        scheduled = [started + i / batches_per_s for i in range(count)]

        async def send(i: int) -> None:
            try:
                async with session.post(url, data=bodies[i % len(bodies)], headers=headers) as answer:
                    await answer.read()
                    if answer.status == 202:
                        answered[i] = time.perf_counter()
            except aiohttp.ClientError:
                pass

        tasks = []
        for i, due in enumerate(scheduled):
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            tasks.append(asyncio.create_task(send(i)))
        await asyncio.gather(*tasks)
    return open_loop_latencies(scheduled, answered)


def measure_ingestion(base: str, token: str, batch: int, clients: int, seconds: float) -> dict[str, Any]:
    start = datetime.now(timezone.utc) - timedelta(days=1)
    bodies = [orjson.dumps(metric_batch("http", i, batch, start)) for i in range(64)]
    url = f"{base}/v1/events"
    warmup_s = min(3.0, seconds / 3)
    before = cpu_seconds(os.getpid())
    client_started = time.process_time()
    latencies, errors, elapsed = asyncio.run(_post_batches(url, token, bodies, clients, seconds, warmup_s))
    client_cpu = (time.process_time() - client_started) * seconds / (seconds + warmup_s)
    spent = cpu_spent(before, cpu_seconds(os.getpid()))  # includes the warm-up: scaled like the client's
    batches = max(len(latencies), 1)
    scale = seconds / (seconds + warmup_s)
    cpu = {name.removeprefix("ray::"): round(1000.0 * used * scale / batches, 2) for name, used in list(spent.items())[:6]}
    events_per_s = len(latencies) * batch / elapsed
    offered = events_per_s / 2
    half, missed = asyncio.run(_offer_batches(url, token, bodies, offered / batch, seconds))
    return {
        "full_events_per_s": events_per_s,
        "full": asdict(Timing.of(latencies, sum(errors.values()))),
        "error_statuses": errors,
        "full_cpu_ms_per_batch": cpu,
        "client_cpu_ms_per_batch": 1000.0 * client_cpu / batches,
        "offered_events_per_s": offered,
        "half": asdict(Timing.of(half, missed)),
    }


async def _subscribe_and_post(base: str, reader: str, writer: str, rounds: int, entities: int, history: int, normal: int) -> tuple[list[tuple[float, dict]], dict[str, float], int]:
    import aiohttp
    import websockets

    ws_url = base.replace("http://", "ws://") + "/graphql"
    query = "subscription { anomalies { predictionId eventId entity createdAt } }"
    received: list[tuple[float, dict]] = []
    posted: dict[str, float] = {}  # a measured round's event-id prefix -> its POST acknowledged
    start = datetime.now(timezone.utc) - timedelta(seconds=history + rounds * (normal + 1) + 60)
    headers = JSON_BODY | _bearer(writer)
    async with websockets.connect(ws_url, subprotocols=["graphql-transport-ws"]) as socket:
        await socket.send(json.dumps({"type": "connection_init", "payload": _bearer(reader)}))
        if json.loads(await socket.recv())["type"] != "connection_ack":
            raise RuntimeError("the subscription was not acknowledged")
        await socket.send(json.dumps({"id": "1", "type": "subscribe", "payload": {"query": query}}))

        async def listen() -> None:
            async for message in socket:
                frame = json.loads(message)
                if frame["type"] == "ping":
                    await socket.send(json.dumps({"type": "pong"}))
                elif frame["type"] == "next":
                    received.append((time.time(), frame["payload"]))
                elif frame["type"] in ("error", "complete"):
                    raise RuntimeError(f"the subscription ended: {frame}")

        listening = asyncio.create_task(listen())
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:

            async def post(events: list[dict]) -> None:
                async with session.post(f"{base}/v1/events", data=orjson.dumps(events), headers=headers) as answer:
                    if answer.status != 202:
                        raise RuntimeError(f"/v1/events answered {answer.status}: {await answer.text()}")

            # Warm-up (not measured): each entity's history and a spike, so that windows are full and
            # every model, the sink and the feed have done their first work; then one round per second.
            await post(spiked_round("warm", 0, entities, history, start, 0))
            await _scored(session, base, reader, f"pump-{entities - 1}", f"warm-r0-e{entities - 1}-{history}")
            for index in range(rounds):
                await post(spiked_round("measured", index, entities, normal, start, history + 1 + index * (normal + 1)))
                posted[f"measured-r{index}-"] = time.time()
                await asyncio.sleep(1.0)
            await _scored(session, base, reader, f"pump-{entities - 1}", f"measured-r{rounds - 1}-e{entities - 1}-{normal}")
            await asyncio.sleep(3.0)  # the feed items of the last commit
        listening.cancel()
    return received, posted, rounds * entities


async def _scored(session, base: str, token: str, entity: str, event_id: str) -> None:
    """Wait until the app's stream has scored ``event_id`` (``entity``'s newest event) and made it
    durable, as GraphQL reads it."""
    query = {"query": "query($e: String) { predictions(entity: $e, first: 1) { edges { node { eventId } } } }", "variables": {"e": entity}}
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        async with session.post(f"{base}/graphql", json=query, headers=_bearer(token)) as answer:
            edges = (await answer.json())["data"]["predictions"]["edges"] if answer.status == 200 else []
        if edges and edges[0]["node"]["eventId"] == event_id:
            return
        await asyncio.sleep(0.5)
    raise RuntimeError(f"the app's stream did not score {event_id} within {WAIT_S:.0f}s")


def run_apps(demo_home: Path, clients: int, seconds: float, batch: int, repeats: int, rounds: int) -> dict[str, Any]:
    """Every HTTP figure, on one fresh local Ray cluster (this process is the child of ``run``)."""
    import ray
    from ray import serve

    from deployments import control
    from deployments.demo_models import ensure_demo_tenant
    from lakehouse import Lakehouse
    from security.tokens import TokenAuthority
    from streaming.demo import DEMO_KINDS

    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    demo_settings, _, tenant, entity, start, end, _ = demo_lakehouse(demo_home)
    ingest_home, stream_home, secrets_dir = (Path(tempfile.mkdtemp(prefix=f"rtml-bench-api-{name}-")) for name in ("ingest", "stream", "secrets"))
    security = _shared_security(demo_settings.security, secrets_dir)  # one key: every app verifies the tokens below
    serving = {"http_port": port, "model_kinds": DEMO_KINDS, "run_stream": False, "app_name": "rtml-bench-api-demo"}
    demo = demo_settings.model_copy(update={"serving": demo_settings.serving.model_copy(update=serving), "security": security})
    ingest = _bench_settings(ingest_home, "rtml-bench-api-ingest", port, False, KINDS, security)
    stream = _bench_settings(stream_home, "rtml-bench-api-stream", port, True, KINDS, security)
    authority = TokenAuthority(demo)
    demo_reader, reader, writer = (
        authority.issue(who, role, subject="rtml-bench-api", ttl_s=TOKEN_TTL_S) for who, role in ((tenant, "reader"), (TENANT, "reader"), (TENANT, "writer"))
    )
    models = ensure_demo_tenant(Lakehouse.open(ingest), ingest_home / "models", ingest.models.window_length, tenant=TENANT, kinds=KINDS)
    registry = Lakehouse.open(stream).registry
    for model in models:
        registered = registry.register(model)
        registry.promote(registered.name, registered.version)
    figures: dict[str, Any] = {}
    ray.init(num_cpus=control.cluster_cpus(stream), include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        control.deploy(demo)
        _wait_until_serving(base, demo_reader)
        figures["graphql"] = {
            name: (asdict(timing), rows) for name, (timing, rows) in measure_graphql(base, demo_reader, graphql_queries(entity, start, end), repeats).items()
        }
        serve.delete(demo.serving.app_name)
        control.deploy(ingest)
        _wait_until_serving(base, reader)
        figures["ingestion"] = measure_ingestion(base, writer, batch, clients, seconds)
        serve.delete(ingest.serving.app_name)
        control.deploy(stream)
        _wait_until_serving(base, reader)
        received, posted, expected = asyncio.run(_subscribe_and_post(base, reader, writer, rounds, 4, stream.models.window_length + 16, 10))
        since_scored, since_posted = subscription_delays(received, posted)
        figures["subscription"] = {"since_scored": since_scored, "since_posted": since_posted, "expected": expected}
    finally:
        serve.shutdown()
        ray.shutdown()
        for home in (ingest_home, stream_home, secrets_dir):
            shutil.rmtree(home, ignore_errors=True)
    return figures


# the whole benchmark ---------------------------------------------------------------------------------


def run(demo_home: Path, clients: int, seconds: float, batch: int, repeats: int, rounds: int, ray_env: str, progress=print) -> Figures:
    host = machine()
    progress(f"(c) the embedded event log in-process: batches of {batch}")
    raw_rate, raw = measure_raw_log(batch, max(50, int(seconds * 20)))
    progress(f"2. the same reads directly on the demo's lakehouse ({demo_home}), {repeats} repeats each")
    direct = measure_direct(demo_home, repeats)
    progress(f"the app over HTTP on a fresh Ray cluster ({ray_env!r} Serve settings): GraphQL, ingestion, subscription")
    command = [sys.executable, "-m", "benchmarks.api", "--child", json.dumps([str(demo_home), clients, seconds, batch, repeats, rounds])]
    haproxy = _haproxy_of_its_own(ray_env)
    try:
        child = subprocess.run(command, env={**os.environ, **RAY_ENVS[ray_env], **haproxy}, capture_output=True, text=True)
    finally:
        if "RAY_SERVE_HAPROXY_SERVER_STATE_BASE" in haproxy:  # the run's own HAProxy files
            shutil.rmtree(haproxy["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"], ignore_errors=True)
    if child.returncode != 0:
        from rtml.errors import RtmlError

        raise RtmlError(f"the app's part of the benchmark failed:\n{child.stderr[-4000:]}")
    http = json.loads(child.stdout.strip().splitlines()[-1])
    ingestion = http["ingestion"]
    queries = [
        QueryFigures(name, Timing(**http["graphql"][name][0]), timing, http["graphql"][name][1], rows)
        for name, (timing, rows) in direct["measured"].items()
    ]
    return Figures(
        batch=batch,
        clients=clients,
        seconds=seconds,
        full_events_per_s=ingestion["full_events_per_s"],
        full=Timing(**ingestion["full"]),
        full_cpu_ms_per_batch=ingestion["full_cpu_ms_per_batch"],
        client_cpu_ms_per_batch=ingestion["client_cpu_ms_per_batch"],
        offered_events_per_s=ingestion["offered_events_per_s"],
        half=Timing(**ingestion["half"]),
        raw_events_per_s=raw_rate,
        raw=raw,
        demo_home=str(demo_home),
        demo_tenant=direct["tenant"],
        demo_predictions=direct["predictions"],
        analytics_range=(direct["start"].isoformat(), direct["end"].isoformat()),
        queries=queries,
        subscription=Timing.of(http["subscription"]["since_scored"]),
        subscription_since_posted=Timing.of(http["subscription"]["since_posted"]),
        subscription_expected=http["subscription"]["expected"],
        ray_env=ray_env,
        host=host,
        load_after=os.getloadavg()[0],
        error_statuses=ingestion["error_statuses"],
    )


def _child(argv: list[str]) -> None:
    demo_home, clients, seconds, batch, repeats, rounds = json.loads(argv[0])
    print(json.dumps(run_apps(Path(demo_home), clients, seconds, batch, repeats, rounds), default=str))


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--child":
    _child(sys.argv[2:])


def _ms(timing: Timing) -> str:
    return f"{timing.p50_ms:,.1f} | {timing.p99_ms:,.1f}"


def _errors(count: int, statuses: dict[str, int]) -> str:
    return f"{count} ({', '.join(f'{status}: {n}' for status, n in statuses.items())})" if statuses else str(count)


def report(f: Figures, command: str) -> str:
    """The ``api`` section of benchmarks/RESULTS.md."""
    serve_mode = "Serve's throughput mode behind HAProxy, as `rtml up` runs it" if f.ray_env == "haproxy" else f"Serve settings {f.ray_env!r}"
    query_rows = [
        f"| {q.name} | {_ms(q.graphql)} | {_ms(q.direct)} | {q.graphql_rows} / {q.direct_rows} | {q.graphql.count} |" for q in f.queries
    ]
    cpu = ", ".join(f"{name} {ms:g}" for name, ms in f.full_cpu_ms_per_batch.items())
    return "\n".join(
        [
            "## API: ingestion, GraphQL and subscriptions through the Serve app (`rtml bench api`)",
            "",
            f"Command: `{command}`",
            f"Machine: {f.host}; load average {f.load_after:.1f} at the end (the machine is shared). "
            f"The app: {serve_mode}, one Ingress replica, on a fresh local Ray cluster; the HTTP clients run on the same cores.",
            "",
            f"### Ingestion: `POST /v1/events`, JSON batches of {f.batch} metric events ({ENTITIES} entities of a tenant with trained models)",
            "",
            "| system | load | events/s | p50 ms per batch | p99 ms per batch | batches | errors |",
            "|---|---|---:|---:|---:|---:|---:|",
            f"| HTTP `/v1/events` (parse, validate, route, durable append) | full speed, {f.clients} closed-loop clients | {f.full_events_per_s:,.0f} | {_ms(f.full)} | {f.full.count} | {_errors(f.full.errors, f.error_statuses)} |",
            f"| HTTP `/v1/events` | open loop at half that: {f.offered_events_per_s:,.0f} events/s offered | {f.offered_events_per_s:,.0f} | {_ms(f.half)} | {f.half.count} | {f.half.errors} |",
            f"| the same batches appended to the embedded event log in-process (`open_event_log_writer(settings).append`) | one after another | {f.raw_events_per_s:,.0f} | {_ms(f.raw)} | {f.raw.count} | 0 |",
            "",
            f"Targets: at least 20,000 events/s, and p99 at most 50 ms per batch at half that rate. "
            f"Open-loop latencies count from each batch's scheduled send time. Full speed ran {f.seconds:g} s after a warm-up, "
            f"with the app's stream off (nothing consumed the log meanwhile). CPU ms per batch at full speed, by process: {cpu}; "
            f"the load generator {f.client_cpu_ms_per_batch:.2f}.",
            "",
            f"### GraphQL on the demo's lakehouse (`{f.demo_home}`: {f.demo_predictions:,} predictions; tenant `{f.demo_tenant}`)",
            "",
            "The dashboard's main queries, one at a time, through HTTP `/graphql` of the app deployed over that home (stream off, "
            "read-only), beside the same reads done directly: `Lakehouse.read` (pyiceberg) + pyarrow / DuckDB in one process. "
            f"Analytics: one hour, {f.analytics_range[0]} to {f.analytics_range[1]}, 60 s windows.",
            "",
            "| query | GraphQL p50 ms | GraphQL p99 ms | direct p50 ms | direct p99 ms | rows (GraphQL / direct) | repeats |",
            "|---|---:|---:|---:|---:|---:|---:|",
            *query_rows,
            "",
            "Queries: anomalies = `anomalies(first: 100)` (newest first); analytics = `analytics(start, end, window: 60)`; "
            "entity page = `predictions(entity, first: 50)` of one entity; models = `models` with `ensemble` (the running router's weights). "
            "Targets: anomalies and analytics each p99 at most 100 ms.",
            "",
            "### Subscription: `anomalies` over graphql-transport-ws",
            "",
            "| delay to receipt | anomalies received | spikes posted | p50 ms | p99 ms |",
            "|---|---:|---:|---:|---:|",
            f"| from the prediction's `createdAt` (scored) | {f.subscription.count} | {f.subscription_expected} | {_ms(f.subscription)} |",
            f"| from its round's `POST /v1/events` answered (durable in the log) | {f.subscription_since_posted.count} | {f.subscription_expected} | {_ms(f.subscription_since_posted)} |",
            "",
            "A `websockets` client through HAProxy, subscribed to `anomalies`; rounds of events posted to `/v1/events` of an app with "
            "its stream on (a fresh home), one round a second, each with 10 ordinary readings and then a spike per entity (4 entities); "
            "the readings after a spike are flagged too while it is in their window, so more anomalies arrive than spikes were posted. "
            "`createdAt` is taken by the stream's consumer when the ensemble's scores come back. Target: at most 500 ms from scored.",
            *([""] + [f"Note: {note}" for note in f.notes] if f.notes else []),
        ]
    )


def main(demo_home: Path | None, clients: int, seconds: float, batch: int, repeats: int, rounds: int, write: bool, console) -> Figures:
    from deployments.control import ensure_haproxy
    from rtml.settings import get_settings

    demo_home = demo_home or get_settings().home_dir / "demo"
    ray_env, notes = "haproxy", []
    problem = ensure_haproxy()
    if problem:
        ray_env = "throughput"
        notes.append(f"HAProxy is off ({problem}): Serve's own proxy served the requests")
        console.print(f"[yellow]note:[/] {notes[-1]}")
    figures = run(demo_home, clients, seconds, batch, repeats, rounds, ray_env, progress=console.print)
    figures.notes.extend(notes)
    command = f"rtml bench api --demo-home {demo_home} --clients {clients} --seconds {seconds:g} --batch {batch} --repeats {repeats} --rounds {rounds}"
    text = report(figures, command + (" --write" if write else ""))
    console.print(text)
    if write:
        write_section("api", text)
        console.print(f"written to {RESULTS_FILE}")
    return figures
