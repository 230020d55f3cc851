"""(d) of `rtml bench stream`: the stock pipeline, as a user writes it from the kafka-python, Ray
Serve and pyiceberg docs, for rtml's whole stream path to be compared against.

In the bench process, a plain ``KafkaConsumer`` (its own consumer group, offsets committed by hand)
polls the same topic as (b). For each polled batch it decodes each record's JSON (``json.loads``),
builds each event's window of ``models.window_length`` values the simple way (a dict of deques per
``(tenant, entity)``; a key's first window is its first value repeated, as rtml's windows are),
POSTs the batch's windows as JSON to a stock Ray Serve app over HTTP (``requests``, through Serve's
HTTP proxy), appends the predictions to an Iceberg table (``table.append(pyarrow_table)``) in its
own SQL catalog on SQLite, and commits the consumer's offsets after the append.

The Serve app is one ``@serve.deployment`` whose ``__call__`` takes the Starlette request, as the
Serve quickstart shows; it loads ONE of the bench tenant's trained models (``load_scorer``) and
scores the posted windows. As in ``benchmarks.serve_stock_app``: a fractional CPU so that it fits
beside rtml's app on a small machine, and one torch thread. Its own app name and route prefix, so
that it does not touch the rtml app deployed on the same cluster.

Nothing rtml-specific: no ensemble, no per-entity detector, no features or events tables, no
idempotent keys, no checkpoints. It does less work per event than (b), so (b)/(d) understates what
rtml's path gains per unit of work.
"""

from __future__ import annotations

import json
import os
import time
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch
from ray import serve
from starlette.requests import Request

from models.scoring import load_scorer

APP_NAME = "stock-stream"
ROUTE_PREFIX = "/stock-stream"
NAMESPACE = "stock"
TABLE = "stock.predictions"
THRESHOLD = 0.5


@serve.deployment(ray_actor_options={"num_cpus": 0.25})
class StockScorer:
    def __init__(self, artifact_uri: str):
        torch.set_num_threads(1)
        self.scorer = load_scorer(artifact_uri)

    async def __call__(self, request: Request) -> dict:
        body = await request.json()
        windows = np.asarray(body["windows"], dtype=np.float32)
        scores = self.scorer.score(windows)
        return {"scores": scores.tolist()}


@dataclass
class StockFigures:
    events: int
    events_per_s: float
    rows: int
    distinct_rows: int
    batches: int
    model: str  # the one model the stock app serves
    seconds: dict  # where the bench process's loop spent its time
    cpu_s: dict  # CPU seconds by process during the run (the bench process included)


def run_stock(settings, artifact_uri: str, model: str, topic: str, count: int, console) -> StockFigures:
    """Deploy the stock app, consume ``count`` events of ``topic`` through it into Iceberg, and
    check that the table holds one row per event. The app is deleted afterwards."""
    import pyarrow as pa
    import requests
    from kafka import ConsumerRebalanceListener, KafkaConsumer
    from pyiceberg.catalog.sql import SqlCatalog

    from benchmarks.serve import cpu_seconds, cpu_spent

    window_length = settings.models.window_length
    serve.run(StockScorer.bind(artifact_uri), name=APP_NAME, route_prefix=ROUTE_PREFIX)
    url = f"http://127.0.0.1:{settings.serving.http_port}{ROUTE_PREFIX}"
    session = requests.Session()
    try:
        warm = session.post(url, json={"windows": [[0.0] * window_length]}, timeout=60)
        warm.raise_for_status()

        root = settings.home_dir / "stock-stream"
        (root / "warehouse").mkdir(parents=True, exist_ok=True)
        catalog = SqlCatalog(NAMESPACE, uri=f"sqlite:///{root / 'catalog.db'}", warehouse=(root / "warehouse").as_uri())
        catalog.create_namespace_if_not_exists(NAMESPACE)
        schema = pa.schema(
            [
                pa.field("event_id", pa.string()),
                pa.field("tenant", pa.string()),
                pa.field("entity", pa.string()),
                pa.field("event_time", pa.float64()),
                pa.field("score", pa.float64()),
                pa.field("is_anomaly", pa.bool_()),
            ]
        )
        table = catalog.create_table(TABLE, schema=schema)

        started: list[float] = []

        class _Assigned(ConsumerRebalanceListener):
            def on_partitions_assigned(self, assigned):
                if not started:
                    started.append(time.perf_counter())

            def on_partitions_revoked(self, revoked):
                pass

        consumer = KafkaConsumer(
            bootstrap_servers=settings.kafka.bootstrap_servers,
            group_id=f"{topic}.stock",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=settings.streaming.max_poll_records,
            value_deserializer=json.loads,
        )
        consumer.subscribe([topic], listener=_Assigned())
        windows: dict[tuple[str, str], deque] = {}
        seconds = {"poll+decode": 0.0, "windows": 0.0, "post": 0.0, "append": 0.0, "commit": 0.0}
        done = batches = 0
        finished = 0.0
        cpu_before, own_before = cpu_seconds(os.getpid()), _own_cpu()
        console.print(f"(d) stock pipeline: kafka-python -> Ray Serve over HTTP ({model}) -> pyiceberg")
        while done < count:
            mark = time.perf_counter()
            polled = consumer.poll(timeout_ms=1000)
            records = [record for partition in polled.values() for record in partition]
            seconds["poll+decode"] += time.perf_counter() - mark
            if not records:
                continue
            mark = time.perf_counter()
            events = [record.value for record in records]
            batch = []
            for event in events:
                key = (event["tenant"], event["entity"])
                window = windows.get(key)
                if window is None:
                    window = windows[key] = deque([event["value"]] * window_length, maxlen=window_length)
                else:
                    window.append(event["value"])
                batch.append(list(window))
            windows_done = time.perf_counter()
            response = session.post(url, json={"windows": batch}, timeout=60)
            response.raise_for_status()
            scores = response.json()["scores"]
            posted = time.perf_counter()
            table.append(
                pa.table(
                    {
                        "event_id": [event["event_id"] for event in events],
                        "tenant": [event["tenant"] for event in events],
                        "entity": [event["entity"] for event in events],
                        "event_time": [float(event["event_time"]) for event in events],
                        "score": scores,
                        "is_anomaly": [score >= THRESHOLD for score in scores],
                    },
                    schema=schema,
                )
            )
            appended = time.perf_counter()
            consumer.commit()
            committed = time.perf_counter()
            seconds["windows"] += windows_done - mark
            seconds["post"] += posted - windows_done
            seconds["append"] += appended - posted
            seconds["commit"] += committed - appended
            finished = appended
            done += len(records)
            batches += 1
        cpu = cpu_spent(cpu_before, cpu_seconds(os.getpid()))
        cpu = {"bench process (consumer)": _own_cpu() - own_before, **cpu}
        consumer.close()
        rows = catalog.load_table(TABLE).scan(selected_fields=("event_id",)).to_arrow()
        distinct = len(set(rows["event_id"].to_pylist()))
        return StockFigures(
            events=done,
            events_per_s=done / (finished - started[0]),
            rows=rows.num_rows,
            distinct_rows=distinct,
            batches=batches,
            model=model,
            seconds={stage: round(spent, 1) for stage, spent in seconds.items()},
            cpu_s={name.removeprefix("ray::"): round(spent, 1) for name, spent in cpu.items() if spent >= 0.05},
        )
    finally:
        session.close()
        serve.delete(APP_NAME)


def _own_cpu() -> float:
    """CPU seconds (user + system, all threads) of this process so far."""
    times = os.times()
    return times.user + times.system
