"""`rtml bench lakehouse`: what one idempotent append costs as a table's history grows.

A stream's sink appends each of its tables once per flush (``lakehouse.writer_flush_seconds``), so
a table collects a snapshot a second. This writes ``--commits`` batches of ``--rows`` event rows
(two tenants, event time moving on like a stream's) to the ``events`` table of a fresh embedded
lakehouse through ``Lakehouse.writer``, as the sink does, flushing after each batch so that each is
one idempotent append (with whatever upkeep the writer does after it), and reports how long each
took as the history grew, with what the table holds at that point: retained snapshots, manifests in
the current snapshot and the size of the metadata file every commit rewrites. Nothing else runs
meanwhile.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import numpy as np
import pyarrow as pa

from benchmarks.results import machine, write_section
from rtml.settings import get_settings

TENANTS = ("bench-a", "bench-b")
ENTITIES = 50
STEPS = 10  # report points


@dataclass
class Point:
    commits: int  # appends made so far
    mean_ms: float  # of the appends since the previous point
    max_ms: float
    snapshots: int
    manifests: int
    metadata_bytes: int


def _batch(round_: int, rows: int, start: datetime) -> pa.Table:
    """``rows`` events of the round, event times a second apart per entity."""
    index = np.arange(rows)
    per_step = len(TENANTS) * ENTITIES
    times = [start + timedelta(seconds=int(step)) for step in (round_ * rows + index) // per_step]
    return pa.table(
        {
            "event_id": [f"r{round_}-{i}" for i in index],
            "tenant": [TENANTS[i % len(TENANTS)] for i in index],
            "entity": [f"sensor-{(i // len(TENANTS)) % ENTITIES}" for i in index],
            "event_time": pa.array(times, pa.timestamp("us", tz="UTC")),
            "data_type": ["metric"] * rows,
            "value": np.random.default_rng(round_).normal(size=rows),
        }
    )


def _shape(lake) -> tuple[int, int, int]:
    table = lake.table("events")
    snapshot = table.current_snapshot()
    manifests = len(snapshot.manifests(table.io)) if snapshot else 0
    with table.io.new_input(table.metadata_location).open() as stream:
        size = len(stream.read())
    return len(table.snapshots()), manifests, size


def run(commits: int, rows: int, progress) -> list[Point]:
    from lakehouse import Lakehouse

    base = get_settings()
    home = base.home_dir / "bench-lakehouse"
    shutil.rmtree(home, ignore_errors=True)
    lake = Lakehouse.open(base.model_copy(update={"home": home}))
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    every = max(1, commits // STEPS)
    points, window = [], []
    with lake.writer("events") as writer:
        for round_ in range(1, commits + 1):
            batch = _batch(round_, rows, start)
            began = time.perf_counter()
            writer.submit(batch)
            writer.flush()
            window.append(time.perf_counter() - began)
            if round_ % every == 0 or round_ == commits:
                points.append(Point(round_, 1000 * float(np.mean(window)), 1000 * max(window), *_shape(lake)))
                progress(f"{round_} commits: {points[-1].mean_ms:.0f} ms per append")
                window = []
    return points


def report(points: list[Point], command: str, host: str) -> str:
    rows = "\n".join(
        f"| {p.commits:,} | {p.mean_ms:,.0f} | {p.max_ms:,.0f} | {p.snapshots:,} | {p.manifests:,} | {p.metadata_bytes / 1024:,.0f} |" for p in points
    )
    return f"""## Lakehouse: the cost of an idempotent append as a table's history grows

Command: `{command}` ({host}).

| appends so far | ms per append (mean since the row above) | max ms | snapshots retained | manifests in the current snapshot | metadata file KiB |
|---:|---:|---:|---:|---:|---:|
{rows}
"""


def main(commits: int, rows: int, write: bool, console) -> list[Point]:
    host = machine()
    points = run(commits, rows, console.print)
    text = report(points, f"rtml bench lakehouse --commits {commits} --rows {rows}", host)
    console.print(text)
    if write:
        write_section("lakehouse", text)
    return points
